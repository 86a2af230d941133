"""`attngen bench`: attngen timed against the kernels a user would otherwise pick, on the
current GPU, in one process.

  run    one pass (forward, backward, or both) of each preset shape at each sequence length:
         attngen, PyTorch SDPA (flash and cuDNN backends, *full* causal, GQA heads expanded),
         FlexAttention (compiled, the same window as a BlockMask) and SDPA with an explicit
         band mask (S <= 16384).  Medians (p20/p80 too) of triton.testing.do_bench, or of
         CUDA-graph replays (--graph); each output checked against the float64 reference
         first.  Effective TFLOP/s count the attended (query, key) pairs: 4 * D * pairs * B * H
         for the forward, 2.5 times that for the backward.
  tune   candidate tile shapes for a shape, each in place of the tuned table's row
         (attngen/core/tuning.py); the best is printed.
  plot   draw a JSON file written by run (needs matplotlib).
  model  whole transformers models, the attention implementation switched on the same model.
  paged  a paged K/V cache: paged against contiguous prefill, decode (with its bandwidth),
         a batch mixing prefill chunks and decode steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from . import models, paged
from .presets import DEFAULT_PEERS, DEFAULT_PRESETS, PEERS, PRESETS, parse_tiles, parse_window
from .report import plot
from .timing import PASSES, bench
from .tune import DEFAULT_CANDIDATES, tune


def _presets() -> str:
    return "presets:\n" + "\n".join(
        f"  {name:<11} {s.label}: H{s.heads}/{s.heads_kv} D{s.head_dim} "
        f"W{s.window if s.window else ' full'} {s.dtype}, S {'/'.join(str(x) for x in s.seqs)}"
        + (f", softcap {s.softcap:g}" if s.softcap else "") + (", sinks" if s.sinks else "")
        + (f", after {s.prefix} cached keys" if s.prefix else "")
        for name, s in PRESETS.items())


def parser() -> argparse.ArgumentParser:
    """The one parser of `attngen bench` and its subcommands."""
    top = argparse.ArgumentParser(prog="attngen bench", description=__doc__, epilog=_presets(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{run,tune,plot,model,paged}")
    for name, what in (("run", "time attngen against SDPA and FlexAttention"),
                       ("tune", "sweep tile shapes for a preset")):
        p = sub.add_parser(name, help=what, description=what, epilog=_presets(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--preset", action="append", choices=list(PRESETS),
                       help=f"shape presets (repeatable); default: {' '.join(DEFAULT_PRESETS)}")
        p.add_argument("--seq", type=int, nargs="+", help="override the sequence lengths")
        p.add_argument("--window", type=parse_window,
                       help="override the window: W (the W most recent keys) or 'full' (full causal)")
        p.add_argument("--json", help="write the rows here (long format)")
        if name == "run":
            p.add_argument("--impl", nargs="+", choices=PEERS, default=list(DEFAULT_PEERS),
                           help="implementations to time (attngen-det: attngen's deterministic "
                                "backward; not timed unless named)")
            p.add_argument("--tiles", type=parse_tiles, help="attngen tiles, e.g. 128x64o2c1")
            p.add_argument("--pass", dest="which", choices=PASSES, default="fwd",
                           help="what to time: the forward, the backward of one forward, or both "
                                "(TFLOP/s count the backward as 2.5 x the forward's FLOPs)")
            p.add_argument("--graph", action="store_true",
                           help="time replays of a CUDA graph of the pass instead of do_bench's "
                                "launches (no host cost; no L2 flush between calls)")
            p.add_argument("--plot", help="also draw the rows to this PNG")
        else:
            p.add_argument("--candidates", type=parse_tiles, nargs="+",
                           default=[parse_tiles(t) for t in DEFAULT_CANDIDATES])
            p.add_argument("--backward", action="store_true",
                           help="tune the fused backward kernel's tiles (timing the backward pass)")
            p.add_argument("--deterministic", action="store_true",
                           help="with --backward: the deterministic mode's dK/dV and dQ kernels instead")
            which = p.add_mutually_exclusive_group()
            which.add_argument("--dq", action="store_true",
                               help="with --backward --deterministic: the dQ kernel's tiles alone")
            which.add_argument("--dkdv", action="store_true",
                               help="with --backward --deterministic: the dK/dV kernel's tiles alone")
    p = sub.add_parser("plot", help="draw a JSON file written by `run`")
    p.add_argument("json")
    p.add_argument("png")
    what = "whole transformers models, the attention implementation switched"
    p = sub.add_parser("model", help=what, description=models.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_arguments(p)
    what = "a paged K/V cache: prefill, decode, mixed batches"
    p = sub.add_parser("paged", help=what, description=paged.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    paged.add_arguments(p)
    return top


def parse_args(argv) -> argparse.Namespace:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "model":
        models.finish_args(top, args)
    elif args.command == "run" and args.graph and args.which == "bwd":
        top.error("--graph times fwd or fwd+bwd: a captured backward needs its forward in the graph")
    elif args.command == "tune":
        if (args.dq or args.dkdv or args.deterministic) and not args.backward:
            top.error("--deterministic, --dq and --dkdv tune backward kernels: give --backward too")
        if (args.dq or args.dkdv) and not args.deterministic:
            top.error(f"--{'dq' if args.dq else 'dkdv'} tunes a deterministic-mode kernel: "
                      "give --deterministic too")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "plot":
        with open(args.json) as fh:
            plot(json.load(fh)["rows"], args.png)
        return 0
    import torch
    if not torch.cuda.is_available():
        print(f"attngen bench {args.command}: needs a CUDA GPU (attngen's kernels run only there)",
              file=sys.stderr)
        return 2
    if args.command == "model":
        models.run(args, argv[1:])
        return 0
    if args.command == "paged":
        rows = paged.run(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"command": " ".join(["attngen bench", *argv]), "rows": rows}, fh, indent=1)
        return 0
    shapes = [PRESETS[p] for p in (args.preset or DEFAULT_PRESETS)]
    if args.seq:
        shapes = [replace(s, seqs=tuple(args.seq)) for s in shapes]
    if args.window is not None:
        shapes = [replace(s, window=None if args.window == "full" else args.window) for s in shapes]
    rows = []
    for shape in shapes:
        if args.command == "run":
            rows += bench(shape, names=args.impl, spec=shape.spec(args.tiles), which=args.which,
                          graph=args.graph)
        else:
            rows += tune(shape, args.candidates, backward=args.backward, deterministic=args.deterministic,
                         dq=args.dq, dkdv=args.dkdv)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(["attngen bench", *argv]), "rows": rows}, fh, indent=1)
    if args.command == "run" and args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
