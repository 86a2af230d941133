"""A paged K/V cache on the GPU: FlashAttention's serving calls (``flash_attn_with_kvcache``,
``flash_attn_varlen_func`` with ``block_table``), CUDA-graph capture and torch.compile of a
decode step, and tiny transformers models served through a paged cache by a small engine
(batched requests of different lengths, chunked prefill, then greedy decode) giving
transformers' own ``generate`` tokens.

Accuracy rule (FlashAttention's suite): the output's error against an fp32 reference is at
most 2x PyTorch's same-dtype error, plus a floor.
"""
import pytest
import torch

from attngen.core import reference
from attngen.core.mask import Mask
from attngen.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
from attngen.testing import needs_cuda, needs_gpu, paged_cache

pytestmark = [pytest.mark.gpu, needs_gpu]
FLOOR = 1e-3


def _rel(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _check(out, exact, eager):
    assert not out.isnan().any()
    assert _rel(out, exact) <= 2 * _rel(eager, exact) + FLOOR, (_rel(out, exact), _rel(eager, exact))


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("window", [(-1, -1), (100, 0)], ids=["full", "w101"])
def test_with_kvcache_appends_and_attends(page, window, device):
    gen = torch.Generator(device=device).manual_seed(page)
    dtype, batch, heads, heads_kv, d, new = torch.bfloat16, 3, 8, 2, 128, 2
    cached = [300, 17, 0]
    k_cache, v_cache, _, table = paged_cache([n + new for n in cached], page, heads_kv, d, dtype, gen)
    q = torch.randn(batch, new, heads, d, device=device, generator=gen).to(dtype)
    k = torch.randn(batch, new, heads_kv, d, device=device, generator=gen).to(dtype)
    v = torch.randn(batch, new, heads_kv, d, device=device, generator=gen).to(dtype)
    seqlens = torch.tensor(cached, dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                  causal=True, window_size=window)
    used = seqlens + new
    got_k, _ = reference.gather_pages(k_cache, table, used)
    for b, n in enumerate(cached):       # the new keys landed after the cached ones
        start = sum(m + new for m in cached[:b])
        assert torch.equal(got_k[start + n:start + n + new], k[b])
    cu = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=device)
    mask = Mask(True, None if window[0] < 0 else window[0])
    args = (q.reshape(-1, heads, d), k_cache, v_cache, cu, used, table, mask)
    exact = reference.paged(*args, dtype=torch.float32)
    eager = reference.paged(*args, dtype=dtype)
    _check(out.reshape(-1, heads, d), exact, eager)


def test_with_kvcache_contiguous_cache_and_sinks(device):
    gen = torch.Generator(device=device).manual_seed(1)
    dtype, batch, heads, heads_kv, d, seq_cache = torch.float16, 2, 8, 1, 64, 208
    k_cache = torch.randn(batch, seq_cache, heads_kv, d, device=device, generator=gen).to(dtype)
    v_cache = torch.randn(batch, seq_cache, heads_kv, d, device=device, generator=gen).to(dtype)
    q = torch.randn(batch, 1, heads, d, device=device, generator=gen).to(dtype)
    sinks = torch.randn(heads, device=device, generator=gen)
    seqlens = torch.tensor([150, 9], dtype=torch.int32, device=device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                                  window_size=(63, 0), sinks=sinks)
    table = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
    args = (q.reshape(-1, heads, d), k_cache, v_cache, cu, seqlens, table, Mask(True, 63))
    exact = reference.paged(*args, sinks=sinks, dtype=torch.float32)
    _check(out.reshape(-1, heads, d), exact, reference.paged(*args, sinks=sinks, dtype=dtype))


def test_with_kvcache_rotary_and_cache_batch_idx(device):
    """Llama-style (GPT-NeoX) rotary tables in q's dtype on a pooled contiguous cache: the
    new keys land rotated in the rows cache_batch_idx names, the queries are rotated at their
    positions, and the output matches the reference over those rows."""
    gen = torch.Generator(device=device).manual_seed(3)
    dtype, heads, heads_kv, d, seq_cache, new = torch.bfloat16, 8, 2, 128, 256, 1
    k_cache = torch.randn(4, seq_cache, heads_kv, d, device=device, generator=gen).to(dtype)
    v_cache = torch.randn(4, seq_cache, heads_kv, d, device=device, generator=gen).to(dtype)
    rows = torch.tensor([3, 1], dtype=torch.int32, device=device)
    seqlens = torch.tensor([200, 31], dtype=torch.int32, device=device)
    q = torch.randn(2, new, heads, d, device=device, generator=gen).to(dtype)
    k = torch.randn(2, new, heads_kv, d, device=device, generator=gen).to(dtype)
    v = torch.randn(2, new, heads_kv, d, device=device, generator=gen).to(dtype)
    angles = torch.arange(seq_cache, device=device)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, device=device) / d)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                  cache_batch_idx=rows, causal=True, window_size=(127, 0), rotary_interleaved=False)

    def neox(x, at):      # the halves (i, i + d/2) as one complex number, turned at position `at`
        z = torch.complex(x[..., :d // 2].float(), x[..., d // 2:].float())
        z = z * torch.complex(cos[at].float(), sin[at].float())
        return torch.cat([z.real, z.imag], dim=-1)
    queries = torch.stack([neox(q[b], seqlens[b]) for b in range(2)]).to(dtype)
    for b in range(2):
        landed = k_cache[rows[b], seqlens[b]]
        torch.testing.assert_close(landed.float(), neox(k[b], seqlens[b])[0], atol=2e-2, rtol=1e-2)
    table, used = rows[:, None], seqlens + new
    cu = torch.arange(3, dtype=torch.int32, device=device)
    args = (queries.reshape(-1, heads, d), k_cache, v_cache, cu, used, table, Mask(True, 127))
    exact = reference.paged(*args, dtype=torch.float32)
    _check(out.reshape(-1, heads, d), exact, reference.paged(*args, dtype=dtype))


def test_varlen_block_table_mixes_prefill_and_decode(device):
    gen = torch.Generator(device=device).manual_seed(2)
    dtype, heads, heads_kv, d, page = torch.bfloat16, 4, 4, 64, 32
    q_lens, k_lens = [1, 40, 0, 7], [500, 40, 12, 7]
    k_cache, v_cache, _, table = paged_cache(k_lens, page, heads_kv, d, dtype, gen)
    cu_q = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lens, device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, d, device=device, generator=gen).to(dtype)
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(q_lens), max(k_lens), causal=True,
                                 window_size=(31, 0), block_table=table)     # FA2: lengths from cu_seqlens_k
    used = torch.tensor(k_lens, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, cu_q, used, table, Mask(True, 31))
    _check(out, reference.paged(*args, dtype=torch.float32), reference.paged(*args, dtype=dtype))
    with pytest.raises(Exception, match="block_table"):
        bad = table.clone()
        bad[0, 0] = 10_000
        flash_attn_varlen_func(q, k_cache, v_cache, cu_q, None, max(q_lens), None, causal=True,
                               block_table=bad, seqused_k=used)


@pytest.mark.parametrize("splits", [0, 1, 4], ids=["auto", "one-slice", "four-slices"])
def test_log_sum_exp_over_a_paged_cache(splits, device):
    """return_attn_probs over a paged cache (gpt-oss-shaped: sinks, window 128): the merged
    slices' log-sum-exp against the float64 reference over the same (exactly representable)
    inputs, sinks included; a mix of decode steps and a prefill chunk; the output unchanged."""
    gen = torch.Generator(device=device).manual_seed(4)
    dtype, heads, heads_kv, d, page = torch.bfloat16, 16, 2, 64, 32
    q_lens, k_lens = [1, 1, 50], [2000, 130, 50]
    k_cache, v_cache, _, table = paged_cache(k_lens, page, heads_kv, d, dtype, gen)
    q = torch.randn(sum(q_lens), heads, d, device=device, generator=gen).to(dtype)
    sinks = torch.randn(heads, device=device, generator=gen)
    cu_q = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    used = torch.tensor(k_lens, dtype=torch.int32, device=device)
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, None, max(q_lens), None, causal=True,
                                         window_size=(127, 0), block_table=table, seqused_k=used, sinks=sinks,
                                         num_splits=splits, return_attn_probs=True)
    keys, cu_k = reference.gather_pages(k_cache, table, used)
    exact = reference.varlen_logsumexp(q, keys, cu_q, cu_k, Mask(True, 127), sinks=sinks)
    assert lse.shape == (heads, sum(q_lens))
    torch.testing.assert_close(lse.double(), exact.t(), atol=2e-3, rtol=1e-4)
    alone = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, None, max(q_lens), None, causal=True,
                                   window_size=(127, 0), block_table=table, seqused_k=used, sinks=sinks,
                                   num_splits=splits)
    args = (q, k_cache, v_cache, cu_q, used, table, Mask(True, 127))
    exact_out = reference.paged(*args, sinks=sinks, dtype=torch.float32)
    _check(out, exact_out, reference.paged(*args, sinks=sinks, dtype=dtype))
    _check(alone, exact_out, reference.paged(*args, sinks=sinks, dtype=dtype))


@needs_cuda
def test_decode_step_captures_in_a_cuda_graph_and_compiles():
    gen = torch.Generator(device="cuda").manual_seed(3)
    dtype, batch, heads, heads_kv, d, page = torch.bfloat16, 4, 32, 8, 128, 16
    lengths = [1000, 3000, 20, 4096]
    k_cache, v_cache, _, table = paged_cache([n + 10 for n in lengths], page, heads_kv, d, dtype, gen)
    q = torch.randn(batch, 1, heads, d, device="cuda", generator=gen).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")

    def step():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                       causal=True, window_size=(4095, 0))
    step()                                               # compile and warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for shift in (0, 7):                                 # lengths move on the device only
        seqlens.copy_(torch.tensor(lengths, device="cuda") + shift)
        graph.replay()
        torch.cuda.synchronize()
        cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        args = (q.reshape(-1, heads, d), k_cache, v_cache, cu, seqlens, table, Mask(True, 4095))
        _check(out.reshape(-1, heads, d), reference.paged(*args, dtype=torch.float32),
               reference.paged(*args, dtype=dtype))
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(), step())


# -- a tiny serving engine -------------------------------------------------------------------
class PagedEngine:
    """Serves a transformers model through paged caches: each step packs every running
    request's new tokens (a prefill chunk, or one decode token) into one batch, writes their
    keys and values into the requests' pages and attends with attngen's paged kernel."""

    name = "attngen_paged_test"

    def __init__(self, model, requests: int, device, page: int = 16, pages: int = 64):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        cfg = model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        shape = (pages, page, cfg.num_key_value_heads, d)
        self.k = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.page, self.free, self.device = page, torch.randperm(pages).tolist(), device
        self.table = torch.full((requests, pages), -1, dtype=torch.int32, device=device)
        self.used = [0] * requests
        self.gqa = cfg.num_attention_heads // cfg.num_key_value_heads
        self.runs = 0
        AttentionInterface.register(self.name, self.attend)
        AttentionMaskInterface.register(self.name, lambda *args, **kwargs: None)   # the engine masks
        model.set_attn_implementation(self.name)
        self.model = model

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               sliding_window=None, **kwargs):
        import attngen

        layer = module.layer_idx
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))       # (tokens, heads, D)
        self.k[layer][self.slot_pages, self.slot_rows] = k
        self.v[layer][self.slot_pages, self.slot_rows] = v
        kernel = attngen.get_kernel(Mask.from_transformers(sliding_window, True), gqa=self.gqa,
                                    sinks=kwargs.get("s_aux") is not None, paged=True)
        out = kernel(q, self.k[layer], self.v[layer], self.cu_q, self.seqused, self.rows, self.longest,
                     scale=scaling, sinks=kwargs.get("s_aux"))
        self.runs += 1
        return out[None], None

    def step(self, work):
        """``work``: (request, new token ids) pairs; returns each request's last logits."""
        positions, slots = [], []
        for r, ids in work:
            need = -(-(self.used[r] + len(ids)) // self.page)
            have = int((self.table[r] >= 0).sum())
            for j in range(have, need):
                self.table[r, j] = self.free.pop()
            pos = torch.arange(self.used[r], self.used[r] + len(ids))
            positions.append(pos)
            slots.append(self.table[r].cpu()[pos // self.page] * self.page + pos % self.page)
        positions, slots = torch.cat(positions), torch.cat(slots).long()
        self.slot_pages, self.slot_rows = (slots // self.page).to(self.device), (slots % self.page).to(self.device)
        lengths = [len(ids) for _, ids in work]
        self.cu_q = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(self.device)
        self.seqused = torch.tensor([self.used[r] + len(ids) for r, ids in work], dtype=torch.int32).to(self.device)
        self.rows = self.table[[r for r, _ in work]]
        self.longest = max(lengths)
        ids = torch.cat([torch.as_tensor(ids) for _, ids in work]).to(self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids[None], position_ids=positions[None].to(self.device),
                                use_cache=False).logits[0]
        for r, n in zip((r for r, _ in work), lengths):
            self.used[r] += n
        ends = self.cu_q[1:].long() - 1
        return logits[ends].float()


def _first_divergence_is_a_tie(model, prompt, ours, theirs):
    """Where two greedy generations part, either transformers itself, run in bf16 over the
    whole prefix without a cache, picks our token (``generate``'s cached steps round
    differently: on the CPU they part from that forward too), or the float32 model is at a
    near tie: its top two logits closer than bf16 rounding alone moves them
    (tests/test_transformers_gpu.py)."""
    at = int((ours != theirs).nonzero()[0])
    prefix = torch.cat([prompt, theirs[:at]])[None]
    with torch.no_grad():
        model.set_attn_implementation("eager")
        noisy = model(input_ids=prefix).logits[0, -1].float()
        if int(noisy.argmax()) == int(ours[at]):
            return True
        model.float()
        exact = model(input_ids=prefix).logits[0, -1]
        model.to(torch.bfloat16)
    top = exact.topk(2)
    gap, noise = (top.values[0] - top.values[1]).item(), (noisy - exact).abs().max().item()
    return gap <= noise and (top.values[0] - exact[int(ours[at])]).item() <= noise


@pytest.mark.parametrize("family", ["mistral", "gpt-oss"])
def test_engine_serves_like_generate(family, device):
    from hf_models import tiny_model

    torch.manual_seed(0)
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1, **overrides).to(device)
    lengths, new, chunk = [37, 5, 23], 12, 16
    prompts = [torch.randint(1, model.config.vocab_size, (n,), device=device) for n in lengths]
    with torch.no_grad():
        expected = [model.generate(p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, len(p):]
                    for p in prompts]
    engine = PagedEngine(model, len(prompts), device)
    fed = [0] * len(prompts)
    generated = [[] for _ in prompts]
    while any(len(g) < new for g in generated):
        work = []
        for r, p in enumerate(prompts):
            if fed[r] < len(p):                                   # prefill, a chunk at a time
                work.append((r, p[fed[r]:fed[r] + chunk].tolist()))
            elif len(generated[r]) < new:                         # decode its last token
                work.append((r, [generated[r][-1]]))
        logits = engine.step(work)
        for (r, ids), row in zip(work, logits):
            fed[r] += len(ids) if fed[r] < len(prompts[r]) else 0
            if fed[r] >= len(prompts[r]) and len(generated[r]) < new:
                generated[r].append(int(row.argmax()))
    assert engine.runs > 0
    for p, ours, theirs in zip(prompts, generated, expected):
        ours = torch.tensor(ours, device=device)
        if not torch.equal(ours, theirs):
            assert _first_divergence_is_a_tie(model, p, ours, theirs), (ours.tolist(), theirs.tolist())
