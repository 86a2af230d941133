"""How much the generated cases catch: every comparison (<, <=, >, >=), every ``+ 1`` / ``- 1``
and every ``min(`` / ``max(`` of templates/kernel.py.j2's kernel code is flipped in turn, each
mutant rendered for the emulator's variants it changes (attngen.testing.EMULATED_VARIANTS),
and their generated cases run in the CPU emulator until one fails.  A mutant that survives
is either equivalent (it only masks more than needed, a docstring) or a case the suites
lack.  No GPU needed; about a quarter of an hour on two cores.

    python scripts/mutation_sweep.py --jobs 2 --out sweep.jsonl
"""

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile

FLIPS = [(" <= ", " < "), (" < ", " <= "), (" >= ", " > "), (" > ", " >= "), (" + 1", ""), (" - 1", ""),
         ("max(", "min("), ("min(", "max(")]


def mutants(text: str) -> list[tuple[int, str, str]]:
    """(line number, mutated line, whole mutated template) for each flip in kernel code (not
    in Jinja statements, comments or docstrings)."""
    lines = text.split("\n")
    found = []
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(("{%", "{#", "#")) or '"""' in stripped:
            continue
        code = line.split("  #")[0]
        for old, new in FLIPS:
            for match in re.finditer(re.escape(old), code):
                mutated = line[:match.start()] + new + line[match.end():]
                found.append((n + 1, mutated.strip(), "\n".join(lines[:n] + [mutated] + lines[n + 1:])))
    return found


def run(job) -> dict:
    """One mutant against every emulated variant it changes: the first failing case, or
    survived."""
    index, line, mutated, text = job
    from attngen.emulator import KernelFault
    from attngen.generate import codegen
    from attngen.testing import EMULATED_VARIANTS, check_variant, emulated_variant, render_mutant

    sources = {**codegen.template_sources(), "kernel.py.j2": text}
    changed = []
    with tempfile.TemporaryDirectory() as directory:
        for name in EMULATED_VARIANTS:
            spec = emulated_variant(name)
            try:
                module = render_mutant(spec, sources, f"m{index}", directory)
            except Exception as e:                              # noqa: BLE001 - a mutant that does not render
                return {"line": line, "mutant": mutated, "caught": f"{name}: {type(e).__name__} rendering"}
            if module is None:
                continue
            changed.append(name)
            try:
                check_variant(module, spec)
            except (AssertionError, KernelFault) as e:
                return {"line": line, "mutant": mutated, "caught": f"{name}: {str(e).splitlines()[0][:160]}"}
            except Exception as e:                              # noqa: BLE001 - a crash is a catch too
                return {"line": line, "mutant": mutated, "caught": f"{name}: {type(e).__name__}: {e}"[:200]}
    return {"line": line, "mutant": mutated, "survived": changed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: cores)")
    parser.add_argument("--out", help="write one JSON line per mutant here")
    parser.add_argument("--limit", type=int, help="only the first N mutants")
    args = parser.parse_args()

    os.environ["ATTNGEN_EMULATE"] = "1"
    os.environ.setdefault("ATTNGEN_CACHE_DIR", tempfile.mkdtemp(prefix="attngen-sweep-"))
    from attngen.core.version import template_sources

    found = mutants(template_sources()["kernel.py.j2"])[:args.limit]
    print(f"{len(found)} mutants of templates/kernel.py.j2", flush=True)
    jobs = [(i, *m) for i, m in enumerate(found)]
    survived = 0
    out = open(args.out, "w") if args.out else None
    with multiprocessing.Pool(max(1, args.jobs)) as pool:
        for result in pool.imap_unordered(run, jobs):
            if out:
                out.write(json.dumps(result) + "\n")
                out.flush()
            if "survived" in result and result["survived"]:
                survived += 1
                print(f"SURVIVED line {result['line']}: {result['mutant']}  ({', '.join(result['survived'])})",
                      flush=True)
    print(f"{survived} of {len(found)} mutants survived", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
