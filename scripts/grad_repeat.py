"""Run generated gradient cases many times with fresh seeds: how often each passes its rule
(each gradient's error <= 2 x eager's in the same dtype + a floor) and the worst ratios.
A single run of the test suite draws one seed per case; a rule that fails one time in ten
shows up here.

    python scripts/grad_repeat.py BUILD_DIR VARIANT_PREFIX [--case SUBSTRING] [--reps 100]

BUILD_DIR is where `attngen build` wrote the variants (scripts/device.sh: build/attngen);
the first variant whose name starts with VARIANT_PREFIX is run.  Needs a GPU.
"""
import argparse
import importlib
import sys
from pathlib import Path

from attngen.testing import check_grad_case


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build_dir")
    p.add_argument("variant_prefix")
    p.add_argument("--case", default="", help="only cases whose id contains this")
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    names = sorted(d.name for d in Path(args.build_dir).iterdir()
                   if d.is_dir() and d.name.startswith(args.variant_prefix))
    if not names:
        sys.exit(f"no variant starting with {args.variant_prefix!r} in {args.build_dir}")
    sys.path.insert(0, str(Path(args.build_dir).resolve()))
    launcher = importlib.import_module(f"{names[0]}.launcher")
    tests = importlib.import_module(f"{names[0]}.test_{names[0]}")
    for case in (c for c in tests.CASES if args.case in c.id):
        fails, worst = 0, {}
        for _ in range(args.reps):
            try:
                errors = check_grad_case(launcher.launch, launcher.SPEC, case)
            except AssertionError as e:
                fails += 1
                print(f"  fail: {str(e).splitlines()[0]}")
                continue
            for mode, by_name in errors.items():
                for n, (ours, eager) in by_name.items():
                    key = f"{mode} d{n}"
                    worst[key] = max(worst.get(key, 0.0), ours / max(eager, 1e-12))
        ratios = "  ".join(f"{k} {r:.2f}" for k, r in sorted(worst.items()))
        print(f"{names[0]} {case.id}: {args.reps - fails}/{args.reps} passed; worst ours/eager "
              f"of the passing runs: {ratios}", flush=True)


if __name__ == "__main__":
    main()
