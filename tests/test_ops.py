"""The ``attngen::`` custom ops, without a GPU: their fake implementations (shapes, strides,
gradients' shapes) and that dynamo traces attngen calls and whole transformers models into
one graph of them — torch.export(strict=True) runs the same tracer as torch.compile(fullgraph=
True) and never executes the kernels.  tests/test_transformers_gpu.py runs them for real."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attngen
from attngen.runtime.inputs import InputError
from attngen.core.support import bhsd

# Fake tensors on the CPU: the fake implementations do not care about the device (a CPU build
# of torch cannot run autograd on fake CUDA tensors).
DEV = "cpu"


def _qkv(layout, b=2, h=4, hkv=2, s=96, d=64, dtype=torch.bfloat16, requires_grad=False):
    def make(heads):
        shape = (b, heads, s, d) if layout == "bhsd" else (b, s, heads, d)
        return torch.randn(shape, device=DEV, dtype=dtype, requires_grad=requires_grad)
    return make(h), make(hkv), make(hkv)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fake_outputs_and_gradients_have_the_kernels_shapes(layout):
    attn = attngen.get_kernel(window=32, gqa=2)
    with FakeTensorMode():
        q, k, v = _qkv(layout)
        out = attn(q, k, v, layout=layout)
        assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
        q, k, v = _qkv(layout, requires_grad=True)
        out = attn(q, k, v, layout=layout)
        assert out.grad_fn is not None
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and g.dtype == t.dtype
            assert g.stride() == bhsd(torch.empty_like(bhsd(t, layout)), layout).stride()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fake_log_sum_exp_has_the_padded_rows_the_kernels_get(layout):
    attn = attngen.get_kernel(window=32, gqa=2)
    with FakeTensorMode():
        q, k, v = _qkv(layout, s=99)
        _, lse, _ = torch.ops.attngen.attention_fwd(attn.key, q, k, v, None, None, None, None, None, None, layout)
        assert lse.shape == (2, 4, 99) and lse.stride() == (4 * 100, 100, 1)


def test_fake_sinks_and_packed_sequences():
    attn = attngen.get_kernel(window=16, gqa=2, sinks=True, varlen=True)
    with FakeTensorMode():
        q = torch.randn(50, 4, 64, device=DEV, dtype=torch.float16, requires_grad=True)
        k = torch.randn(50, 2, 64, device=DEV, dtype=torch.float16, requires_grad=True)
        v = torch.randn(50, 2, 64, device=DEV, dtype=torch.float16, requires_grad=True)
        sinks = torch.randn(4, device=DEV, requires_grad=True)
        cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEV)
        out = attn(q, k, v, cu, max_seqlen_q=30, sinks=sinks)
        assert out.shape == q.shape
        dq, dk, dv, dsinks = torch.autograd.grad(out.float().sum(), (q, k, v, sinks))
        assert (dq.shape, dk.shape, dv.shape, dsinks.shape) == (q.shape, k.shape, v.shape, sinks.shape)


def test_calls_that_do_not_fit_the_kernel_are_refused_before_any_op():
    plain, packed = attngen.get_kernel(window=32), attngen.get_kernel(window=32, varlen=True)
    q = k = v = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(InputError, match="varlen=True"):
        plain(q, k, v, cu)
    with pytest.raises(InputError, match="sinks=True"):
        plain(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(InputError, match="cu_seqlens_q"):
        packed(q[0], k[0], v[0])
    with pytest.raises(InputError, match="layout= does not apply"):
        packed(q[0], k[0], v[0], cu, layout="bshd")
    with pytest.raises(InputError, match="attngen::|get_kernel"):
        torch.ops.attngen.attention("no_such_variant", q, k, v, None, None, None, None, None, None, "bhsd")


def _graph_ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_dynamo_traces_attention_kernels_into_one_graph():
    dense = attngen.get_kernel(window=32, gqa=2, softcap=30.0)
    packed = attngen.get_kernel(window=32, gqa=2, varlen=True, chunked=True)

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, qp, kp, vp, cu_q, cu_k):
            a = dense(q, k, v, layout="bshd")
            b = packed(qp, kp, vp, cu_q, cu_k, max_seqlen_q=30, max_seqlen_k=40)
            return a.float().sum() + b.float().sum()

    with FakeTensorMode():
        q, k, v = _qkv("bshd")
        qp = torch.randn(50, 4, 64, device=DEV, dtype=torch.bfloat16)
        kp, vp = (torch.randn(70, 2, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        cu_q = torch.tensor([0, 20, 50], dtype=torch.int32, device=DEV)
        cu_k = torch.tensor([0, 30, 70], dtype=torch.int32, device=DEV)
        exported = torch.export.export(Layer(), (q, k, v, qp, kp, vp, cu_q, cu_k), strict=True)
    assert _graph_ops(exported.graph_module).count("attngen.attention.default") == 2


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt-oss"])
def test_transformers_model_traces_without_graph_breaks(family, monkeypatch):
    """A whole tiny model with attn_implementation="attngen" exported by dynamo (strict): its
    attention layers become attngen ops (softcap, sinks and windows per layer included).  The
    integration would fall back on CPU tensors; here it is told not to, since nothing runs."""
    pytest.importorskip("transformers")
    from attngen.integrations import transformers as ag
    from hf_models import tiny_model

    ag.register()
    monkeypatch.setattr(ag, "_fallback_reason", lambda *args: None)
    model = tiny_model(family, "attngen", torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=True)
    assert _graph_ops(exported.graph_module).count("attngen.attention.default") == model.config.num_hidden_layers


def test_transformers_fallback_compiles_fullgraph_on_cpu():
    """On CPU every call falls back to PyTorch: that path too compiles in one graph (decode
    steps and other fallbacks must not break a compiled model) and matches eager."""
    pytest.importorskip("transformers")
    from attngen.integrations import transformers as ag
    from hf_models import tiny_model

    ag.register()
    torch.manual_seed(0)
    model = tiny_model("gemma2", "attngen", torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        got = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, eager)
        # mixed precision: the casts to the autocast dtype trace into the same one graph
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, eager)


def test_only_plain_eager_calls_bypass_the_ops():
    """Eager calls on plain tensors run the launchers without the ops' Python dispatch; fake
    tensors, torch.compile and torch.func transforms must get the ops (they cannot launch)."""
    from attngen.runtime.ops import _direct

    x = torch.ones(3)
    assert _direct(x, None)
    with FakeTensorMode():
        assert not _direct(torch.ones(3))
    assert not torch.func.vmap(lambda t: torch.tensor(_direct(t)))(x).any()
    traced = torch.compile(lambda t: t + int(_direct(t)), backend="eager", fullgraph=True)
    assert torch.equal(traced(x), x)


@pytest.mark.parametrize("kernel_mode, call_mode, global_mode, expected", [
    (None, None, False, False),      # default: the fused backward
    (None, None, True, True),        # torch.use_deterministic_algorithms(True) asks for it
    (True, None, False, True),       # get_kernel(deterministic=True)
    (None, True, False, True),       # the call's argument
    (None, False, True, False),      # an explicit False wins over the global setting
    (True, False, False, False),     # the call's argument wins over the kernel's
])
def test_backward_mode_follows_call_kernel_then_torch_setting(kernel_mode, call_mode, global_mode,
                                                              expected, monkeypatch):
    import attngen.runtime.ops as ops

    seen = []
    original = ops._backward

    def spy(ctx, *grads):
        seen.append(ctx.deterministic)
        return original(ctx, *grads)
    monkeypatch.setattr(ops, "_backward", spy)
    attn = attngen.get_kernel(window=32, gqa=2, deterministic=kernel_mode)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(global_mode, warn_only=True)
    try:
        with FakeTensorMode():
            q, k, v = _qkv("bhsd", requires_grad=True)
            out = attn(q, k, v, deterministic=call_mode)
            torch.autograd.grad(out.float().sum(), (q, k, v))
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == [expected]


def _standin_launcher(calls):
    """A launcher module with the generated ones' interface whose "kernels" are torch
    expressions, so the eager path's autograd wiring runs on the CPU."""
    from types import ModuleType
    from attngen.runtime.inputs import row_stats

    module = ModuleType("standin")
    module.NAME = "standin_launcher"
    module.SPEC = {"features": {"sinks": False, "varlen": False}}

    def forward(q, k, v, *, scale=None, layout="bhsd"):
        calls.append(("forward", scale, layout))
        return q * 2, row_stats(q.shape[:3], q.device), q.new_empty(0)

    def infer(q, k, v, *, scale=None, layout="bhsd", out=None):
        calls.append(("infer", scale, layout))
        return q * 2

    def backward(q, k, v, out, lse, res, dout, *, scale=None, layout="bhsd", deterministic=False, check=True):
        calls.append(("backward", scale, layout, deterministic, check))
        return dout * 2, torch.full_like(k, 3.0), torch.full_like(v, 4.0), None

    module.infer, module.forward, module.backward = infer, forward, backward
    return module


@pytest.mark.parametrize("traced", [False, True])
def test_eager_and_traced_training_calls_run_the_launchers_forward_and_backward(traced, monkeypatch):
    """Plain eager tensors take _DirectAttention (launchers called directly), anything that
    traces _Attention (through the ops): both record the launcher's forward, hand its backward
    the call's scale, layout and mode, and return its gradients."""
    import attngen.runtime.ops as ops

    calls = []
    ops.register_variant(_standin_launcher(calls))
    if traced:
        monkeypatch.setattr(ops, "_direct", lambda *tensors: False)
    q, k, v = _qkv("bhsd", dtype=torch.float32, requires_grad=True)
    out = ops.attention("standin_launcher", q, k, v, scale=0.5, deterministic=True)
    assert type(out.grad_fn).__name__ == ("_Attention" if traced else "_DirectAttention") + "Backward"
    torch.testing.assert_close(out, q.detach() * 2)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(dq, dout * 2)
    assert (dk == 3).all() and (dv == 4).all()
    # the eager backward trusts what its own forward checked; the ops' backward checks again
    assert calls == [("forward", 0.5, "bhsd"), ("backward", 0.5, "bhsd", True, traced)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_through_the_launcher(reentrant):
    """torch.utils.checkpoint (what transformers' gradient checkpointing runs) keeps none of
    the forward's saved tensors and runs the forward again in the backward: attngen's calls
    recompute through the launcher and give the same gradients.  The reentrant form runs the
    first forward without grad (the inference kernel), the other with grad and its saved
    tensors dropped."""
    import attngen.runtime.ops as ops
    from torch.utils.checkpoint import checkpoint

    calls = []
    ops.register_variant(_standin_launcher(calls))
    q, k, v = _qkv("bhsd", dtype=torch.float32, requires_grad=True)
    layer = lambda q, k, v: ops.attention("standin_launcher", q, k, v).sin()  # noqa: E731
    dq, dk, dv = torch.autograd.grad(layer(q, k, v).sum(), (q, k, v))
    calls.clear()
    checkpoint(layer, q, k, v, use_reentrant=reentrant).sum().backward()   # reentrant: no .grad()
    got = (q.grad, k.grad, v.grad)
    assert [c[0] for c in calls] == ["infer" if reentrant else "forward", "forward", "backward"]
    for g, want in zip(got, (dq, dk, dv)):
        torch.testing.assert_close(g, want)


def test_autocast_runs_fp32_inputs_in_its_dtype():
    """Inside torch.autocast (fp16 or bf16) fp32 inputs run in the autocast dtype, as SDPA's do,
    and their gradients come back fp32; outside it fp32 is refused with a clear error."""
    attn = attngen.get_kernel(window=32, gqa=2)
    with FakeTensorMode():
        q, k, v = _qkv("bhsd", dtype=torch.float32, requires_grad=True)
        with pytest.raises(InputError, match="dtype torch.float32"):
            attn(q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(q, k, v)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(g.dtype == torch.float32 and g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_compile_with_dynamic_shapes_does_not_recompile_per_length():
    """Training with sequence lengths that vary: torch.compile makes the length symbolic (what
    dynamo switches to by itself at the second length), and the ops' fake implementations
    trace the forward and backward for all lengths in two graphs: lengths that are multiples of
    4 and lengths that are not (whose log-sum-exp rows are padded), never one per length."""
    from torch._dynamo.utils import counters

    attn = attngen.get_kernel(window=32, gqa=2)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda q, k, v: attn(q, k, v, layout="bshd").float().square().sum(),
                         backend="aot_eager", dynamic=True, fullgraph=True)
    graphs = []
    with FakeTensorMode():
        for seq in (96, 99, 130, 200, 257, 1000):
            q, k, v = _qkv("bshd", s=seq, requires_grad=True)
            grads = torch.autograd.grad(step(q, k, v), (q, k, v))
            assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2, 2, 2, 2, 2], graphs


def test_deterministic_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="deterministic must be True, False or None"):
        attngen.get_kernel(window=32, deterministic="yes")
    q, k, v = _qkv("bhsd")
    with pytest.raises(ValueError, match="deterministic must be True, False or None"):
        attngen.get_kernel(window=32)(q, k, v, deterministic=1)
