"""`attngen bench tune`: candidate tile shapes for a shape, each timed in place of the tuned
table's row (the forward's, the fused backward's, or deterministic mode's dQ and dK/dV
kernels'), the best printed for ``attngen/core/tuning.py``."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from ..core.tuning import Tiles
from . import timing
from .presets import Shape

def tune(shape: Shape, candidates: list[Tiles], say=print, backward: bool = False,
         deterministic: bool = False, dq: bool = False, dkdv: bool = False) -> list[dict]:
    """Time each candidate tile config of the attngen kernel for ``shape``: the forward's, or
    with ``backward`` a backward kernel's (the shape's tuned spec with the candidate in that
    kernel's tiles, timing the backward pass): the fused kernel's, or with ``deterministic``
    the deterministic mode's dK/dV and dQ kernels (with ``dq`` dQ's alone, with ``dkdv``
    dK/dV's alone; the other keeps its tuned tiles).  The tuned tables are never changed."""
    if dq and dkdv:
        raise ValueError("dq and dkdv each tune one backward kernel: give at most one")
    if (dq or dkdv) and not deterministic:
        raise ValueError("dq and dkdv tune the deterministic mode's kernels: give deterministic too")
    tuned = shape.spec()
    # the spec fields a candidate stands in for
    fields = (["tiles"] if not backward else ["fused_tiles"] if not deterministic
              else ["dq_tiles"] if dq else ["dkdv_tiles"] if dkdv else ["dq_tiles", "dkdv_tiles"])
    rows = []
    for tiles in candidates:
        try:
            spec = replace(tuned, **{name: tiles for name in fields})
            got = timing.bench(shape, names=("attngen-det" if deterministic else "attngen",), spec=spec,
                               say=lambda _: None, which="bwd" if backward else "fwd")
            for r in got:
                r["tiles"] = asdict(tiles)
        except Exception as exc:    # noqa: BLE001 - a config the compiler rejects is a result
            say(f"{shape.label}: {tiles.tag}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        rows += got
        times = "  ".join(f"S={r['seq']}: {r['us_p50']:.1f}us {r['tflops']:.0f}TF err {r['rel_err']:.1e}"
                          for r in got)
        say(f"{shape.label}: {tiles.tag}  {times}")
    if rows:
        best = min(candidates, key=lambda t: sum(r["us_p50"] for r in rows if r["tiles"] == asdict(t))
                   if any(r["tiles"] == asdict(t) for r in rows) else math.inf)
        default = getattr(tuned, fields[-1])
        what = ("" if not backward else "fused backward " if not deterministic else "dQ " if dq
                else "dK/dV " if dkdv else "deterministic backward ")
        say(f"{shape.label}: best {what}{best.tag} (table: {default.tag if default else 'none'})")
    return rows


DEFAULT_CANDIDATES = ["128x128o2c2", "128x128o2c1", "128x128o1c1", "128x64o2c1", "128x64o2c2",
                      "64x64o4c1", "64x64o2c1", "64x128o2c1", "64x32o4c1", "128x32o2c1",
                      "64x64o1c1", "64x128o1c1"]
