"""The cubins `attngen build` compiled, launched at call time without the tile compiler.

cuTile launches a ``@ct.kernel`` through its dispatcher: for each new combination of
argument properties it derives a :class:`~cuda.tile.compilation.KernelSignature` from the
arguments and asks the kernel's ``_compile(signature, context, compute_capability)`` for a
cubin and the symbol to launch; it then marshals the arguments itself (pointers, shapes,
strides, scalars, as the signature's calling convention lays them out) and launches on the
caller's stream.  :class:`Prebuilt` is that kernel with one change: when the signature the
call needs *implies* the signature the build exported (:func:`attngen.generate.aot.signature`:
a calling convention that lays the parameters out alike, the same dtypes, ranks and index
widths, and every assumption the build made — non-negative strides, unit last stride, 16-byte
aligned base addresses, no aliasing — holds for these arguments) and a cubin of the device's
arch was built, it returns that cubin and its symbol: no cuTile front end, no tileiras.
Otherwise (a kernel the build left to first need, another arch, arguments that break an
assumption) it compiles as cuTile always does, and says so once on the ``attngen`` logger.
Argument marshalling, streams and CUDA-graph capture stay cuTile's.

A cubin is valid for every call whose signature implies the one it was compiled for: the
kernel's parameter layout depends only on the dtypes, ranks, index widths and calling
convention (all required to agree), and every other constraint — a size known as a constant
(cuTile specializes sizes of 1), divisibility, stride bounds, alignment, aliasing — is an
assumption the compiler may use, so a call that satisfies more assumptions than the build
made is still served correctly by it (tests/test_prebuilt_gpu.py runs a batch of one, whose
size cuTile knows, on a cubin built for any size).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cuda.tile as ct
from cuda.tile.compilation import ArrayConstraint, CallingConvention

from ..core.variant import KernelSpec
from ..generate.aot import signature
from ..generate.store import cubin_name

log = logging.getLogger("attngen")

_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()

#: each call a built cubin could not serve because its parameters are laid out otherwise
#: (:func:`layout_differs`): never the arguments' doing, so the generated suites fail on one
layout_misses: list[str] = []


def prebuilt(kernel: ct.kernel, suffix: str, spec_dict: dict, launcher_file: str) -> "Prebuilt":
    """``kernel`` (the ``suffix`` kernel of the variant ``spec_dict``), launching the cubins
    built beside ``launcher_file`` where they fit the call."""
    options = kernel._compiler_options
    return Prebuilt(kernel._pyfunc, num_ctas=options.num_ctas, occupancy=options.occupancy,
                    opt_level=options.opt_level, num_worker_warps=options.num_worker_warps
                    )._built(KernelSpec.from_dict(spec_dict), suffix, Path(launcher_file).parent)


class Prebuilt(ct.kernel):
    """A generated kernel that launches its built cubin when the call's signature allows."""

    def _built(self, spec: KernelSpec, suffix: str, directory: Path) -> "Prebuilt":
        self.spec, self.suffix, self.directory = spec, suffix, directory
        self.name = self._pyfunc.__name__        # what the build named its cubin and symbol after
        self._signature = None
        return self

    @property
    def built_signature(self):
        """The signature the build exported this kernel for (its symbol filled in)."""
        if self._signature is None:
            self._signature = signature(self.spec, self.spec.kernels[self.suffix]
                                        ).with_mangled_symbol(self.name)
        return self._signature

    def cubin(self, arch: str) -> Path:
        """Where `attngen build` writes this kernel's cubin for ``arch``."""
        return self.directory / cubin_name(self.name, arch)

    def lookup(self, call_signature, arch: str) -> tuple[bytes, str] | str:
        """The built (cubin, symbol) that serves a call of ``call_signature`` on ``arch``, or
        why none does."""
        path = self.cubin(arch)
        if not path.is_file():
            return f"no cubin for {arch} was built ({path.name})"
        built = self.built_signature
        why = layout_differs(call_signature, built)
        if why:
            layout_misses.append(f"{self.name}: {why}")
            return f"the built cubin takes its parameters otherwise: {why}"
        why = unmet(call_signature, built)
        if why:
            return f"the call's arguments break an assumption of the built cubin: {why}"
        return path.read_bytes(), built.symbol

    def _compile(self, signature, context, compute_capability=None):
        from cuda.tile._cext import get_compute_capability
        from cuda.tile._compile import format_sm_arch

        arch = format_sm_arch(*(compute_capability or get_compute_capability()))
        found = self.lookup(signature, arch)
        if not isinstance(found, str):
            cubin, symbol = found
            return cubin, symbol, None, ()
        _say_once(self.name, found)
        return super()._compile(signature, context, compute_capability)


def _say_once(name: str, why: str) -> None:
    with _said_lock:
        if (name, why) in _said:
            return
        _said.add((name, why))
    log.warning("attngen: compiling %s now (%s)", name, why)


def _conventions_agree(call, built) -> bool:
    """Whether a call under ``call``'s calling convention may launch a kernel exported under
    ``built``'s.  cuTile 1.7's dispatcher launches a call under ``cutile_python_v2`` when it
    knows a size (an axis of length 1) and under ``cutile_python_v1`` otherwise (a batch of
    two, packed varlen rows).  For a signature that fixes no size, which is what `attngen
    build` exports, the two conventions lay out the parameters alike: the same kernel exported
    under each compiles to the same code but for its symbol (tests/test_prebuilt.py compares
    them), so the one cubin serves calls of either."""
    if call.calling_convention.code == built.calling_convention.code:
        return True
    both = {CallingConvention.cutile_python_v1().code, CallingConvention.cutile_python_v2().code}
    fixes_a_size = any(isinstance(p, ArrayConstraint) and any(n is not None for n in p.shape_constant)
                       for p in built.parameters)
    return {call.calling_convention.code, built.calling_convention.code} == both and not fixes_a_size


def layout_differs(call, built) -> str:
    """How the ``call`` signature's parameters are laid out unlike the ``built`` one's ("" when
    alike): calling convention, count, kinds, dtypes, ranks, index widths.  Unlike an unmet
    assumption, never the doing of the call's arguments: a build the run time cannot use."""
    if not _conventions_agree(call, built):
        return f"calling convention {call.calling_convention.name}, built {built.calling_convention.name}"
    if len(call.parameters) != len(built.parameters):
        return f"{len(call.parameters)} parameters, built {len(built.parameters)}"
    for index, (have, need) in enumerate(zip(call.parameters, built.parameters)):
        if type(have) is not type(need):
            return f"parameter {index}: {type(have).__name__}, built {type(need).__name__}"
        if not isinstance(need, ArrayConstraint):
            if have != need:
                return f"parameter {index}: {have}, built {need}"
            continue
        for attr in ("dtype", "ndim", "index_dtype"):
            if getattr(have, attr) != getattr(need, attr):
                return f"parameter {index}: {attr} {getattr(have, attr)}, built {getattr(need, attr)}"
    return ""


def unmet(call, built) -> str:
    """What of the ``built`` signature's assumptions the ``call`` signature, laid out alike
    (:func:`layout_differs`), does not guarantee ("" when it implies all of them)."""
    for index, (have, need) in enumerate(zip(call.parameters, built.parameters)):
        why = _unmet_param(have, need) if isinstance(need, ArrayConstraint) else ""
        if why:
            return f"parameter {index}: {why}"
    return _unmet_aliasing(call.parameters, built.parameters)


def _unmet_param(have, need) -> str:
    """What of an array parameter's built assumptions (its layout agreeing) the call's does
    not guarantee."""
    for dim in range(need.ndim):
        # a size the call knows (cuTile specializes sizes of 1) fits a cubin built for any size
        built_size = need.shape_constant[dim]
        if built_size is not None and have.shape_constant[dim] != built_size:
            return f"shape {dim} is {have.shape_constant[dim]}, built for {built_size}"
        if have.shape_divisible_by[dim] % need.shape_divisible_by[dim]:
            return f"shape {dim} is not known divisible by {need.shape_divisible_by[dim]}"
        known = have.stride_constant[dim]
        if need.stride_constant[dim] is not None:
            if known != need.stride_constant[dim]:
                return f"stride {dim} is {known}, built for {need.stride_constant[dim]}"
            continue
        bound, divisor = need.stride_lower_bound_incl[dim], need.stride_divisible_by[dim]
        if known is not None:
            if (bound is not None and known < bound) or known % divisor:
                return f"stride {dim} is {known}"
            continue
        have_bound = have.stride_lower_bound_incl[dim]
        if bound is not None and (have_bound is None or have_bound < bound):
            return f"stride {dim} may be below {bound}"
        if have.stride_divisible_by[dim] % divisor:
            return f"stride {dim} is not known divisible by {divisor}"
    if have.base_addr_divisible_by % need.base_addr_divisible_by:
        return f"base address aligned to {have.base_addr_divisible_by}, built for {need.base_addr_divisible_by}"
    if have.may_alias_internally and not need.may_alias_internally:
        return "an array may alias itself"
    return ""


def _unmet_aliasing(have_params, need_params) -> str:
    """Two arrays the call lets alias must be allowed to alias by the built signature."""
    def groups(params):
        return [set(getattr(p, "alias_groups", ())) for p in params]
    have, need = groups(have_params), groups(need_params)
    for i in range(len(have)):
        for j in range(i + 1, len(have)):
            if have[i] & have[j] and not need[i] & need[j]:
                return f"parameters {i} and {j} may alias"
    return ""
