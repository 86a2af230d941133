"""The value types of a variant: what a kernel computes (:class:`Features`, with the
:class:`~attngen.core.mask.Mask` and GQA ratio: a :class:`Family`), what it is specialized on
(:class:`KernelSpec`) and the parameters it takes (:class:`Param`).  Nothing here reads
files or templates; the YAML reader (:mod:`attngen.generate.spec`) and the renderer
(:mod:`attngen.generate.codegen`) build on these."""

from __future__ import annotations

import hashlib
import json
from dataclasses import KW_ONLY, dataclass, replace

from .mask import Mask
from .support import (ArgumentError, check_dtype, check_gqa, check_head_dim, check_positive_number,
                      forced_pack)
from .tuning import Tiles, dkdv_tiles, dq_tiles, fused_tiles, tiles_for
from .version import fingerprint


@dataclass(frozen=True)
class Features:
    """What a kernel computes beyond the masked softmax; each is generated only where used.

    softcap  scores <- softcap * tanh(scores / softcap) before masking (Gemma 2)
    sinks    one learned logit per query head joins the softmax denominator (gpt-oss)
    chunked  queries are the last S_q of S_k >= S_q keys (prefill after a cached prefix)
    varlen   packed (total_tokens, H, D) sequences described by cu_seqlens
    paged    keys and values read from a paged cache through a block table, each sequence's
             queries the last of its cached keys (serving: prefill chunks and decode steps in
             one batch); implies varlen and chunked, and has no backward
    """

    softcap: float | None = None
    sinks: bool = False
    chunked: bool = False
    varlen: bool = False
    paged: bool = False

    FLAGS = ("sinks", "chunked", "varlen", "paged")

    def __post_init__(self):
        if self.softcap is not None:
            object.__setattr__(self, "softcap", check_positive_number(self.softcap, "softcap"))
        for name in self.FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.paged:      # packed queries, aligned to the end of each sequence's keys
            object.__setattr__(self, "varlen", True)
            object.__setattr__(self, "chunked", True)

    @property
    def tag(self) -> str:
        parts = [f"sc{self.softcap:g}".replace(".", "p")] if self.softcap is not None else []
        implied = ("chunked", "varlen") if self.paged else ()    # a paged kernel's name says paged
        parts += [name for name in self.FLAGS if getattr(self, name) and name not in implied]
        return "".join(f"_{p}" for p in parts)

    def describe(self) -> str:
        parts = [f"softcap {self.softcap:g}"] if self.softcap is not None else []
        if self.sinks:
            parts.append("attention sinks")
        if self.paged:
            parts.append("keys from a paged cache through a block table, queries the last of "
                         "each sequence's keys")
        elif self.chunked:
            parts.append("queries after a cached prefix (S_q <= S_k)")
        if self.varlen and not self.paged:
            parts.append("packed variable-length sequences")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"softcap": self.softcap, "sinks": self.sinks, "chunked": self.chunked,
                "varlen": self.varlen, "paged": self.paged}


@dataclass(frozen=True)
class Family:
    """What a caller selects on: mask, GQA ratio, features (head_dim and dtype dispatch later)."""

    mask: Mask
    gqa: int
    features: Features = Features()

    def __post_init__(self):
        check_gqa(self.gqa)

    @property
    def key(self) -> str:
        """A string naming the family exactly (the ``attngen::`` ops' variant argument)."""
        f = self.features
        return (f"{self.mask.tag}_g{self.gqa}" + (f"_softcap{f.softcap!r}" if f.softcap is not None else "")
                + "".join(f"_{name}" for name in f.FLAGS if getattr(f, name)))

    def describe(self) -> str:
        """The query that selects this family, as ``get_kernel`` arguments."""
        parts = [f"window={self.mask.window!r}", f"causal={self.mask.causal}", f"gqa={self.gqa}"]
        parts += [f"{k}={v!r}" for k, v in self.features.as_dict().items() if v not in (None, False)]
        return ", ".join(parts)


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its name in the kernel, its kind and what the launcher passes.

    kinds: ``io`` (an fp16/bf16 array: (B, H, S, D), or (total, H, D) packed), ``acc`` (an
    fp32 array of the same shape: the dQ accumulator), ``rows`` (one fp32 value per query
    row: (B, H, S), or (total, H) packed), ``part`` and ``partrows`` (a paged variant's
    partial outputs and their log-sum-exp, fp32 (splits, total, H, D) and (splits, total, H)),
    ``f32[]`` and ``i32[]`` (1-D arrays), ``i32[,]`` (a 2-D int32 array: the block table),
    ``f32`` and ``i32`` (scalars); a kind + ``64`` is that kind indexed with 64-bit shapes and
    strides (:data:`WIDE_KINDS`).
    """

    name: str
    kind: str
    arg: str


def compiled_by_default(suffix: str) -> bool:
    """Whether `attngen build` compiles the kernel of ``suffix`` (a key of a
    ``KernelSpec.kernels``) ahead of time by default: every kernel but the 64-bit twins (``_i64``,
    for tensors past 2^31 elements; without TMA, they take longer to compile than all the
    others), which cuTile compiles the first time a call needs them (logged once), or
    `attngen build --all` ahead of time.  The one place this rule lives."""
    return not suffix.endswith("_i64")


#: the parameter kinds that are large arrays: their ``_i64`` twins index them with 64 bits
WIDE_KINDS = ("io", "rows", "acc", "part", "partrows")


def _wide_twins(kernels: dict[str, tuple[Param, ...]]) -> dict[str, tuple[Param, ...]]:
    """Each kernel's ``_i64`` twin: the same parameters, its large arrays with 64-bit shapes
    and strides."""
    return {suffix + "_i64": tuple(replace(p, kind=p.kind + "64") if p.kind in WIDE_KINDS else p
                                   for p in params) for suffix, params in kernels.items()}


@dataclass(frozen=True)
class KernelSpec:
    """Everything one generated kernel is specialized on, its tiles included: the forward's
    (``tiles``), the fused backward's (``fused_tiles``; None where the head dim's backward is
    the two-kernel one: then no fused kernel is generated), the dQ kernel's (``dq_tiles``)
    and the dK/dV kernel's (``dkdv_tiles``).  All are fixed when the spec is made;
    :meth:`tuned` fills them from the tuned tables (:mod:`attngen.core.tuning`), and a tuner
    tries other tiles with :func:`dataclasses.replace`."""

    mask: Mask
    gqa: int
    head_dim: int
    dtype: str
    tiles: Tiles
    features: Features = Features()
    _: KW_ONLY
    fused_tiles: Tiles | None
    dq_tiles: Tiles
    dkdv_tiles: Tiles

    #: the fields that hold a backward kernel's tiles
    BACKWARD_TILES = ("fused_tiles", "dq_tiles", "dkdv_tiles")

    def __post_init__(self):
        check_gqa(self.gqa)
        check_head_dim(self.head_dim)
        check_dtype(self.dtype)
        for name in self.BACKWARD_TILES:
            value = getattr(self, name)
            if not isinstance(value, Tiles) and not (name == "fused_tiles" and value is None):
                raise ValueError(f"{name} must be Tiles{' or None' if name == 'fused_tiles' else ''}, "
                                 f"got {value!r}")
        if self.gqa % self.tiles.pack:
            raise ValueError(f"tiles.pack ({self.tiles.pack}) must divide gqa ({self.gqa})")
        forced = forced_pack(self.features.varlen, self.features.paged)
        if forced is not None and self.tiles.pack != forced:
            raise ValueError(f"varlen kernels take one query head per tile (tiles.pack {forced})")

    @classmethod
    def tuned(cls, mask: Mask, gqa: int, head_dim: int, dtype: str, features: Features = Features(),
              tiles: Tiles | None = None) -> "KernelSpec":
        """The variant with every kernel's tiles from the tuned tables as they are now
        (``tiles``, if given, in place of the forward's): what the spec reader, the registry
        and the bench make.  The one place the tables are read for a spec."""
        check_head_dim(head_dim)
        tiles = tiles or tiles_for(head_dim, mask, gqa, features.varlen, features.paged)
        return cls(mask, gqa, head_dim, dtype, tiles, features, **cls._tuned_backward(head_dim))

    @staticmethod
    def _tuned_backward(head_dim: int) -> dict:
        return {"fused_tiles": fused_tiles(head_dim), "dq_tiles": dq_tiles(head_dim),
                "dkdv_tiles": dkdv_tiles(head_dim)}

    @property
    def family(self) -> Family:
        return Family(self.mask, self.gqa, self.features)

    @property
    def tile_d(self) -> int:
        """Head dimension padded to a power of two (tile extents must be powers of two)."""
        return 1 << (self.head_dim - 1).bit_length()

    @property
    def params(self) -> tuple[Param, ...]:
        """The inference kernel's parameters, in order (``kernels[""]``)."""
        return self.kernels[""]

    @property
    def kernels(self) -> dict[str, tuple[Param, ...]]:
        """Every kernel of the variant, by the suffix of its name, with its parameters in
        order: the inference forward (``""``); the forward that also saves the row
        log-sum-exp for autograd (``"_fwd"``); the backward: two kernels that write every
        element once, ``"_dq"`` (which computes delta first and stores it) and ``"_dkdv"``
        (launched after it, reading delta); and, for head dims where it is the faster one
        (``fused_tiles``; then the default, the two kernels being deterministic mode), the
        fused backward in three kernels: ``"_pre"`` (each row's delta = rowsum(dO * O), and
        the fp32 dQ accumulator zeroed), ``"_bwd"`` (one program per KV block: dK, dV, and the
        block's share of dQ added atomically into the accumulator) and ``"_post"`` (dQ scaled
        and cast from the accumulator).  The kernels' signatures, the AOT signatures and the launcher's
        argument lists are all generated from these lists.  Each feature adds its own
        parameters here: sinks a logit per head (and, where delta is computed, the output's
        rounding residual), varlen the sequence offsets, softcap changes what the scale
        means.

        Each kernel has a twin, its suffix + ``"_i64"``, whose ``io``/``rows``/``acc`` arrays
        (``io64``/``rows64``/``acc64``) take 64-bit shapes and strides: the launcher runs it
        only for tensors past 2^31 elements, because 64-bit indexing made the forward 35-48 %
        slower (H100, shapes A, B, C; docs/performance.md)."""
        f = self.features
        out = "out" if f.varlen else "o"
        sinks = [Param("Sinks", "f32[]", "prepare_sinks(sinks, heads, q.device, NAME)")] if f.sinks else []
        if f.softcap is not None:
            qk_scale = Param("qk_scale_over_cap", "f32", "scale_arg(scale, HEAD_DIM, SOFTCAP)")
        else:
            qk_scale = Param("qk_scale_log2", "f32", "scale_arg(scale, HEAD_DIM)")
        if f.paged:
            return self._paged_kernels(sinks, qk_scale)
        # with sinks, delta = rowsum(dO * O) needs O as the forward had it in fp32, not rounded
        # to the output dtype: the forward also keeps what the rounding lost (see the template)
        residual = [Param("Res", "io", "res")] if f.sinks else []
        if f.varlen and f.chunked:
            offsets = [Param("CuQ", "i32[]", "cu_q"), Param("CuK", "i32[]", "cu_k")]
        elif f.varlen:
            offsets = [Param("Cu", "i32[]", "cu_q")]
        else:
            offsets = []
        q_offsets = offsets[:1]     # kernels over query rows alone
        qkv = [Param("Q", "io", "q"), Param("K", "io", "k"), Param("V", "io", "v")]
        grads_in = [Param("dO", "io", "dout"), Param("Lse", "rows", "lse"), Param("Delta", "rows", "delta")]
        softmax_scale = Param("scale", "f32", "softmax_scale(scale, HEAD_DIM)")
        dq_acc = Param("dQacc", "acc", "dq_acc")
        fused = {
            "_pre": (Param("Out", "io", out), *residual, Param("dO", "io", "dout"),
                     Param("Delta", "rows", "delta"), dq_acc, *q_offsets),
            "_bwd": (*qkv, *grads_in, dq_acc, Param("dK", "io", "dk"), Param("dV", "io", "dv"),
                     *offsets, qk_scale, softmax_scale),
            "_post": (dq_acc, Param("dQ", "io", "dq"), *q_offsets, softmax_scale),
        } if self.fused_tiles else {}
        narrow = {
            "": (*qkv, Param("Out", "io", out), *sinks, *offsets, qk_scale),
            "_fwd": (*qkv, Param("Out", "io", out), Param("Lse", "rows", "lse"), *residual, *sinks,
                     *offsets, qk_scale),
            **fused,
            "_dq": (*qkv, Param("Out", "io", out), *residual, *grads_in, Param("dQ", "io", "dq"),
                    *offsets, qk_scale, softmax_scale),
            "_dkdv": (*qkv, *grads_in, Param("dK", "io", "dk"), Param("dV", "io", "dv"), *offsets,
                      qk_scale, softmax_scale),
        }
        return {**narrow, **_wide_twins(narrow)}

    @staticmethod
    def _paged_kernels(sinks: list[Param], qk_scale: Param) -> dict[str, tuple[Param, ...]]:
        """A paged variant's kernels: inference only.  ``""`` reads keys and values from the
        cache (``K``, ``V``: the caches' pages flattened, (pages * page, H_kv, D), ``page``
        keys a page) through the block table ``Pages`` (B, max pages), sequence b's keys being
        its first ``SeqK[b]`` cache positions; ``"_split"`` does the same over one of
        ``splits`` slices of each query tile's key range, writing an fp32 partial output and
        its log-sum-exp (for few, long sequences: decode); ``"_combine"`` merges the slices
        (and the sinks) into the output.  Those two read a KV block in one load, so they take
        pages that hold whole blocks (a multiple of BLOCK_N keys); ``"_pieces"`` and
        ``"_split_pieces"``, the same over any page size (a multiple of PAGE_ROWS), read a
        block in pieces of PAGE_ROWS keys.  Each has its ``_i64`` twin."""
        cache = (Param("Q", "io", "q"), Param("K", "io", "k_rows"), Param("V", "io", "v_rows"))
        where = (Param("CuQ", "i32[]", "cu_q"), Param("SeqK", "i32[]", "seqused_k"),
                 Param("Pages", "i32[,]", "block_table"), Param("page", "i32", "page"))
        partial = (Param("Part", "part", "part"), Param("PartLse", "partrows", "part_lse"))
        narrow = {
            "": (*cache, Param("Out", "io", "out"), *sinks, *where, qk_scale),
            "_split": (*cache, *partial, *where, qk_scale),
            "_combine": (*partial, Param("Out", "io", "out"), *sinks, Param("CuQ", "i32[]", "cu_q")),
        }
        narrow.update({"_pieces": narrow[""], "_split_pieces": narrow["_split"]})
        return {**narrow, **_wide_twins(narrow)}

    def as_dict(self) -> dict:
        return {**self._forward_dict(), "fused_tiles": self.fused_tiles and self.fused_tiles.as_dict(),
                "dq_tiles": self.dq_tiles.as_dict(), "dkdv_tiles": self.dkdv_tiles.as_dict()}

    def _forward_dict(self) -> dict:
        return {"mask": self.mask.as_dict(), "gqa": self.gqa, "head_dim": self.head_dim,
                "dtype": self.dtype, "tiles": self.tiles.as_dict(), "features": self.features.as_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelSpec":
        """The inverse of :meth:`as_dict`.  A dict written before the backward's tiles were
        fields of the spec (a manifest or launcher of an older attngen, whose kernels are
        stale anyway) takes them from the tuned tables, so that it still reads."""
        if "dkdv_tiles" in data:
            backward = {name: None if data[name] is None else Tiles(**data[name])
                        for name in cls.BACKWARD_TILES}
        else:
            backward = cls._tuned_backward(data["head_dim"])
        return cls(Mask(**data["mask"]), data["gqa"], data["head_dim"], data["dtype"],
                   Tiles(**data["tiles"]), Features(**data["features"]), **backward)

    @property
    def _dq_tag(self) -> str:
        """The dQ tiles in the hash where they differ from dK/dV's (names stay as they were)."""
        return "" if self.dq_tiles == self.dkdv_tiles else "dq" + self.dq_tiles.tag

    @property
    def hash(self) -> str:
        """Eight hex digits of a hash of every field and the generator's fingerprint.  The
        backward's tiles enter as tags after the other fields: dK/dV's, then dQ's only where
        they differ from dK/dV's, then the fused kernel's where there is one; so a spec whose
        dQ tiles equal its dK/dV tiles is named by the same rule as before dQ had tiles of
        its own."""
        text = (json.dumps(self._forward_dict(), sort_keys=True) + self.dkdv_tiles.tag + self._dq_tag
                + ("fused" + self.fused_tiles.tag if self.fused_tiles else "") + fingerprint())
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def name(self) -> str:
        """Canonical name: file name, module name, registry key, cache key and test id."""
        return (f"{self.mask.tag}{self.features.tag}_g{self.gqa}_d{self.head_dim}_{self.dtype}"
                f"_{self.tiles.tag}_{self.hash}")

    def describe(self) -> str:
        extra = self.features.describe()
        return (f"{self.mask.describe()}{'; ' + extra if extra else ''}; gqa {self.gqa}; "
                f"head_dim {self.head_dim}; {self.dtype}; "
                f"tiles {self.tiles.block_m}x{self.tiles.block_n}, occupancy "
                f"{self.tiles.occupancy}, {self.tiles.num_ctas} CTA(s) per cluster"
                + (f", {self.tiles.pack} query heads per tile" if self.tiles.pack > 1 else ""))
