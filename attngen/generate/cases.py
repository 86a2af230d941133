"""The edge cases every variant is tested on.

:func:`cases_for` is the one list of shapes a variant is tested on: the build renders it
into the variant's pytest file, and the benchmarks use the same kernel specs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.variant import KernelSpec

@dataclass(frozen=True)
class Case:
    id: str
    batch: int
    heads_kv: int
    seq: int                      # queries per sequence (the longest, for packed sequences)
    seq_k: int | None = None      # keys per sequence, when more than queries (chunked kernels)
    lengths: tuple | None = None  # packed sequences (varlen kernels): ((S_q, S_k), ...)
    layout: str = "bhsd"
    versus_full: bool = False     # compare with the window-less mask (window covers the sequence)
    scale: float | None = None    # None: the kernel's default, head_dim ** -0.5

    def __repr__(self):
        fields = [f"{k}={getattr(self, k)!r}" for k in ("id", "batch", "heads_kv", "seq")]
        for k, default in (("seq_k", None), ("lengths", None), ("layout", "bhsd"),
                           ("versus_full", False), ("scale", None)):
            if getattr(self, k) != default:
                fields.append(f"{k}={getattr(self, k)!r}")
        return f"Case({', '.join(fields)})"


def cases_for(spec: KernelSpec) -> list[Case]:
    """Shapes that reach every code path of the variant's kernel."""
    bm, bn, g = spec.tiles.block_m, spec.tiles.block_n, spec.gqa
    mask, f = spec.mask, spec.features
    span = mask.span
    tag = mask.tag.replace("causal_", "").replace("bidir_", "")

    def case(what, batch, heads_kv, seq, **kw):
        layout = kw.get("layout", "bhsd")
        seqs = f"s{seq}" + (f"of{kw['seq_k']}" if kw.get("seq_k") else "")
        ident = f"{what}-b{batch}-h{heads_kv * g}kv{heads_kv}-{seqs}-{tag}-{layout}"
        return Case(ident, batch, heads_kv, seq, **kw)

    def pack(what, heads_kv, lengths, **kw):
        lengths = tuple((q, k) if f.chunked else (q, q) for q, k in lengths)
        total = sum(q for q, _ in lengths)
        ident = f"{what}-pack{len(lengths)}-h{heads_kv * g}kv{heads_kv}-t{total}-{tag}"
        return Case(ident, len(lengths), heads_kv, max(q for q, _ in lengths), lengths=lengths, **kw)

    long = 8 * bn + 5 if span is None else (3 if span <= 1024 else 2) * span + 17
    if f.varlen:
        cases = [
            pack("one-sequence", 3, [(4 * bm, 4 * bm)]),
            pack("single-tokens", 1, [(1, 1)] * 5),
            pack("long-and-short", 2, [(1, 1), (bm // 2 + 3, bm // 2 + 3), (long, long), (17, 17)]),
            pack("explicit-scale", 2, [(bm + 1, bm + 1), (5, 5)], scale=0.3),
        ]
        if f.chunked:
            cases.append(pack("after-prefixes", 2, [(1, 300), (bm + 5, bm + 5), (2 * bm + 1, 2 * bm + 101)]))
        return cases

    cases = [
        case("one-token", 1, 1, 1),
        case("shorter-than-tile", 1, 1, bm // 2 + 3),
        case("tile-multiple", 1, 3, 4 * bm),
        case("ragged-batch2", 2, 2, 2 * bm + 17),
        case("bshd-views", 2, 2, bm + 9, layout="bshd"),
        case("explicit-scale", 1, 2, bm + 1, scale=0.3),
    ]
    if span is None:
        cases.append(case("many-blocks", 1, 2, long))
    else:
        # a window that covers the whole sequence must give plain causal / bidirectional
        reach = mask.left if mask.causal else min(mask.left, mask.right)
        cases.append(case("window-covers-seq", 1, 2, min(reach + 1, 2 * bm + 7), versus_full=True))
        cases.append(case("just-past-window", 1, 1, span + bn + 5))
        cases.append(case("many-windows", 1, 2, long))
    if f.chunked:
        cases.append(case("after-prefix", 1, 2, bm + 5, seq_k=bm + 305))
        cases.append(case("one-query-after-prefix", 2, 1, 1, seq_k=2 * bm + 9))
        cases.append(case("after-prefix-bshd", 2, 2, bm + 3, seq_k=bm + 40, layout="bshd"))
        if span is not None:
            cases.append(case("prefix-within-window", 1, 2, bm + 3, seq_k=bm + 3 + max(1, span // 3)))
            cases.append(case("prefix-past-window", 1, 1, bm + 3, seq_k=bm + 3 + span + bn + 1))
    return cases
