"""`attngen bench tune`: candidate tile shapes for a shape, each timed in place of the tuned
table's row (the forward's, the fused backward's, or deterministic mode's dQ and dK/dV
kernels'), the best printed for ``attngen/core/tuning.py``."""

from __future__ import annotations

import math
from dataclasses import asdict

from ..core.tuning import Tiles, tiles_for
from . import timing
from .presets import Shape

def tune(shape: Shape, candidates: list[Tiles], say=print, backward: bool = False,
         deterministic: bool = False, dq: bool = False, dkdv: bool = False) -> list[dict]:
    """Time each candidate tile config of the attngen kernel for ``shape``: the forward's, or
    with ``backward`` a backward kernel's (each candidate in place of the table's row for the
    head dim, timing the backward pass): the fused kernel's, or with ``deterministic`` the
    deterministic mode's dK/dV and dQ kernels (with ``dq`` dQ's alone, with ``dkdv`` dK/dV's
    alone; the other keeps the tiles it has now)."""
    from ..core import tuning

    if dq and dkdv:
        raise ValueError("dq and dkdv each tune one backward kernel: give at most one")
    if (dq or dkdv) and not deterministic:
        raise ValueError("dq and dkdv tune the deterministic mode's kernels: give deterministic too")
    hd = shape.head_dim
    arch = tuning.DEFAULT_ARCH
    tables = {"fused": tuning.FUSED[arch], "dkdv": tuning.BACKWARD[arch], "dq": tuning.DQ[arch]}
    saved = {name: table.get(hd) for name, table in tables.items()}
    # the rows a backward candidate stands in for
    swapped = ["fused"] if not deterministic else ["dq"] if dq else ["dkdv"] if dkdv else ["dkdv", "dq"]
    rows = []
    for tiles in candidates:
        try:
            if backward:
                # the other kernels' tiles as they are, pinned: a head dim without a row of its
                # own would follow the row a candidate replaces
                tables["dq"][hd] = tuning.dq_tiles(hd)
                for name in swapped:
                    tables[name][hd] = tiles
                got = timing.bench(shape, names=("attngen-det" if deterministic else "attngen",),
                            say=lambda _: None, which="bwd")
                for r in got:
                    r["tiles"] = asdict(tiles)
            else:
                got = timing.bench(shape, names=("attngen",), tiles=tiles, say=lambda _: None)
        except Exception as exc:    # noqa: BLE001 - a config the compiler rejects is a result
            say(f"{shape.label}: {tiles.tag}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        finally:
            for name, table in tables.items():
                if saved[name] is None:
                    table.pop(hd, None)
                else:
                    table[hd] = saved[name]
        rows += got
        times = "  ".join(f"S={r['seq']}: {r['us_p50']:.1f}us {r['tflops']:.0f}TF err {r['rel_err']:.1e}"
                          for r in got)
        say(f"{shape.label}: {tiles.tag}  {times}")
    if rows:
        best = min(candidates, key=lambda t: sum(r["us_p50"] for r in rows if r["tiles"] == asdict(t))
                   if any(r["tiles"] == asdict(t) for r in rows) else math.inf)
        if not backward:
            default, what = tiles_for(hd, shape.mask, shape.heads // shape.heads_kv), ""
        elif not deterministic:
            default, what = tuning.fused_tiles(hd), "fused backward "
        else:
            default = (tuning.dq_tiles if dq else tuning.backward_tiles)(hd)
            what = "dQ " if dq else "dK/dV " if dkdv else "deterministic backward "
        say(f"{shape.label}: best {what}{best.tag} (table: {default.tag if default else 'none'})")
    return rows


DEFAULT_CANDIDATES = ["128x128o2c2", "128x128o2c1", "128x128o1c1", "128x64o2c1", "128x64o2c2",
                      "64x64o4c1", "64x64o2c1", "64x128o2c1", "64x32o4c1", "128x32o2c1",
                      "64x64o1c1", "64x128o1c1"]
