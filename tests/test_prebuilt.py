"""What `attngen build` writes is what a launcher loads, and a call that fits the built
signature gets the built cubin without compiling (CPU: the compile hook is called as cuTile's
dispatcher calls it; tests/test_prebuilt_gpu.py launches for real)."""
import dataclasses
import functools
import logging

import pytest

pytest.importorskip("cuda.tile")

import cuda.tile as ct  # noqa: E402
import cuda.tile._compile as cutile_compile  # noqa: E402
from cuda.tile._cext import default_tile_context  # noqa: E402
from cuda.tile.compilation import ArrayConstraint, CallingConvention, KernelSignature  # noqa: E402

from attngen.generate.build import build  # noqa: E402
from attngen.generate.cubin import kernel_info  # noqa: E402
from attngen.generate.sass import disassemble, element_store, key_loop, spills  # noqa: E402
from attngen.runtime import prebuilt  # noqa: E402
from attngen.runtime.prebuilt import Prebuilt  # noqa: E402
from attngen.testing import built_cubins_fit  # noqa: E402
from attngen.runtime.registry import Registry  # noqa: E402
from attngen.generate.spec import load_text  # noqa: E402
from attngen.core.variant import compiled_by_default  # noqa: E402

#: each built cubin is disassembled once for all the tests that read its SASS
disassemble = functools.lru_cache(maxsize=None)(disassemble)

SPEC = "name: tiny\nwindow: 16\ngqa: 2\nhead_dim: 64\ndtype: fp16\n"
HOPPER = (9, 0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("prebuilt") / "out"
    specs = load_text(SPEC)
    build(specs, out, archs=("sm_90",))
    return out, specs[0].kernels[0]


def kernels_of(out, spec) -> dict[str, Prebuilt]:
    """The kernels the registry's launcher of ``spec`` launches, by suffix."""
    module = Registry([out], jit_dir=out / "no-jit", jit=False).module(spec)
    return {k.suffix: k for table in module.KERNELS.values() for k in table.values()}


def test_the_launcher_loads_exactly_the_cubins_the_build_wrote(built):
    out, spec = built
    kernels = kernels_of(out, spec)
    assert set(kernels) == set(spec.kernels)
    assert all(isinstance(k, Prebuilt) for k in kernels.values())
    written = set((out / spec.name).glob("*.cubin"))
    found = {suffix: k.cubin("sm_90") for suffix, k in kernels.items() if k.cubin("sm_90").is_file()}
    assert set(found.values()) == written
    assert set(found) == {s for s in spec.kernels if compiled_by_default(s)}
    for suffix, path in found.items():            # the symbol it launches is in that cubin
        symbol = kernels[suffix].built_signature.symbol
        assert symbol.startswith(spec.name + suffix)
        assert b"\0" + symbol.encode() + b"\0" in path.read_bytes()


@pytest.fixture
def no_compiler(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tile compiler ran")
    monkeypatch.setattr(cutile_compile, "compile_tile", refuse)


def with_arrays(signature, only=None, **changes) -> KernelSignature:
    params = [dataclasses.replace(p, **changes) if isinstance(p, ArrayConstraint)
              and (only is None or i in only) else p for i, p in enumerate(signature.parameters)]
    return KernelSignature(params, signature.calling_convention)


def stronger(signature) -> KernelSignature:
    """What a call may bring: more alignment and divisibility than the build assumed."""
    params = []
    for p in signature.parameters:
        if isinstance(p, ArrayConstraint):
            p = dataclasses.replace(p, base_addr_divisible_by=256, shape_divisible_by=16,
                                    stride_divisible_by=(8,) * (p.ndim - 1) + (1,))
        params.append(p)
    return KernelSignature(params, signature.calling_convention)


def under(convention, signature) -> KernelSignature:
    return KernelSignature(signature.parameters, convention)


def knowing_size_one(signature) -> KernelSignature:
    """What cuTile derives from a batch of one: the first axis's length is a constant."""
    return with_arrays(signature, only=(0,), shape_constant=(1, None, None, None))


def test_a_call_that_fits_gets_the_built_cubin_and_nothing_compiles(built, no_compiler):
    out, spec = built
    for suffix, kernel in kernels_of(out, spec).items():
        if not compiled_by_default(suffix):
            continue
        plain = kernel.built_signature.with_symbol(None)
        # cuTile launches a call that knows no size under v1 (a batch of two), one that
        # knows a size of 1 under v2 (a batch of one)
        for call in (plain, stronger(kernel.built_signature),
                     under(CallingConvention.cutile_python_v1(), plain), knowing_size_one(plain)):
            cubin, symbol, _, providers = kernel._compile(call, default_tile_context, HOPPER)
            assert cubin == kernel.cubin("sm_90").read_bytes()
            assert symbol == kernel.built_signature.symbol and providers == ()


@pytest.mark.parametrize("case", ["another arch", "unaligned base", "self-aliasing", "aliasing",
                                  "64-bit indices", "negative strides", "not built"])
def test_a_call_that_does_not_fit_compiles_and_says_so_once(built, no_compiler, case, caplog):
    out, spec = built
    kernels = kernels_of(out, spec)
    kernel = kernels["" if case != "not built" else
                     next(s for s in spec.kernels if not compiled_by_default(s))]
    call, arch = kernel.built_signature.with_symbol(None), HOPPER
    if case == "another arch":
        arch = (8, 0)
    elif case == "unaligned base":
        call = with_arrays(call, base_addr_divisible_by=2)
    elif case == "self-aliasing":
        call = with_arrays(call, may_alias_internally=True)
    elif case == "aliasing":
        call = with_arrays(call, only=(0, 3), alias_groups=("a",))      # Q and Out
    elif case == "64-bit indices":
        call = with_arrays(call, only=(0,), index_dtype=ct.int64)
    elif case == "negative strides":
        call = with_arrays(call, only=(0,), stride_lower_bound_incl=(None, -4, 0, None))
    misses = len(prebuilt.layout_misses)
    with caplog.at_level(logging.WARNING, logger="attngen"):
        for _ in range(2):
            with pytest.raises(AssertionError, match="the tile compiler ran"):
                kernel._compile(call, default_tile_context, arch)
    said = [r.getMessage() for r in caplog.records if kernel.name in r.getMessage()]
    assert len(said) == 1 and "compiling" in said[0], said
    # only a parameter layout unlike the build's is the build's fault (the suites fail on it)
    assert len(prebuilt.layout_misses) - misses == (2 if case == "64-bit indices" else 0)


def test_a_case_fails_when_a_built_cubin_cannot_serve_its_call():
    with pytest.raises(AssertionError, match="could not serve the call: k: calling convention"):
        with built_cubins_fit("a case"):
            prebuilt.layout_misses.append("k: calling convention cutile_python_v1, built cutile_python_v3")
    with built_cubins_fit("a case"):
        pass


# Kernels that stream Q, K/V or dO tiles through a loop: each loads them through the Tensor
# Memory Accelerator when the tile compiler may assume 16-byte strides (what cuTile assumes of
# a call whose tensors have them).  A build that leaves an assumption out gets kernels that
# load every tile through registers: 3-5x the code, far slower, though every answer is right.
STREAMING = ("", "_fwd", "_dq", "_dkdv", "_bwd", "_split", "_pieces", "_split_pieces")
SPECS = """name: plain
window: 16
gqa: 2
head_dim: 64
dtype: fp16
---
name: fused
window: 1024
gqa: 2
head_dim: 256
dtype: bf16
---
name: paged
window: 64
gqa: 4
head_dim: 128
dtype: bf16
paged: true
---
name: paged-small-heads
window: 128
gqa: 8
head_dim: 64
dtype: bf16
sinks: true
paged: true
"""


@pytest.fixture(scope="module")
def streaming_cubins(tmp_path_factory):
    out = tmp_path_factory.mktemp("tma") / "out"
    specs = load_text(SPECS)
    build(specs, out, archs=("sm_90",))
    return [(k, s, out / k.name / f"{k.name}{s}.sm_90.cubin") for spec in specs for k in spec.kernels
            for s in k.kernels if s in STREAMING and compiled_by_default(s)]


def test_both_calling_conventions_compile_a_built_signature_to_the_same_code(built, tmp_path):
    """Why one cubin serves calls of cuTile's two calling conventions (`prebuilt._conventions_agree`):
    a signature that fixes no size, exported under each, gives the same code but for the
    symbol.  Should a cuTile release lay them out differently, this fails before users'
    launches would."""
    from cuda.tile.compilation import export_kernel

    out, spec = built
    kernel = kernels_of(out, spec)[""]
    code = {}
    for convention in (CallingConvention.cutile_python_v1(), CallingConvention.cutile_python_v2()):
        signature = under(convention, kernel.built_signature).with_mangled_symbol(kernel.name)
        path = tmp_path / f"{convention.name}.cubin"
        export_kernel(kernel, [signature], str(path), gpu_code="sm_90", output_format="cubin")
        code[convention.name] = (disassemble(path).replace(signature.symbol, "SYMBOL"), kernel_info(path))
    assert "HGMMA" in code["cutile_python_v1"][0]
    assert code["cutile_python_v1"] == code["cutile_python_v2"]


def test_built_kernels_load_their_tiles_through_tma(streaming_cubins):
    kinds = {s for _, s, _ in streaming_cubins}
    assert kinds == set(STREAMING), kinds                     # every kind of streaming kernel is here
    for kernel, suffix, cubin in streaming_cubins:
        sass = disassemble(cubin)
        assert "HGMMA" in sass, f"{cubin.name}: no SASS read"
        assert sass.count("UTMALDG") >= 2, f"{kernel.name}{suffix} loads its tiles without TMA"


#: the forward kernels: what inference, training's forward and serving run
FORWARD = ("", "_fwd", "_split", "_pieces", "_split_pieces")


def test_forward_key_loops_feed_their_matmuls_from_the_loads(streaming_cubins):
    """A forward kernel's key loop stores no element to shared memory: each block's K and V go
    from their TMA loads into the matmuls.  A tile changed in registers (values masked, pieces
    concatenated) is stored back element by element each block; the paged forward's loop did
    that, for a mask on the values of the sequence's last block, and ran at a third of the
    contiguous kernel's speed over the same keys; the _pieces kernels did it concatenating a
    block's 16-key pieces.  The last block now has its own code after the loop, and each
    piece its own matmuls."""
    checked = 0
    for kernel, suffix, cubin in streaming_cubins:
        if suffix in FORWARD:
            stores = [i for i in key_loop(disassemble(cubin)) if element_store(i)]
            assert not stores, f"{kernel.name}{suffix}'s key loop stores to shared memory: {stores[:3]}"
            checked += 1
    assert checked >= 12, checked     # plain and fused "" and "_fwd", both paged variants' four


def test_forward_kernels_keep_their_values_in_registers(streaming_cubins):
    """No forward kernel spills registers to local memory.  The paged kernels at head dim 64,
    tiled for four programs an SM, spilled in every step of their key loop, and the compiler
    then waited for each 16-deep matmul step alone; their tiles now plan for three."""
    checked = 0
    for kernel, suffix, cubin in streaming_cubins:
        if suffix in FORWARD:
            assert spills(disassemble(cubin)) == 0, f"{kernel.name}{suffix} spills registers"
            checked += 1
    assert checked >= 12, checked


def test_a_cubins_attributes_say_what_its_code_does(streaming_cubins):
    """attngen.generate.cubin reads the registers, threads and local memory a kernel records:
    a kernel records local memory exactly when its code spills (the deterministic dK/dV kernel
    at head dim 256 does)."""
    spilling = 0
    for kernel, suffix, cubin in streaming_cubins:
        info, spilled = kernel_info(cubin), spills(disassemble(cubin))
        assert 32 <= info.registers <= 255 and info.threads in (128, 256, 384), (cubin.name, info)
        assert (info.local_bytes > 0) == (spilled > 0), (cubin.name, info, spilled)
        spilling += spilled > 0
    assert spilling >= 1, spilling
