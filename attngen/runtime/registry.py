"""Selecting built kernels at run time.

``get_kernel(window=4096, gqa=4)`` names the semantics (mask and GQA ratio); the callable
it returns picks the kernel for the head_dim and dtype of the tensors it is given.  The
registry reads the manifests of the build directories (``ATTNGEN_PATH``, a
``os.pathsep``-separated list; default: ``attngen build``'s default output) and of its
on-demand cache.  A valid query with no built kernel is generated once into the on-demand
cache (``<cache>/jit``), logged, unless ``ATTNGEN_JIT=0``; then it is an error that lists
the nearest kernels that exist.  A kernel built by another attngen, cuTile or template
version is never used: it is regenerated, or, with ``ATTNGEN_JIT=0``, an error that names
the command that rebuilds it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

from ..core.mask import Mask, MaskError
from ..core.support import (HEAD_DIMS, ArgumentError, check_deterministic, check_dtype, check_head_dim,
                            check_positive_number, dtype_name)
from ..core.variant import Family, Features, KernelSpec
from ..generate.build import build
from ..generate.codegen import load_package
from ..generate.spec import Spec
from ..generate.store import KernelEntry, SpecEntry, default_out, jit_dir, read_manifest
from .inputs import InputError, autocast
from .ops import attention, paged_attention, register_resolver

log = logging.getLogger("attngen")


class KernelNotFound(LookupError):
    """No usable kernel fits the query; the message lists the nearest ones or the rebuild."""


def _describe(family: Family, head_dim=None, dtype=None) -> str:
    extra = [f"head_dim={head_dim}"] if head_dim is not None else []
    extra += [f"dtype={dtype}"] if dtype is not None else []
    return ", ".join([family.describe(), *extra])


class Registry:
    """The kernels in a set of build directories plus the on-demand cache."""

    def __init__(self, paths: list[str | Path] | None = None, jit_dir: str | Path | None = None,
                 jit: bool | None = None):
        self._paths = [Path(p) for p in paths] if paths is not None else None
        self._jit_dir = Path(jit_dir) if jit_dir is not None else None
        self._jit = jit
        self._lock = threading.RLock()
        self._kernels: dict[str, tuple[KernelEntry, Path]] | None = None
        self._specs: dict[str, SpecEntry] = {}
        self._modules: dict[str, object] = {}
        self._chosen: dict[tuple[Family, int, str], object] = {}

    # -- configuration, resolved late so environment changes before first use count --------
    @property
    def paths(self) -> list[Path]:
        if self._paths is not None:
            return self._paths
        env = os.environ.get("ATTNGEN_PATH")
        return [Path(p) for p in env.split(os.pathsep) if p] if env else [default_out()]

    @property
    def jit_dir(self) -> Path:
        return self._jit_dir if self._jit_dir is not None else jit_dir()

    @property
    def jit(self) -> bool:
        return self._jit if self._jit is not None else os.environ.get("ATTNGEN_JIT", "1") != "0"

    # -- index --------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget what was read; the next lookup reads the manifests again."""
        with self._lock:
            self._kernels = None
            self._specs = {}
            self._chosen = {}

    def _index(self) -> dict[str, tuple[KernelEntry, Path]]:
        """Built name -> (entry, directory), first directory first."""
        with self._lock:
            if self._kernels is None:
                kernels: dict[str, tuple[KernelEntry, Path]] = {}
                for directory in [*self.paths, self.jit_dir]:
                    manifest = read_manifest(directory)
                    for name, entry in manifest.kernels.items():
                        kernels.setdefault(name, (entry, directory))
                    for name, entry in manifest.specs.items():
                        self._specs.setdefault(name, entry)
                self._kernels = kernels
            return self._kernels

    def kernels(self) -> list[KernelSpec]:
        """The usable kernels (built by this attngen, cuTile and templates)."""
        return [entry.spec for entry, _ in self._index().values() if not entry.stale]

    def specs(self) -> dict[str, SpecEntry]:
        self._index()
        return dict(self._specs)

    def _match(self, tuned: KernelSpec) -> KernelSpec | None:
        """The built kernel for ``tuned``'s query (family, head_dim, dtype): ``tuned`` itself
        where it is built, else one with its forward tiles, else any (first by name); never a
        tuner's candidate when the tuned kernel is there."""
        found = sorted((k for k in self.kernels() if k.family == tuned.family and k.head_dim == tuned.head_dim
                        and k.dtype == tuned.dtype), key=lambda k: k.name)
        return next((k for k in found if k == tuned),
                    next((k for k in found if k.tiles == tuned.tiles), found[0] if found else None))

    def has_family(self, family: Family) -> bool:
        return any(k.family == family for k in self.kernels())

    def nearest(self, family: Family, limit: int = 5) -> list[str]:
        def distance(k: KernelSpec):
            m = k.mask
            reach = lambda x: -1 if x is None else x   # noqa: E731
            return (m.causal != family.mask.causal,
                    abs(reach(m.left) - reach(family.mask.left)) + abs(reach(m.right) - reach(family.mask.right)),
                    abs(k.gqa - family.gqa))
        groups: dict[Family, list[KernelSpec]] = {}
        for k in sorted(self.kernels(), key=distance):
            groups.setdefault(k.family, []).append(k)
        return [f"{fam.describe()} (head_dim/dtype: "
                f"{', '.join(sorted({f'{k.head_dim}/{k.dtype}' for k in ks}))})"
                for fam, ks in list(groups.items())[:limit]]

    def not_found(self, family: Family, head_dim=None, dtype=None) -> KernelNotFound:
        stale = [(entry, directory) for entry, directory in self._index().values()
                 if entry.stale and entry.spec.family == family
                 and head_dim in (None, entry.spec.head_dim) and dtype in (None, entry.spec.dtype)]
        if stale:
            entry, directory = stale[0]
            sources = sorted({s.source for s in read_manifest(directory).specs.values()
                              if entry.name in s.kernels})
            command = f"attngen build {' '.join(sources) or 'SPEC...'} --out {directory}"
            return KernelNotFound(
                f"the kernel for {_describe(family, head_dim, dtype)} in {directory} ({entry.name}) "
                f"was built by another attngen, cuTile or template version and cannot be used; "
                f"rebuild it with `{command}` (or allow on-demand generation: unset ATTNGEN_JIT=0)")
        near = self.nearest(family)
        where = ", ".join(str(p) for p in [*self.paths, self.jit_dir])
        listing = "\n  ".join(near) if near else "(none: run `attngen build SPEC...`)"
        return KernelNotFound(
            f"no built kernel for {_describe(family, head_dim, dtype)} in {where} and "
            f"on-demand generation is off (ATTNGEN_JIT=0). Nearest available:\n  {listing}")

    # -- launchers ----------------------------------------------------------------------
    def module(self, spec: KernelSpec):
        """The generated launcher module of exactly ``spec``: built, or generated now into the
        on-demand cache (logged).  The one way anything gets a launcher."""
        with self._lock:
            if spec.name not in self._modules:
                if spec.name not in self._index():
                    log.warning("attngen: no built kernel %s; generating it into %s "
                                "(prebuild it with `attngen build` to skip this)", spec.name, self.jit_dir)
                    build([Spec(f"jit-{spec.name}", "attngen.get_kernel", (spec,))], self.jit_dir,
                          archs=(), keep_existing=True)
                    self.refresh()
                _, directory = self._index()[spec.name]
                self._modules[spec.name] = load_package(directory / spec.name).launcher
            return self._modules[spec.name]

    def ensure(self, spec: KernelSpec):
        """The ``launch`` function of exactly ``spec`` (see :meth:`module`)."""
        return self.module(spec).launch

    def variant(self, family: Family, head_dim: int, dtype: str):
        """The launcher module of the kernel for these semantics, head_dim and dtype (the
        tuned one where several are built; generated on demand when none is)."""
        chosen = self._chosen.get((family, head_dim, dtype))
        if chosen is not None:
            return chosen
        with self._lock:
            tuned = KernelSpec.tuned(family.mask, family.gqa, head_dim, dtype, family.features)
            spec = self._match(tuned)
            if spec is None:
                if not self.jit:
                    raise self.not_found(family, head_dim, dtype)
                spec = tuned
            chosen = self._chosen[(family, head_dim, dtype)] = self.module(spec)
            return chosen

    def launcher(self, family: Family, head_dim: int, dtype: str):
        """The ``launch`` function of the kernel for these semantics, head_dim and dtype."""
        return self.variant(family, head_dim, dtype).launch


class AttentionKernel:
    """A callable for one mask and GQA ratio; the kernel for the inputs' head_dim and dtype is
    picked when it runs.  Calls go through the ``attngen::`` custom ops (:mod:`attngen.runtime.ops`):
    torch.compile traces them without graph breaks and CUDA graphs capture them."""

    def __init__(self, family: Family, registry: Registry, scale: float | None = None,
                 head_dim: int | None = None, deterministic: bool | None = None):
        self.family, self.registry, self.scale, self.head_dim = family, registry, scale, head_dim
        self.deterministic = check_deterministic(deterministic)
        self.key = family.key + ("" if registry is default_registry else f"@{id(registry):x}")
        register_resolver(self.key, functools.partial(registry.variant, family))

    def __repr__(self):
        return (f"{type(self).__name__}({_describe(self.family, self.head_dim)}, scale={self.scale}"
                + (f", deterministic={self.deterministic}" if self.deterministic is not None else "") + ")")

    def _check_head(self, q, fail) -> None:
        """q's dtype and head_dim are ones this callable can run."""
        head_dim = q.shape[-1]
        if dtype_name(q.dtype) is None:
            fail(f"q has dtype {q.dtype}; attngen kernels take torch.float16, torch.bfloat16")
        if self.head_dim is not None and head_dim != self.head_dim:
            fail(f"this kernel was asked for head_dim {self.head_dim}, q has {head_dim}")
        if head_dim not in HEAD_DIMS:
            fail(f"head_dim {head_dim} is not supported; attngen kernels take {list(HEAD_DIMS)}")

    def _check_sinks(self, sinks, fail) -> None:
        if self.family.features.sinks and sinks is None:
            fail("this kernel has attention sinks: pass sinks=, one logit per query head")
        if not self.family.features.sinks and sinks is not None:
            fail("sinks= given, but this kernel has none: get_kernel(..., sinks=True)")

    def __call__(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, *,
                 max_seqlen_k=None, scale: float | None = None, sinks=None, out=None, layout="bhsd",
                 deterministic: bool | None = None, return_lse: bool = False):
        """Attention of ``q`` over ``k, v``.  Packed sequences (``varlen``) take
        ``cu_seqlens_q`` (and ``cu_seqlens_k``, ``max_seqlen_q``, ``max_seqlen_k``), the others
        ``layout=``; ``sinks=`` where the kernel has sinks; ``out=`` to write into a tensor.
        ``deterministic`` (default: the kernel's, see :func:`get_kernel`) picks the backward:
        True, identical gradient bits every run; False, the head dim's default backward.
        ``return_lse=True`` returns ``(out, lse)``: each query row's log-sum-exp, natural log,
        fp32, (B, H, S_q) or (total_q, H), sinks included, without gradient."""
        import torch

        f = self.family.features
        dims = 3 if f.varlen else 4

        def fail(message):
            raise InputError(f"{self.key}: {message}")

        if not isinstance(q, torch.Tensor) or q.dim() != dims:
            fail(f"q must be a {dims}-D torch.Tensor, got {getattr(q, 'shape', type(q))}")
        q, k, v = autocast(q, k, v)                 # under torch.autocast, its dtype, as SDPA
        self._check_head(q, fail)
        packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        if f.varlen and cu_seqlens_q is None:
            fail("this kernel takes packed sequences: pass cu_seqlens_q")
        if not f.varlen and any(x is not None for x in packed):
            fail("cu_seqlens/max_seqlen are for packed sequences: get_kernel(..., varlen=True)")
        if f.varlen and layout != "bhsd":
            fail("packed sequences are (total_tokens, H, D); layout= does not apply")
        self._check_sinks(sinks, fail)
        return attention(self.key, q, k, v, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                         scale=self.scale if scale is None else scale, layout=layout, out=out,
                         deterministic=self.deterministic if deterministic is None
                         else check_deterministic(deterministic), return_lse=return_lse)


class PagedAttentionKernel(AttentionKernel):
    """A callable for one mask and GQA ratio over a paged K/V cache (``get_kernel(...,
    paged=True)``): the call a serving engine makes per layer.  Inference only; calls go
    through ``attngen::paged_attention``."""

    def __call__(self, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, max_seqlen_q=None, *,
                 scale: float | None = None, sinks=None, out=None, splits: int | None = None,
                 check: bool | None = None, return_lse: bool = False):
        """Packed queries ``q`` (total_q, H, D), sequence b's rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``,
        over the first ``seqused_k[b]`` positions of its pages ``block_table[b]`` in ``k_cache,
        v_cache`` (pages, page_size, H_kv, D); its queries are the last of them.  See a paged
        launcher's ``launch`` for ``check`` (host checks, skipped while a CUDA graph is
        captured), ``splits`` and ``return_lse`` ((out, lse), lse (total_q, H) fp32, natural log)."""
        import torch

        def fail(message):
            raise InputError(f"{self.key}: {message}")

        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            fail(f"q must be a 3-D torch.Tensor (total_q, H, D), got {getattr(q, 'shape', type(q))}")
        self._check_head(q, fail)
        self._check_sinks(sinks, fail)
        return paged_attention(self.key, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table,
                               max_seqlen_q=max_seqlen_q, sinks=sinks, scale=self.scale if scale is None else scale,
                               out=out, splits=splits, check=check, return_lse=return_lse)


default_registry = Registry()


def get_kernel(window: int | dict | tuple | Mask | None = None, *, causal: bool | None = None,
               gqa: int = 1, softcap: float | None = None, sinks: bool = False,
               chunked: bool = False, varlen: bool = False, paged: bool = False, head_dim: int | None = None,
               dtype: str | None = None, scale: float | None = None,
               deterministic: bool | None = None, registry: Registry | None = None) -> AttentionKernel:
    """The attention callable for a window (see :class:`attngen.Mask`; a ``Mask`` itself is
    taken as it is), GQA ratio and features (:class:`attngen.core.variant.Features`: softcap,
    sinks, chunked prefill, packed sequences, a paged K/V cache).  ``causal`` defaults to True
    for a window.  ``paged=True`` returns a :class:`PagedAttentionKernel` (inference over a
    paged cache, queries packed and aligned to the end of each sequence's keys).

    ``deterministic`` picks the backward: None (default) follows
    ``torch.use_deterministic_algorithms``; True always gives identical gradient bits run to
    run (two kernels, no atomics); False always takes the head dim's default backward: the
    faster one, measured — at head_dim 256 a fused kernel that adds dQ atomically (its last
    bits may differ run to run), elsewhere the same two kernels.

    ``head_dim``/``dtype``, when given, must have a kernel now (built, or generated on
    demand); otherwise they are picked from the tensors at call time.

    Every argument attngen cannot accept raises :class:`attngen.ArgumentError` (a
    ValueError); a bad window or causality its subclass :class:`attngen.MaskError`.
    """
    reg = registry or default_registry
    if isinstance(window, Mask):
        if causal is not None and causal != window.causal:
            raise MaskError(f"causal={causal} contradicts the mask given ({window.describe()})")
        mask = window
    else:
        mask = Mask.from_window(window, True if causal is None else causal)
    family = Family(mask, gqa, Features(softcap, sinks, chunked, varlen, paged))
    if paged and deterministic is not None:
        raise ArgumentError("deterministic= picks a backward; a paged kernel has none")
    if head_dim is not None:
        check_head_dim(head_dim)
    if dtype is not None:
        check_dtype(dtype)
    if scale is not None:
        check_positive_number(scale, "scale")
    if not reg.jit and not reg.has_family(family):
        raise reg.not_found(family, head_dim, dtype)
    if head_dim is not None and dtype is not None:
        reg.launcher(family, head_dim, dtype)
    if family.features.paged:
        return PagedAttentionKernel(family, reg, scale, head_dim)
    return AttentionKernel(family, reg, scale, head_dim, deterministic)


def get_layer_kernels(model: str, *, registry: Registry | None = None) -> list[AttentionKernel]:
    """One callable per layer of a model spec (a spec with ``layers``), in layer order."""
    reg = registry or default_registry
    specs = reg.specs()
    entry = specs.get(model)
    if entry is None or entry.layers is None:
        models = sorted(n for n, e in specs.items() if e.layers is not None)
        raise KernelNotFound(f"no built model spec named {model!r}; built: {models or 'none'}")
    kernels: dict[Mask, AttentionKernel] = {}
    for mask in entry.layers:
        if mask not in kernels:
            kernels[mask] = AttentionKernel(Family(mask, entry.gqa, entry.features), reg,
                                            entry.scale, entry.head_dim)
    return [kernels[mask] for mask in entry.layers]
