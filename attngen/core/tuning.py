"""Tile shapes and compiler hints per head dimension.

``TUNED`` holds the forward's tiles (read through :func:`tiles_for`), ``FUSED``, ``DQ`` and
``DKDV`` the backward kernels'.  They are read once, when a spec is made
(``KernelSpec.tuned``): a spec's tiles are its fields from then on.  Rows are keyed
by GPU architecture and head dimension; a window narrower than ``NARROW_WINDOW`` keys
picks the row's ``narrow`` entry, because with only a few KV blocks per query tile the
masked keys of a wide block cost more than the extra loop iterations of a narrow one.
Only ``DEFAULT_ARCH`` has rows so far.  ``docs/performance.md``
records the measurements behind each row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .mask import Mask
from .support import forced_pack

DEFAULT_ARCH = "sm_90"
WORKER_WARPS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Tiles:
    block_m: int      # query rows per tile
    block_n: int      # keys per KV block
    occupancy: int    # CTAs per SM the compiler should plan for
    num_ctas: int     # CTAs per cluster
    pack: int = 1     # query heads of one KV group sharing a tile (block_m // pack positions each)
    worker_warps: int | None = None   # cuTile's num_worker_warps (None: the compiler's choice)

    def __post_init__(self):
        for field in ("block_m", "block_n"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value > 256 \
                    or value & (value - 1):
                raise ValueError(f"{field} must be a power of two between 16 and 256, got {value!r}")
        if isinstance(self.occupancy, bool) or not isinstance(self.occupancy, int) \
                or not 1 <= self.occupancy <= 32:
            raise ValueError(f"occupancy must be an integer in 1..32, got {self.occupancy!r}")
        if isinstance(self.num_ctas, bool) or not isinstance(self.num_ctas, int) \
                or self.num_ctas not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_ctas must be 1, 2, 4, 8 or 16, got {self.num_ctas!r}")
        if isinstance(self.pack, bool) or not isinstance(self.pack, int) or self.pack < 1 \
                or self.pack & (self.pack - 1) or self.pack > self.block_m:
            raise ValueError(f"pack must be a power of two no larger than block_m, got {self.pack!r}")
        if self.worker_warps is not None and (isinstance(self.worker_warps, bool)
                                              or not isinstance(self.worker_warps, int)
                                              or self.worker_warps not in WORKER_WARPS):
            raise ValueError(f"worker_warps must be one of {list(WORKER_WARPS)} (16 needs tileiras "
                             f">= 13.5), got {self.worker_warps!r}")

    @property
    def positions(self) -> int:
        """Query positions per tile."""
        return self.block_m // self.pack

    @property
    def tag(self) -> str:
        return (f"{self.block_m}x{self.block_n}o{self.occupancy}c{self.num_ctas}"
                + (f"p{self.pack}" if self.pack > 1 else "")
                + (f"w{self.worker_warps}" if self.worker_warps else ""))

    @property
    def hints(self) -> str:
        """The compiler hints, as ``@ct.kernel`` keyword arguments."""
        return (f"occupancy={self.occupancy}, num_ctas={self.num_ctas}"
                + (f", num_worker_warps={self.worker_warps}" if self.worker_warps else ""))

    def as_dict(self) -> dict:
        return asdict(self)


# arch -> head_dim -> {"wide": Tiles, "narrow": Tiles}
TUNED: dict[str, dict[int, dict[str, Tiles]]] = {
    "sm_90": {
        64: {"wide": Tiles(128, 64, 2, 1), "narrow": Tiles(64, 64, 4, 1)},
        80: {"wide": Tiles(128, 64, 2, 1), "narrow": Tiles(64, 64, 2, 1)},
        96: {"wide": Tiles(128, 64, 2, 1), "narrow": Tiles(64, 64, 2, 1)},
        128: {"wide": Tiles(128, 128, 2, 2), "narrow": Tiles(128, 64, 2, 1)},
        # 8 worker warps let 128-row tiles run without spilling at D = 256: 1.21-1.28x over
        # 64x128o1c1 at shapes B and G2 (H100, docs/performance.md); narrow not re-measured
        256: {"wide": Tiles(128, 128, 1, 1, worker_warps=8), "narrow": Tiles(64, 64, 1, 1)},
    },
}

NARROW_WINDOW = 512

# arch -> head_dim -> tiles of a paged variant's kernels.  They pack up to 8 query heads of a
# KV group into a tile (8 positions each): a decode step has one query position per
# sequence, so a tile of 64 one-head rows would hold a single useful row, and every packed
# head reads the same keys once.  Not swept on a GPU yet.  D = 64 takes occupancy 3: at 4
# (64 registers a thread) the compiler spilled registers in every key-loop step and waited
# for each 16-deep matmul step alone; at 3 it gives 80 registers and spills nothing
# (tests/test_prebuilt.py checks that no forward kernel spills).  At D = 80 to 128 the
# kernels need 128 registers a thread: occupancy 2 to 4 compile to the same code.
PAGED: dict[str, dict[int, Tiles]] = {
    "sm_90": {64: Tiles(64, 64, 3, 1, pack=8), 80: Tiles(64, 64, 2, 1, pack=8),
              96: Tiles(64, 64, 2, 1, pack=8), 128: Tiles(64, 64, 2, 1, pack=8),
              256: Tiles(64, 64, 1, 1, pack=8, worker_warps=8)},
}

# arch -> head_dim -> tiles of the deterministic backward kernels (dK/dV: BLOCK_N keys a program, BLOCK_M
# query rows a step; dQ: BLOCK_M rows a program, BLOCK_N keys a step).  64 x 64 at occupancy 2
# was the fastest shared choice for both kernels at D = 64 and 128 in the H200 sweep recorded in
# docs/performance.md (occupancy 2 alone took dK/dV from 2.18 to 1.50 ms at shape A, S = 8k);
# it also beat every 8-worker-warp candidate at D = 128 (shape B', H100).  D = 256 takes 64 x 64
# with 8 worker warps: 1.62-1.67x faster than 64 x 32 (the old row) at shape B (H100).
DKDV: dict[str, dict[int, Tiles]] = {
    "sm_90": {64: Tiles(64, 64, 2, 1), 80: Tiles(64, 64, 2, 1), 96: Tiles(64, 64, 2, 1),
              128: Tiles(64, 64, 2, 1), 256: Tiles(64, 64, 1, 1, worker_warps=8)},
}


# arch -> head_dim -> tiles of the fused backward (BLOCK_N keys a program, BLOCK_M query rows a
# step, dQ added atomically).  A head dim has a row where the fused backward is the faster
# one, measured: there it is the default backward, and deterministic mode runs the dQ and
# dK/dV kernels.  Elsewhere those two kernels are the only backward (deterministic by
# construction) and no fused kernel is generated.  H200, training step under CUDA graphs,
# S = 8k (docs/performance.md): fused against two-kernel A 3758 / 3556 us, B' 1430 / 1210,
# C 549 / 382, B 696 / 2383 (the two-kernel path's dQ at D = 256 with its loads reordered);
# the fused kernel's atomic dQ traffic (one fp32 tile per query tile and key block) costs
# more than the two-kernel path's extra matmuls at D <= 128.
FUSED: dict[str, dict[int, Tiles]] = {
    "sm_90": {256: Tiles(64, 64, 1, 1, worker_warps=8)},
}


# arch -> head_dim -> tiles of the dQ kernel (DQ_M query rows a program, DQ_N keys a step),
# tuned apart from dK/dV's (`attngen bench tune --backward --dq`); a head dim without a row
# takes its DKDV row.  H100 sweep (docs/performance.md): D = 256 takes 128-row programs
# over 32-key steps (backward pass 9.5-11.6 % faster at shape B), D = 64 narrower steps at
# occupancy 4 (6 % at shape C); at D = 128 nothing beat the shared 64 x 64 at both lengths.
DQ: dict[str, dict[int, Tiles]] = {
    "sm_90": {64: Tiles(64, 32, 4, 1), 256: Tiles(128, 32, 1, 1, worker_warps=8)},
}


#: query rows per program of the backward's pre- and post-processing kernels (delta and the
#: dQ accumulator's zeroing; dQ's scaling and cast): memory-bound, any tile that keeps the
#: rows' loads wide will do
PREPROCESS_ROWS = 64

#: query rows per program of a paged call's merge of its key slices (``_combine``): a decode
#: step has one query row per sequence, so a small tile wastes little
COMBINE_ROWS = 16


def dkdv_tiles(head_dim: int) -> Tiles:
    try:
        return DKDV[DEFAULT_ARCH][head_dim]
    except KeyError:
        raise ValueError(f"no backward tile table entry for head_dim {head_dim}") from None


def fused_tiles(head_dim: int) -> Tiles | None:
    """Tiles of the fused backward, or None where the two-kernel backward is the faster one."""
    return FUSED[DEFAULT_ARCH].get(head_dim)


def dq_tiles(head_dim: int) -> Tiles:
    return DQ[DEFAULT_ARCH].get(head_dim) or dkdv_tiles(head_dim)


def tiles_for(head_dim: int, mask: Mask, gqa: int = 1, varlen: bool = False, paged: bool = False) -> Tiles:
    """The tuned tiles of a variant on ``DEFAULT_ARCH`` (a paged variant's from ``PAGED``),
    with ``pack`` lowered to what the GQA ratio and the features allow."""
    try:
        row = (PAGED if paged else TUNED)[DEFAULT_ARCH][head_dim]
    except KeyError:
        raise ValueError(f"no tile table entry for head_dim {head_dim}") from None
    narrow = mask.span is not None and mask.span < NARROW_WINDOW
    tiles = row if paged else row["narrow" if narrow else "wide"]
    pack = forced_pack(varlen, paged) or tiles.pack
    while gqa % pack:
        pack //= 2
    return tiles if pack == tiles.pack else replace(tiles, pack=pack)
