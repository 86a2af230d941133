"""The edge cases every variant is tested on.

:func:`cases_for` is the one list of shapes a variant is tested on: the build renders it
into the variant's pytest file, and the benchmarks use the same kernel specs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mask import Mask
from .spec import KernelSpec

#: relative error ||o - ref|| / ||ref|| allowed per dtype
TOLERANCE = {"fp16": 2e-3, "bf16": 1.5e-2}


@dataclass(frozen=True)
class Case:
    id: str
    batch: int
    heads_kv: int
    seq: int
    layout: str = "bhsd"
    versus_full: bool = False    # compare with the window-less mask (window covers the sequence)
    scale: float | None = None   # None: the kernel's default, head_dim ** -0.5

    def __repr__(self):
        fields = [f"{k}={getattr(self, k)!r}" for k in ("id", "batch", "heads_kv", "seq")]
        for k, default in (("layout", "bhsd"), ("versus_full", False), ("scale", None)):
            if getattr(self, k) != default:
                fields.append(f"{k}={getattr(self, k)!r}")
        return f"Case({', '.join(fields)})"


def _span(mask: Mask) -> int | None:
    """Keys in a full window, or None without a window."""
    return None if mask.left is None else mask.left + 1 + (mask.right or 0)


def cases_for(spec: KernelSpec) -> list[Case]:
    """Shapes that reach every code path of the variant's kernel."""
    bm, bn, g = spec.tiles.block_m, spec.tiles.block_n, spec.gqa
    mask = spec.mask
    span = _span(mask)
    tag = mask.tag.replace("causal_", "").replace("bidir_", "")

    def case(what, batch, heads_kv, seq, **kw):
        layout = kw.get("layout", "bhsd")
        ident = f"{what}-b{batch}-h{heads_kv * g}kv{heads_kv}-s{seq}-{tag}-{layout}"
        return Case(ident, batch, heads_kv, seq, **kw)

    cases = [
        case("one-token", 1, 1, 1),
        case("shorter-than-tile", 1, 1, bm // 2 + 3),
        case("tile-multiple", 1, 3, 4 * bm),
        case("ragged-batch2", 2, 2, 2 * bm + 17),
        case("bshd-views", 2, 2, bm + 9, layout="bshd"),
        case("explicit-scale", 1, 2, bm + 1, scale=0.3),
    ]
    if span is None:
        cases.append(case("many-blocks", 1, 2, 8 * bn + 5))
    else:
        # a window that covers the whole sequence must give plain causal / bidirectional
        reach = mask.left if mask.causal else min(mask.left, mask.right)
        cases.append(case("window-covers-seq", 1, 2, min(reach + 1, 2 * bm + 7), versus_full=True))
        cases.append(case("just-past-window", 1, 1, span + bn + 5))
        cases.append(case("many-windows", 1, 2, (3 if span <= 1024 else 2) * span + 17))
    return cases
