"""The ``attngen::`` custom ops on the GPU: torch.library's own checks of the ops (schema,
fake implementations against the real ones, autograd registration), CUDA-graph capture and
replay with new inputs, and torch.compile(fullgraph=True) of tiny transformers models, for
inference and for a training step.  Reference: the same calls run eagerly."""
import pytest
import torch

import attngen
from attngen.bench.timing import cuda_graph
from attngen.testing import long_context_errors, needs_cuda, needs_gpu

pytestmark = [pytest.mark.gpu, needs_gpu]


def _rand(*shape, dtype=torch.bfloat16, requires_grad=False, device="cuda"):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def _dense(device, requires_grad=False):
    attn = attngen.get_kernel(window=48, gqa=2, softcap=20.0)
    q = _rand(2, 200, 4, 64, requires_grad=requires_grad, device=device)
    k, v = (_rand(2, 200, 2, 64, requires_grad=requires_grad, device=device) for _ in range(2))
    return attn, (q, k, v), {"layout": "bshd"}


def _packed(device, requires_grad=False):
    attn = attngen.get_kernel(window=48, gqa=2, sinks=True, varlen=True, chunked=True)
    cu_q = torch.tensor([0, 1, 70, 150], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 130, 230], dtype=torch.int32, device=device)
    q = _rand(150, 4, 64, requires_grad=requires_grad, device=device)
    k, v = (_rand(230, 2, 64, requires_grad=requires_grad, device=device) for _ in range(2))
    sinks = torch.randn(4, device=device).requires_grad_(requires_grad)
    return attn, (q, k, v, cu_q, cu_k), {"max_seqlen_q": 80, "max_seqlen_k": 100, "sinks": sinks}


CALLS = {"dense": _dense, "packed": _packed}


def _op_args(attn, args, kw):
    q, k, v, *offsets = args
    cu_q, cu_k = offsets or (None, None)
    return (attn.key, q, k, v, kw.get("sinks"), cu_q, cu_k, kw.get("max_seqlen_q"), kw.get("max_seqlen_k"),
            None, kw.get("layout", "bhsd"))


@pytest.mark.parametrize("call", sorted(CALLS))
def test_opcheck(call, device):
    attn, args, kw = CALLS[call](device)
    attn(*args, **kw)                                          # build and load the kernels
    torch.library.opcheck(torch.ops.attngen.attention.default, _op_args(attn, args, kw))
    attn, args, kw = CALLS[call](device, requires_grad=True)
    torch.library.opcheck(torch.ops.attngen.attention_fwd.default, _op_args(attn, args, kw))


@needs_cuda
@pytest.mark.parametrize("call", sorted(CALLS))
def test_cuda_graph_replays_with_new_inputs(call):
    attn, args, kw = CALLS[call]("cuda")
    tensors = [t for t in args if t.is_floating_point()]
    graph, out = cuda_graph(lambda: attn(*args, **kw))
    for _ in range(2):
        for t in tensors:
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, attn(*args, **kw))             # same kernels: identical bits


@needs_cuda
@pytest.mark.parametrize("call", sorted(CALLS))
def test_compile_reduce_overhead_replays_with_new_inputs(call):
    """torch.compile(mode="reduce-overhead"), inductor's CUDA graph trees (what serving and
    training code compile with to take host time out): the graphs replay on new inputs with the
    eager call's output bits, and a compiled loss's backward gives the eager gradients."""
    attn, args, kw = CALLS[call]("cuda")
    torch._dynamo.reset()
    infer = torch.compile(lambda *a: attn(*a, **kw), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        fresh = [torch.randn_like(t) if t.is_floating_point() else t for t in args]
        torch.testing.assert_close(infer(*fresh), attn(*fresh, **kw), rtol=0, atol=0)
    attn, args, kw = CALLS[call]("cuda", requires_grad=True)
    loss = torch.compile(lambda *a: attn(*a, **kw).float().square().sum(), mode="reduce-overhead")
    leaves = [t for t in (*args, kw.get("sinks")) if t is not None and t.requires_grad]
    for _ in range(3):
        with torch.no_grad():
            for t in leaves:
                t.copy_(torch.randn_like(t))
        got = torch.autograd.grad(loss(*args), leaves)
        want = torch.autograd.grad(attn(*args, **kw).float().square().sum(), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_cuda_graph_captures_forward_and_backward(deterministic):
    """Replays compute what eager calls compute: the same bits, but for dq of the fused
    backward, whose atomic adds may round in another order (then within 1e-3)."""
    attn, (q, k, v), kw = _dense("cuda", requires_grad=True)
    dout = torch.randn_like(q)

    def step():
        out = attn(q, k, v, **kw, deterministic=deterministic)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    graph, captured = cuda_graph(step)
    with torch.no_grad():
        for t in (q, k, v, dout):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv"), captured, step()):
        if name == "dq" and not deterministic:
            assert _rel(got, want) < 1e-3, (name, _rel(got, want))
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize("call", sorted(CALLS))
def test_deterministic_algorithms_give_identical_gradients(call, device):
    """With torch.use_deterministic_algorithms(True) the backward is the deterministic one:
    two backwards give identical bits, the same bits as deterministic=True asks for, and
    agree with the default fused backward to rounding."""
    attn, args, kw = CALLS[call](device, requires_grad=True)
    leaves = [t for t in (*args, kw.get("sinks")) if t is not None and t.requires_grad]
    dout = torch.randn_like(args[0])

    def grads(**extra):
        return torch.autograd.grad(attn(*args, **kw, **extra), leaves, dout)

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(before)
    asked, fused = grads(deterministic=True), grads()
    for a, b, c, f in zip(first, second, asked, fused):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert _rel(f, a) < 1e-2


def _rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("call", sorted(CALLS))
def test_return_lse_is_each_rows_log_sum_exp(call, device):
    """``return_lse=True``: the forward's log-sum-exp in natural log, against the float64
    reference over the same (exactly representable) inputs; the output stays differentiable,
    the log-sum-exp carries no gradient."""
    from attngen.core import reference
    attn, args, kw = CALLS[call](device, requires_grad=True)
    q, k, v, *offsets = args
    out, lse = attn(*args, **kw, return_lse=True)
    assert out.requires_grad and not lse.requires_grad and lse.dtype == torch.float32
    f, mask = attn.family.features, attn.family.mask
    options = {"softcap": f.softcap, "sinks": None if "sinks" not in kw else kw["sinks"].detach()}
    if not offsets:
        exact = reference.logsumexp(q.detach(), k.detach(), mask, layout="bshd", **options)
    else:
        assert lse.shape == q.shape[:2]
        exact = reference.varlen_logsumexp(q.detach(), k.detach(), *offsets, mask, **options)
    torch.testing.assert_close(lse.double(), exact, atol=2e-3, rtol=1e-4)
    torch.autograd.grad(out.float().sum(), (q, k, v))


@needs_cuda
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt-oss"])
def test_compiled_model_fullgraph_matches_eager(family, capsys, attngen_runs):
    """torch.compile(fullgraph=True) of a whole model on attngen, inference and a training
    step.  Reference: the float32 eager model with the same weights; the compiled bf16 model's
    logits and every parameter's gradient must be as close to it as the eager bf16 attngen
    model's (rel <= 1.5 x + 2e-3 for logits, 2 x + 5e-3 for gradients), and every layer of
    the compiled model must have run attngen's kernels (forward, and backward when training),
    not a PyTorch fallback."""
    import copy

    from attngen.integrations import transformers as ag
    from hf_models import tiny_model

    ag.register()
    torch._dynamo.reset()
    torch.manual_seed(0)
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "attngen", torch.bfloat16, initializer_range=0.1, **overrides).cuda()
    exact = copy.deepcopy(model).float()
    exact.set_attn_implementation("eager")
    ids = torch.randint(1, model.config.vocab_size, (2, 100), device="cuda")
    loss = lambda m: m(input_ids=ids, use_cache=False).logits.float().square().mean()  # noqa: E731
    compiled = torch.compile(model, fullgraph=True)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        ref, eager = (m(input_ids=ids, use_cache=False).logits for m in (exact, model))
        attngen_runs.clear()
        got = compiled(input_ids=ids, use_cache=False).logits
    assert len(attngen_runs) >= layers, f"{family}: attngen ran {len(attngen_runs)} times for {layers} layers"
    assert _rel(got, ref) <= 1.5 * _rel(eager, ref) + 2e-3, (_rel(got, ref), _rel(eager, ref))

    def grads(m, fn):
        m.train().zero_grad()
        fn(m).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_g, eager_g = grads(exact, loss), grads(model, loss)
    attngen_runs.clear()
    got_g = grads(model, torch.compile(loss, fullgraph=True))
    assert len(attngen_runs) >= 2 * layers, \
        f"{family}: attngen ran {len(attngen_runs)} times for the forward and backward of {layers} layers"
    assert set(got_g) == set(ref_g)
    worst = (0.0, 0.0, "")
    for name, r in ref_g.items():
        ours, theirs = _rel(got_g[name], r), _rel(eager_g[name], r)
        assert ours <= 2 * theirs + 5e-3, f"{family} {name}: compiled {ours:.2e}, eager {theirs:.2e}"
        worst = max(worst, (ours, theirs, name))
    with capsys.disabled():
        print(f"\n{family} compiled fullgraph: logits vs fp32 {_rel(got, ref):.2e} (eager attngen "
              f"{_rel(eager, ref):.2e}); worst gradient {worst[0]:.2e} (eager {worst[1]:.2e}) at {worst[2]}")


@needs_cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "packed"])
def test_tensors_past_2_31_elements(layout, capsys):
    """A 524 416-token prefill of shape A (q past 2^31 elements) and its backward, against the
    float64 reference on the first and last rows (the 64-bit-indexed kernels)."""
    errors = long_context_errors(524416, layout)
    with capsys.disabled():
        print(f"\n{layout}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert all(e < 2e-3 for e in errors.values()), errors


@needs_cuda
@pytest.mark.parametrize("packed", [False, True])
def test_more_than_65535_batch_head_pairs(packed, capsys):
    """1100 sequences x 64 heads: more (sequence, head) pairs than a grid's second axis holds.
    The flat grid runs them all; the first, a middle and the last sequence's output and
    gradients against autograd of the float64 reference."""
    from attngen import Mask
    from attngen.core import reference

    batch, heads, seq, window = 1100, 64, 24, 16
    mask = Mask.from_window(window, True)
    attn = attngen.get_kernel(window=window, varlen=packed)
    if packed:
        q, k, v = (_rand(batch * seq, heads, 64, requires_grad=True) for _ in range(3))
        cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device="cuda")
        out = attn(q, k, v, cu, max_seqlen_q=seq)
    else:
        q, k, v = (_rand(batch, heads, seq, 64, requires_grad=True) for _ in range(3))
        out = attn(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    errors = {}
    for b in (0, batch // 2, batch - 1):
        rows = slice(b * seq, (b + 1) * seq) if packed else b
        pick = (lambda t: t[rows].unsqueeze(0).transpose(1, 2)) if packed else (lambda t: t[b:b + 1])
        qb, kb, vb = (pick(t).detach().double().requires_grad_(True) for t in (q, k, v))
        ref = reference.attention(qb, kb, vb, mask)
        ref_grads = torch.autograd.grad(ref, (qb, kb, vb), pick(dout).double())
        errors[f"out[{b}]"] = _rel(pick(out), ref)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errors[f"{name}[{b}]"] = _rel(pick(g), r)
    with capsys.disabled():
        print(f"\n{'packed' if packed else 'bhsd'} {batch} x {heads}: worst {max(errors.values()):.1e}")
    assert all(e < 2e-2 for e in errors.values()), errors
