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
    page: int | None = None       # paged kernels: keys per page of the cache
    shared: bool = False          # paged kernels: the second sequence's first pages are the first's
    splits: int | None = None     # paged kernels: key slices per query tile (None: the launcher's choice)

    def __repr__(self):
        fields = [f"{k}={getattr(self, k)!r}" for k in ("id", "batch", "heads_kv", "seq")]
        for k, default in (("seq_k", None), ("lengths", None), ("layout", "bhsd"),
                           ("versus_full", False), ("scale", None), ("page", None),
                           ("shared", False), ("splits", None)):
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
        ident = (f"{what}-pack{len(lengths)}-h{heads_kv * g}kv{heads_kv}-t{total}-{tag}"
                 + (f"-page{kw['page']}" if kw.get("page") else ""))
        return Case(ident, len(lengths), heads_kv, max(q for q, _ in lengths), lengths=lengths, **kw)

    long = 8 * bn + 5 if span is None else (3 if span <= 1024 else 2) * span + 17
    if f.paged:
        # (queries, keys) per sequence: prefill chunks, decode steps, empty sequences; pages of
        # every size, shuffled, some shared; windows narrower and wider than a page
        rows = spec.tiles.positions
        cases = [
            pack("mixed-batch", 2, [(1, 300), (rows + 5, rows + 5), (2 * rows + 1, 2 * rows + 101), (0, 40),
                                    (1, 1)], page=16),
            pack("decode", 2, [(1, long), (1, 77), (1, 1)], page=32),
            pack("decode-split", 1, [(1, long), (rows + 3, long), (1, 5)], page=64, splits=3),
            pack("prefill-chunk", 1, [(2 * rows + 3, long)], page=128),
            pack("long-pages", 2, [(1, long), (rows - 1, long // 2)], page=256),
            pack("shared-pages", 2, [(3, 200), (5, 230)], page=16, shared=True),
            pack("explicit-scale", 1, [(rows + 1, rows + 60), (2, 9)], page=32, scale=0.3),
            # a sharp softmax (logits of ~100): the running max and the sinks' stabilizers matter
            pack("sharp-softmax", 1, [(rows + 1, rows + 60), (1, 30)], page=16, scale=4.0),
            # a sequence ending on a page boundary inside a KV block, a longer one after it: the
            # block table's next entry (-1) must not be read
            pack("ends-on-a-page", 1, [(2, 48), (1, 100)], page=16),
        ]
        if mask.causal:      # FlashAttention's rule: rows before the first key see none, give 0
            cases.append(pack("more-queries-than-keys", 1, [(5, 2), (3, 3)], page=16))
        return cases
    if f.varlen:
        cases = [
            pack("one-sequence", 3, [(4 * bm, 4 * bm)]),
            pack("single-tokens", 1, [(1, 1)] * 5),
            pack("long-and-short", 2, [(1, 1), (bm // 2 + 3, bm // 2 + 3), (long, long), (17, 17)]),
            pack("explicit-scale", 2, [(bm + 1, bm + 1), (5, 5)], scale=0.3),
            pack("sharp-softmax", 1, [(bm + 1, bm + 1), (9, 9)], scale=4.0),
            # a sequence of whole tiles before a longer one: no program may start at its end
            pack("whole-tiles-then-longer", 1, [(2 * bm, 2 * bm), (2 * bm + 9, 2 * bm + 9)]),
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
        case("sharp-softmax", 1, 2, bm + 7, scale=4.0),
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
        # prefixes that put a block boundary one key inside the causal diagonal of every query
        # tile's first row, and (windows) one key inside the far edge of its last row's window:
        # the blocks on either side of the boundary must be masked or not exactly as they are seen
        cases.append(case("diagonal-edge-after-prefix", 1, 1, 2 * bm + 3, seq_k=2 * bm + 3 + bn - 2))
        if mask.causal and mask.left is not None:
            edge = (mask.left + 2 - bm) % bn + bn
            cases.append(case("window-edge-after-prefix", 1, 1, 2 * bm + 3, seq_k=2 * bm + 3 + edge))
    return cases
