"""The generated launchers run on the CPU with their kernel launches recorded instead of made:
every launch a call makes (inference, training forward, both backwards, paged decode with
and without split keys) names a kernel of the variant and passes arguments that satisfy the
signature `attngen build` compiled that kernel for (attngen.generate.aot.signature): rank,
dtype, index width, unit last stride, every other stride a multiple of 16 bytes, head_dim
rows a multiple of 16, aligned bases.  A launch that broke them would not run the built cubin
on the GPU (cuTile would compile the kernel then).  The calls go through attngen's entry
points (attngen.runtime.ops.attention and paged_attention, autograd included)."""
import pytest
import torch

from cuda.tile.compilation import ArrayConstraint, ScalarConstraint

from attngen.core.mask import Mask
from attngen.core.variant import Features, KernelSpec
from attngen.core.reference import page_table, scatter_pages
from attngen.emulator import host_patches
from attngen.runtime import ops
from attngen.runtime.registry import default_registry

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}
GRID_YZ_MAX = 65535


@pytest.fixture
def launches():
    """Launches recorded as (grid, kernel, args), on the emulator's CPU host side."""
    made = []
    with host_patches(lambda stream, grid, kernel, args: made.append((grid, kernel, args))):
        yield made


def _unmet(arg, constraint) -> str:
    """Why ``arg`` breaks ``constraint`` ("" when it satisfies it)."""
    if isinstance(constraint, ScalarConstraint):
        want = float if str(constraint.dtype) == "float32" else int
        return "" if type(arg) is want else f"{type(arg).__name__}, want {want.__name__}"
    assert isinstance(constraint, ArrayConstraint)
    if not isinstance(arg, torch.Tensor):
        return f"{type(arg).__name__}, want a tensor"
    if arg.dim() != constraint.ndim or arg.dtype != TORCH[str(constraint.dtype)]:
        return f"{arg.dim()}-D {arg.dtype}, want {constraint.ndim}-D {constraint.dtype}"
    limit = 2**31 - 1 if str(constraint.index_dtype) == "int32" else 2**63 - 1
    for d in range(arg.dim()):
        size, stride = arg.shape[d], arg.stride(d)
        if constraint.stride_constant[d] is not None and stride != constraint.stride_constant[d]:
            return f"stride {d} is {stride}, want {constraint.stride_constant[d]}"
        if stride % constraint.stride_divisible_by[d] or size % constraint.shape_divisible_by[d]:
            return (f"axis {d}: size {size}, stride {stride}; want them divisible by "
                    f"{constraint.shape_divisible_by[d]} and {constraint.stride_divisible_by[d]}")
        if max(size, stride) > limit:
            return f"axis {d} past the {constraint.index_dtype} index range"
    if arg.data_ptr() % constraint.base_addr_divisible_by:
        return f"base address not a multiple of {constraint.base_addr_divisible_by}"
    return ""


def _check(launches, module, expect: list[str]):
    """The launches made are ``expect`` (kernel suffixes, in order), each with arguments the
    built signature of its kernel takes and a grid CUDA can launch."""
    assert [kernel.suffix for _, kernel, _ in launches] == expect
    for grid, kernel, args in launches:
        assert kernel.spec == KernelSpec.from_dict(module.SPEC)
        params = kernel.built_signature.parameters
        assert len(args) == len(params), f"{kernel.suffix}: {len(args)} arguments, {len(params)} parameters"
        for i, (arg, constraint) in enumerate(zip(args, params)):
            why = _unmet(arg, constraint)
            assert not why, f"{kernel.suffix} argument {i} ({kernel.spec.kernels[kernel.suffix][i].name}): {why}"
        assert len(grid) == 3 and all(type(n) is int and n >= 1 for n in grid), grid
        assert grid[1] <= GRID_YZ_MAX and grid[2] <= GRID_YZ_MAX, grid
    launches.clear()


def _module(mask, gqa, head_dim, dtype, **features):
    return default_registry.module(KernelSpec.tuned(mask, gqa, head_dim, dtype, Features(**features)))


def _rand(*shape, dtype, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("seq", [96, 99])
def test_dense_launches_satisfy_the_built_signatures(launches, layout, seq):
    """Inference, training forward and the backward (two kernels at head_dim 64) of a windowed
    GQA variant, in both layouts, at a length whose log-sum-exp rows need padding (99)."""
    module = _module(Mask(True, 31), 2, 64, "bf16")
    shape = (lambda h: (2, h, seq, 64)) if layout == "bhsd" else (lambda h: (2, seq, h, 64))
    q, k, v = (_rand(*shape(h), dtype=torch.bfloat16, grad=True) for h in (4, 2, 2))
    with torch.no_grad():
        ops.attention(module.NAME, q, k, v, layout=layout)
    _check(launches, module, [""])
    out = ops.attention(module.NAME, q, k, v, layout=layout)
    _check(launches, module, ["_fwd"])
    torch.autograd.grad(out.float().sum(), (q, k, v))
    _check(launches, module, ["_dq", "_dkdv"])
    # the log-sum-exp asked for: the training forward, with or without autograd
    with torch.no_grad():
        _, lse = ops.attention(module.NAME, q, k, v, layout=layout, return_lse=True)
    _check(launches, module, ["_fwd"])
    out, lse = ops.attention(module.NAME, q, k, v, layout=layout, return_lse=True)
    _check(launches, module, ["_fwd"])
    assert lse.shape == (2, 4, seq) and lse.is_contiguous() and not lse.requires_grad and out.requires_grad
    torch.autograd.grad(out.float().sum(), (q, k, v))
    _check(launches, module, ["_dq", "_dkdv"])


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_backward_launches_satisfy_the_built_signatures(launches, deterministic):
    """head_dim 256: the fused backward (delta and the zeroed accumulator, the kernel, dQ's
    conversion), or in deterministic mode the two-kernel one."""
    module = _module(Mask(True, 1023), 2, 256, "bf16", softcap=30.0)
    q, k, v = (_rand(1, h, 130, 256, dtype=torch.bfloat16, grad=True) for h in (4, 2, 2))
    out = ops.attention(module.NAME, q, k, v, deterministic=deterministic)
    torch.autograd.grad(out.float().sum(), (q, k, v))
    _check(launches, module, ["_fwd", *(["_dq", "_dkdv"] if deterministic else ["_pre", "_bwd", "_post"])])


def test_packed_sequences_with_sinks_launch_satisfy_the_built_signatures(launches):
    """Packed (varlen) chunked sequences with sinks: the residual, offsets and sink logits."""
    module = _module(Mask(True, 47), 2, 64, "fp16", sinks=True, varlen=True, chunked=True)
    cu_q = torch.tensor([0, 1, 70, 150], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 130, 230], dtype=torch.int32)
    q = _rand(150, 4, 64, dtype=torch.float16, grad=True)
    k, v = (_rand(230, 2, 64, dtype=torch.float16, grad=True) for _ in range(2))
    sinks = torch.randn(4).requires_grad_()
    out = ops.attention(module.NAME, q, k, v, sinks=sinks, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                        max_seqlen_q=80, max_seqlen_k=100)
    _check(launches, module, ["_fwd"])
    with torch.no_grad():     # the log-sum-exp asked for, into a given output
        given = torch.empty_like(q)
        got, lse = ops.attention(module.NAME, q, k, v, sinks=sinks, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                 max_seqlen_q=80, max_seqlen_k=100, out=given, return_lse=True)
    _check(launches, module, ["_fwd"])
    assert got is given and lse.shape == (150, 4)
    torch.autograd.grad(out.float().sum(), (q, k, v, sinks))
    _check(launches, module, ["_dq", "_dkdv"])


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_launches_satisfy_the_built_signatures(launches, splits, page):
    """A paged cache of shuffled pages, decode steps and a prefill chunk in one call: one
    kernel, or the split keys' kernel and their merge; pages holding whole KV blocks (64 keys)
    take the kernels that load a block at once, smaller pages the ones that load it in pieces."""
    module = _module(Mask(True, 127), 4, 128, "bf16", paged=True, sinks=True)
    lengths, q_lens = [300, 47, 1], [1, 20, 1]
    pieces = "" if page % module.BLOCK_N == 0 else "_pieces"
    pages = sum(-(-n // page) for n in lengths)
    table = page_table(lengths, page, torch.randperm(pages).to(torch.int32))
    k_cache, v_cache = (scatter_pages(torch.randn(sum(lengths), 2, 128).to(torch.bfloat16), lengths, table,
                                      pages, page, fill=0.0) for _ in range(2))
    q = torch.randn(sum(q_lens), 8, 128).to(torch.bfloat16)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    used = torch.tensor(lengths, dtype=torch.int32)
    ops.paged_attention(module.NAME, q, k_cache, v_cache, cu_q, used, table, sinks=torch.randn(8),
                        splits=splits)
    _check(launches, module, [pieces] if splits == 1 else ["_split" + pieces, "_combine"])
    # the log-sum-exp asked for comes from the slices: the split kernel runs even for one slice
    _, lse = ops.paged_attention(module.NAME, q, k_cache, v_cache, cu_q, used, table, sinks=torch.randn(8),
                                 splits=splits, return_lse=True)
    _check(launches, module, ["_split" + pieces, "_combine"])
    assert lse.shape == (sum(q_lens), 8) and lse.dtype == torch.float32


@pytest.mark.parametrize("batch", ["plain", "padded", "packed rows"])
def test_transformers_training_step_launches_satisfy_the_built_signatures(launches, monkeypatch, batch):
    """A tiny Mistral-shaped model through the transformers integration (told not to fall back
    for CPU tensors): every layer's forward and backward launches fit the built signatures,
    for an ordinary batch, a left-padded one (packed to its tokens) and a padding-free one
    (sequences along each row).  The recorded launches compute nothing: only the calls are
    checked."""
    pytest.importorskip("transformers")
    from attngen.integrations import transformers as ag
    from hf_models import PACKED_ROWS, tiny_model

    ag.register()
    monkeypatch.setattr(ag, "_fallback_reason", lambda *args: None)
    # the integration names variants by get_kernel's key, whose resolver refuses CPU tensors
    # before it picks a kernel: pick it here as it would for CUDA ones
    monkeypatch.setattr(ops, "_module", lambda variant, q: ops._targets[variant](q.shape[-1], "bf16"))
    model = tiny_model("mistral", "attngen", torch.bfloat16).train()
    ids = torch.randint(1, model.config.vocab_size, (2, 28))
    extra = {"plain": {}, "padded": {"attention_mask": (torch.arange(28) >= torch.tensor([[0], [5]])).long()},
             "packed rows": {"position_ids": torch.tensor(PACKED_ROWS)}}[batch]
    model(input_ids=ids, use_cache=False, **extra).logits.float().sum().backward()
    layers = model.config.num_hidden_layers
    for grid, kernel, args in launches:
        assert kernel.spec.features.varlen == (batch != "plain"), kernel.spec
    module = default_registry.module(launches[0][1].spec)
    _check(launches, module, ["_fwd"] * layers + ["_dq", "_dkdv"] * layers)
