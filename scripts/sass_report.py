"""What the tile compiler made of each kernel of a build, read from its sm_90 SASS (no GPU).

    attngen build variants/gemma3.yaml --out build/attngen --all
    python scripts/sass_report.py build/attngen [--schedule] [--match _dkdv]

One line a kernel (the 64-bit twins left out): the registers a thread is given, its
instructions, how many of them spill to local memory (and the bytes a thread spills), and
of its key loop (the innermost
loop that runs the most matmuls): its instructions, matmul instructions (HGMMA, one
16-deep step of a warpgroup's matmul each; HMMA for tiles under 64 rows), waits for them, and element stores to shared
memory.  A loop that waits as often as it steps has its matmuls run one step at a time;
``--schedule`` prints each loop's order of work (`attngen.generate.sass.schedule`).
docs/performance.md, "What limits each shape", reads these.
"""
import argparse
from pathlib import Path

from attngen.generate.cubin import kernel_info
from attngen.generate.sass import (disassemble, element_store, instructions, key_loop, matmul, opcode, schedule,
                                   spills)


def report(cubin: Path) -> tuple[str, str | None]:
    """The kernel's line, and its key loop's schedule (None: it has no matmul loop)."""
    sass, info = disassemble(cubin), kernel_info(cubin)
    head = f"{cubin.name.split('.')[0]:<72} regs {info.registers:>3}  ins {len(instructions(sass)):>5}  " \
           f"spill {spills(sass):>3} ({info.local_bytes:>4} B)"
    try:
        loop = key_loop(sass)
    except ValueError:
        return head + "  (no matmul loop)", None
    ops = [opcode(op) for op in loop]
    return (head + f"  loop {len(loop):>4}  mma {sum(map(matmul, loop)):>3}  "
            f"waits {sum(o.startswith('WARPGROUP.DEPBAR') for o in ops):>3}  "
            f"sts {sum(element_store(op) for op in loop):>3}"), schedule(loop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", type=Path, help="a directory `attngen build` wrote")
    p.add_argument("--schedule", action="store_true", help="also print each key loop's order of work")
    p.add_argument("--match", default="", help="only kernels whose name contains this")
    args = p.parse_args()
    cubins = sorted(c for c in args.build.glob("*/*.sm_90.cubin")
                    if "_i64" not in c.name and args.match in c.name)
    if not cubins:
        raise SystemExit(f"no sm_90 cubins under {args.build}{' matching ' + args.match if args.match else ''}: "
                         "run `attngen build ... --out DIR --all` first")
    for cubin in cubins:
        line, order = report(cubin)
        print(line)
        if args.schedule and order:
            print("    " + order)


if __name__ == "__main__":
    main()
