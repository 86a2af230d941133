"""attngen.flash_attn (and FlashAttention 3's and 4's APIs, attngen.flash_attn_interface and
attngen.flash_attn.cute) on the CPU: FlashAttention's arguments map onto the right attngen
kernel and semantics.  The kernels run only on CUDA, so here each AttentionKernel call is
answered by attngen's float64 reference for that kernel's mask and features; the results are
checked against FlashAttention's own definition of the window, written out below
(bottom-right aligned queries, rows that see no key give 0)."""
import pytest
import torch

import attngen
from attngen.core import reference
from attngen.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)
from attngen.integrations.flash_attn import mask_of
from attngen.runtime.registry import AttentionKernel, PagedAttentionKernel


@pytest.fixture
def kernels(monkeypatch):
    """Every AttentionKernel call answered by the reference; the families asked for, recorded."""
    asked = []

    def call(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, *, max_seqlen_k=None,
             scale=None, sinks=None, out=None, layout="bhsd", deterministic=None, return_lse=False):
        f = self.family.features
        asked.append(self.family)
        options = {"scale": scale, "softcap": f.softcap, "sinks": sinks}
        if f.varlen:
            cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
            result = reference.varlen(q, k, v, cu_seqlens_q, cu_k, self.family.mask, **options)
            if not return_lse:
                return result
            return result, reference.varlen_logsumexp(q, k, cu_seqlens_q, cu_k, self.family.mask, **options).float()
        assert layout == "bshd"
        offset = k.shape[1] - q.shape[1]
        result = reference.attention(q, k, v, self.family.mask, layout=layout, q_offset=offset, **options)
        if not return_lse:
            return result
        return result, reference.logsumexp(q, k, self.family.mask, layout=layout, q_offset=offset, **options).float()
    def paged(self, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, max_seqlen_q=None, *,
              scale=None, sinks=None, out=None, splits=None, check=None, return_lse=False):
        f = self.family.features
        assert f.paged
        asked.append(self.family)
        options = {"scale": scale, "softcap": f.softcap, "sinks": sinks}
        result = reference.paged(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, self.family.mask,
                                 **options)
        if not return_lse:
            return result
        k, cu_k = reference.gather_pages(k_cache, block_table, seqused_k)
        lse = reference.varlen_logsumexp(q, k, cu_seqlens_q, cu_k, self.family.mask, **options)
        return result, lse.masked_fill(lse == float("-inf"), float("inf")).float()   # the kernels' +inf
    monkeypatch.setattr(AttentionKernel, "__call__", call)
    monkeypatch.setattr(PagedAttentionKernel, "__call__", paged)
    return asked


def flash_definition(q, k, v, causal, window_size, scale=None, softcap=0.0, sinks=None, lse=False):
    """FlashAttention's semantics, written out: (B, S_q, H, D) queries aligned to the end of the
    keys; query i sees key j iff i + S_k - S_q - left <= j <= i + S_k - S_q + right (-1:
    unbounded) and, when causal, j <= i + S_k - S_q; a row that sees no key gives 0.  With
    ``lse``, also each row's log-sum-exp of its logits (B, H, S_q), +inf for a row that sees
    no key (FlashAttention 2's value)."""
    seq_q, seq_k, heads = q.shape[1], k.shape[1], q.shape[2]
    group = heads // k.shape[2]
    k, v = (t.double().repeat_interleave(group, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(seq_q)[:, None] + seq_k - seq_q
    j = torch.arange(seq_k)[None, :]
    left, right = window_size
    seen = torch.ones(seq_q, seq_k, dtype=torch.bool)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    if causal:
        seen &= j <= i
    s = s.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)[..., :seq_k]
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    if not lse:
        return out
    rows = torch.logsumexp(s, dim=-1)      # a row with no key and no sink: FlashAttention 2's +inf
    return out, rows.masked_fill(rows == float("-inf"), float("inf"))


def qkv(batch, seq_q, seq_k, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(seq_q * 1000 + seq_k)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return make(batch, seq_q, heads, dim), make(batch, seq_k, kv_heads, dim), make(batch, seq_k, kv_heads, dim)


LENGTHS_Q, LENGTHS_K = [5, 1, 12], [9, 20, 12]      # packed sequences: one decode step, one chunk


def packed_sequences():
    """Fresh packed sequences of LENGTHS_Q queries over LENGTHS_K keys: q, k, v, cu_q, cu_k."""
    q = torch.randn(sum(LENGTHS_Q), 4, 8, dtype=torch.float64)
    k, v = (torch.randn(sum(LENGTHS_K), 2, 8, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0] + n).cumsum(0).to(torch.int32) for n in (LENGTHS_Q, LENGTHS_K))
    return q, k, v, cu_q, cu_k


def paged_cache_of(k, v, page: int = 16):
    """packed_sequences()'s keys and values in a cache of shuffled pages: k_cache, v_cache,
    block table, each sequence's key count."""
    pages = sum(-(-n // page) for n in LENGTHS_K)
    table = reference.page_table(LENGTHS_K, page, torch.randperm(pages).to(torch.int32))
    k_cache, v_cache = (reference.scatter_pages(t, LENGTHS_K, table, pages, page) for t in (k, v))
    return k_cache, v_cache, table, torch.tensor(LENGTHS_K, dtype=torch.int32)


def check_packed(answers, q, k, v, cu_q, cu_k, window):
    """Each (out (total_q, H, D), lse (H, total_q)) of ``answers`` is FlashAttention's, causal
    with ``window``, sequence by sequence."""
    for b in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
        want, want_lse = flash_definition(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], True, window, lse=True)
        for out, lse in answers:
            assert torch.allclose(out[q0:q1], want[0], atol=1e-12)
            torch.testing.assert_close(lse[:, q0:q1].double(), want_lse[0], atol=1e-6, rtol=1e-6)


CASES = [(False, (-1, -1)), (True, (-1, -1)), (True, (6, 0)), (True, (6, -1)), (False, (6, 0)),
         (False, (5, 3)), (False, (0, 0))]


@pytest.mark.parametrize("causal, window_size", CASES)
@pytest.mark.parametrize("seq_q, seq_k", [(20, 20), (7, 30), (1, 30)])
def test_dense_calls_compute_flash_attention(kernels, causal, window_size, seq_q, seq_k):
    q, k, v = qkv(2, seq_q, seq_k)
    got = flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=0.3, softcap=5.0)
    want = flash_definition(q, k, v, causal, window_size, scale=0.3, softcap=5.0)
    assert torch.allclose(got, want, atol=1e-12)
    assert kernels[-1].features.chunked == (seq_q < seq_k) and kernels[-1].gqa == 2


def test_more_queries_than_keys_give_zero_rows_where_no_key_is_seen(kernels):
    q, k, v = qkv(1, 30, 12)
    for window in [(-1, -1), (4, 0)]:
        got = flash_attn_func(q, k, v, causal=True, window_size=window)
        assert torch.equal(got[:, :18], torch.zeros_like(got[:, :18]))
        assert torch.allclose(got, flash_definition(q, k, v, True, window), atol=1e-12)


def test_sinks_and_packed_forms(kernels):
    q, k, v = qkv(2, 16, 16)
    sinks = torch.randn(4, dtype=torch.float64)
    want = flash_definition(q, k, v, True, (3, 0), sinks=sinks)
    assert torch.allclose(flash_attn_func(q, k, v, causal=True, window_size=(3, 0), sinks=sinks), want, atol=1e-12)
    kv = torch.stack([k, v], dim=2)
    assert torch.allclose(flash_attn_kvpacked_func(q, kv, causal=True, window_size=(3, 0), sinks=sinks), want,
                          atol=1e-12)
    q4, k4, v4 = qkv(2, 16, 16, heads=4, kv_heads=4)
    qkv_ = torch.stack([q4, k4, v4], dim=2)
    assert torch.allclose(flash_attn_qkvpacked_func(qkv_, causal=True),
                          flash_definition(q4, k4, v4, True, (-1, -1)), atol=1e-12)


@pytest.mark.parametrize("causal, window_size", CASES)
def test_varlen_calls_compute_flash_attention_per_sequence(kernels, causal, window_size):
    lengths_q, lengths_k = [5, 1, 0, 12], [9, 20, 3, 12]
    q = torch.randn(sum(lengths_q), 4, 8, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64)
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    got = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                 window_size=window_size)
    assert kernels[-1].features.varlen and kernels[-1].features.chunked
    for b in range(4):
        (q0, q1), (k0, k1) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
        want = flash_definition(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, window_size)[0]
        assert torch.allclose(got[q0:q1], want, atol=1e-12), b
    kv = torch.stack([k, v], dim=1)
    assert torch.equal(flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                       causal=causal, window_size=window_size), got)


def test_one_set_of_offsets_takes_the_aligned_kernel(kernels):
    lengths = [4, 9]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    qkv_ = torch.randn(sum(lengths), 3, 2, 8, dtype=torch.float64)
    got = flash_attn_varlen_qkvpacked_func(qkv_, cu, max(lengths), causal=True)
    assert not kernels[-1].features.chunked
    for b in range(2):
        s = slice(*cu[b:b + 2].tolist())
        want = flash_definition(*(qkv_[None, s, i] for i in range(3)), True, (-1, -1))[0]
        assert torch.allclose(got[s], want, atol=1e-12)


@pytest.mark.parametrize("causal, window_size", CASES)
@pytest.mark.parametrize("seq_q, seq_k", [(20, 20), (7, 30), (30, 12)])
def test_return_attn_probs_gives_out_and_flash_attentions_log_sum_exp(kernels, causal, window_size, seq_q, seq_k):
    """(out, softmax_lse, None): the log-sum-exp of each row's scaled, capped logits, sinks
    included, (B, H, S_q) fp32, +inf where a row sees no key (more queries than keys)."""
    if seq_q > seq_k and not causal:
        return      # refused: more queries than keys needs causal=True
    q, k, v = qkv(2, seq_q, seq_k)
    for sinks in [None, torch.randn(4, dtype=torch.float64)]:
        out, lse, probs = flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=0.3,
                                          softcap=5.0, return_attn_probs=True, sinks=sinks)
        want, want_lse = flash_definition(q, k, v, causal, window_size, scale=0.3, softcap=5.0, sinks=sinks,
                                          lse=True)
        assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, seq_q)
        assert torch.allclose(out, want, atol=1e-12)
        torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)


def test_varlen_return_attn_probs_gives_the_log_sum_exp_head_major(kernels):
    """Packed sequences: softmax_lse is (H, total_q), as FlashAttention's varlen call returns it."""
    q, k, v, cu_q, cu_k = packed_sequences()
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 20, causal=True, window_size=(6, 0),
                                             return_attn_probs=True)
    assert probs is None and lse.shape == (4, sum(LENGTHS_Q)) and lse.is_contiguous()
    check_packed([(out, lse)], q, k, v, cu_q, cu_k, (6, 0))


def test_paged_varlen_return_attn_probs_gives_the_log_sum_exp(kernels):
    """Over a paged cache too: (out, softmax_lse (H, total_q), None), sinks included."""
    torch.manual_seed(3)
    lengths_q, lengths_k, page = [1, 6], [40, 6], 16
    k_flat, v_flat = (torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64) for _ in range(2))
    table = reference.page_table(lengths_k, page, torch.randperm(8).to(torch.int32))
    k_cache, v_cache = (reference.scatter_pages(t, lengths_k, table, 8, page) for t in (k_flat, v_flat))
    q = torch.randn(sum(lengths_q), 4, 8, dtype=torch.float64)
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    sinks = torch.randn(4, dtype=torch.float64)
    out, lse, probs = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, None, 6, None, causal=True,
                                             window_size=(9, 0), block_table=table, sinks=sinks,
                                             seqused_k=torch.tensor(lengths_k, dtype=torch.int32),
                                             return_attn_probs=True)
    assert probs is None and lse.shape == (4, 7) and lse.is_contiguous()
    starts = [0, lengths_k[0]]
    for b in range(2):
        q0, q1 = cu_q[b:b + 2].tolist()
        keys = slice(starts[b], starts[b] + lengths_k[b])
        want, want_lse = flash_definition(q[None, q0:q1], k_flat[None, keys], v_flat[None, keys], True, (9, 0),
                                          sinks=sinks, lse=True)
        assert torch.allclose(out[q0:q1], want[0], atol=1e-12)
        torch.testing.assert_close(lse[:, q0:q1].double(), want_lse[0], atol=1e-6, rtol=1e-6)


def test_window_size_maps_onto_masks():
    assert mask_of(True) == attngen.Mask(True)
    assert mask_of(True, (4095, 0)) == attngen.Mask.from_window(4096)
    assert mask_of(False, (7, 0)) == attngen.Mask(True, 7)        # right 0: the causal band
    assert mask_of(False, (64, 64)) == attngen.Mask(False, 64, 64)
    assert mask_of(False) == attngen.Mask(False)
    for bad in [(5, -1), (-1, 5)]:
        with pytest.raises(attngen.ArgumentError, match="one side only"):
            mask_of(False, bad)
    for bad in [(5,), (-2, 0), (1.5, 0), "full"]:
        with pytest.raises(attngen.ArgumentError, match="window_size must be"):
            mask_of(True, bad)


def test_what_attngen_does_not_compute_is_refused_by_name():
    q, k, v = qkv(1, 4, 4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for kwargs, name in [({"dropout_p": 0.1}, "dropout_p"), ({"alibi_slopes": torch.ones(4)}, "alibi_slopes")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            flash_attn_func(q, k, v, **kwargs)
    with pytest.raises(attngen.ArgumentError, match="paged cache"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(attngen.ArgumentError, match="seqused_k without block_table"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, seqused_k=torch.tensor([4], dtype=torch.int32))
    with pytest.raises(attngen.ArgumentError, match="without causal=True"):
        flash_attn_func(*qkv(1, 9, 4), causal=False)
    with pytest.raises(attngen.ArgumentError, match="multiple of the key/value heads"):
        flash_attn_func(*qkv(1, 4, 4, heads=3, kv_heads=2))


def test_dynamo_traces_flash_attn_calls_into_attngen_ops():
    """torch.export(strict=True) runs torch.compile's tracer: the FlashAttention-signature calls
    become attngen's ops, no graph break (fake tensors: no kernel runs); FlashAttention 3's and
    4's too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attngen import flash_attn_interface as fa3
    from attngen.flash_attn import cute

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, qp, kp, vp, cu_q, cu_k):
            a = flash_attn_func(q, k, v, causal=True, window_size=(31, 0))
            b = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 30, 40, causal=True, window_size=(31, 0))
            c, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(31, 0), return_attn_probs=True)
            d = fa3.flash_attn_qkvpacked_func(torch.cat([q, k, v], dim=2), causal=True, num_heads_q=4)
            e, _ = cute.flash_attn_func(q, k, v, causal=True, window_size=(31, None))
            return a.float().sum() + b.float().sum() + c.float().sum() + lse.sum() + d.float().sum() + e.float().sum()

    with FakeTensorMode():
        q = torch.randn(2, 96, 4, 64, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 96, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        qp = torch.randn(50, 4, 64, dtype=torch.bfloat16)
        kp, vp = (torch.randn(70, 2, 64, dtype=torch.bfloat16) for _ in range(2))
        cu_q = torch.tensor([0, 20, 50], dtype=torch.int32)
        cu_k = torch.tensor([0, 30, 70], dtype=torch.int32)
        exported = torch.export.export(Layer(), (q, k, v, qp, kp, vp, cu_q, cu_k), strict=True)
    ops = [str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count("attngen.attention.default") == 4 and ops.count("attngen.attention_fwd.default") == 1, ops


def test_deterministic_follows_flash_attention(kernels, monkeypatch):
    """deterministic=True asks for the deterministic backward; False leaves it to
    torch.use_deterministic_algorithms, as attngen's default does."""
    seen = []
    answer = AttentionKernel.__call__

    def spy(self, *args, deterministic=None, **kwargs):
        seen.append(deterministic)
        return answer(self, *args, **kwargs)
    monkeypatch.setattr(AttentionKernel, "__call__", spy)
    q, k, v = qkv(1, 8, 8)
    flash_attn_func(q, k, v, causal=True, deterministic=True)
    flash_attn_func(q, k, v, causal=True)
    assert seen == [True, None]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous-cache", "paged-cache"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (True, (5, 0)), (False, (6, 2))])
def test_with_kvcache_appends_then_attends_as_flash_attention(kernels, paged, causal, window):
    """New keys land after each sequence's cached ones, and the call equals FlashAttention's
    definition over the cache's first cache_seqlens + S_new keys (more queries than keys: 0)."""
    torch.manual_seed(0)
    batch, heads, kv_heads, d, seq_cache, new = 3, 4, 2, 16, 48, 3
    cached = [10, 0, 45]
    q = torch.randn(batch, new + 2, heads, d)         # two more queries than the new keys
    k_new, v_new = torch.randn(batch, new, kv_heads, d), torch.randn(batch, new, kv_heads, d)
    k_flat, v_flat = torch.randn(batch, seq_cache, kv_heads, d), torch.randn(batch, seq_cache, kv_heads, d)
    if paged:      # pages of 16 keys, the sequences' pages shuffled through the cache
        order = torch.randperm(batch * seq_cache // 16).to(torch.int32)
        table = order.view(batch, seq_cache // 16)
        k_cache, v_cache = torch.empty(len(order), 16, kv_heads, d), torch.empty(len(order), 16, kv_heads, d)
        k_cache[table.long()] = k_flat.view(batch, -1, 16, kv_heads, d)
        v_cache[table.long()] = v_flat.view(batch, -1, 16, kv_heads, d)
    else:
        table, k_cache, v_cache = None, k_flat.clone(), v_flat.clone()
    seqlens = torch.tensor(cached, dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                       block_table=table, causal=causal, window_size=window, return_softmax_lse=True)
    assert all(f.features.paged for f in kernels) and lse.shape == (batch, heads, new + 2)
    for b, n in enumerate(cached):
        keys = torch.cat([k_flat[b, :n], k_new[b]])[None]
        values = torch.cat([v_flat[b, :n], v_new[b]])[None]
        if paged:
            got = k_cache[table[b].long()].reshape(seq_cache, kv_heads, d)
        else:
            got = k_cache[b]
        assert torch.equal(got[:n + new], keys[0])
        if not causal and q.shape[1] > keys.shape[1]:
            continue      # FlashAttention's bidirectional rows past the keys: not checked here
        expected, expected_lse = flash_definition(q[b:b + 1], keys, values, causal, window, lse=True)
        torch.testing.assert_close(out[b:b + 1].double(), expected, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[b:b + 1].double(), expected_lse, atol=1e-6, rtol=1e-6)


def rotated(x, cos, sin, positions, interleaved):
    """The rotary embedding written with complex numbers: dimension pairs (2i, 2i + 1)
    (interleaved) or (i, i + R/2) are one complex number, turned by the angle at the row's
    position (positions: (B, S))."""
    half = cos.shape[1]
    x = x.double()
    part = x[..., :2 * half]
    pairs = part.unflatten(-1, (half, 2)) if interleaved else part.unflatten(-1, (2, half)).transpose(-1, -2)
    turn = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))[positions]
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn[:, :, None])
    turned = turned.flatten(-2) if interleaved else turned.transpose(-1, -2).flatten(-2)
    return torch.cat([turned, x[..., 2 * half:]], dim=-1)


@pytest.mark.parametrize("interleaved", [True, False], ids=["gpt-j", "gpt-neox"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (5, 2)), (False, (-1, -1))])
def test_with_kvcache_rotates_new_keys_and_queries_as_flash_attention(kernels, interleaved, fraction, causal,
                                                                      window):
    """The new keys are rotated at their cache positions before they are written; the queries
    at theirs when causal or windowed, else all at the first new key's; the first R
    dimensions only."""
    torch.manual_seed(1)
    batch, heads, kv_heads, d, seq_cache, new = 2, 4, 2, 16, 32, 3
    rot = int(d * fraction)
    cached = torch.tensor([4, 20], dtype=torch.int32)
    angles = torch.arange(seq_cache)[:, None] * 0.3 ** torch.arange(rot // 2)[None, :]
    cos, sin = angles.cos(), angles.sin()
    q, k_new, v_new = torch.randn(batch, new, heads, d), torch.randn(batch, new, kv_heads, d), \
        torch.randn(batch, new, kv_heads, d)
    k_cache, v_cache = torch.randn(batch, seq_cache, kv_heads, d), torch.randn(batch, seq_cache, kv_heads, d)
    before = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                  cache_seqlens=cached, causal=causal, window_size=window,
                                  rotary_interleaved=interleaved)
    along = causal or window != (-1, -1)
    for b, n in enumerate(cached.tolist()):
        at = torch.arange(n, n + new)[None]
        keys = rotated(k_new[b:b + 1], cos, sin, at, interleaved)
        torch.testing.assert_close(k_cache[b, n:n + new].double(), keys[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(k_cache[b, :n], before[b, :n]) and torch.equal(k_cache[b, n + new:], before[b, n + new:])
        queries = rotated(q[b:b + 1], cos, sin, at if along else torch.full((1, new), n), interleaved)
        expected = flash_definition(queries, k_cache[b:b + 1, :n + new], v_cache[b:b + 1, :n + new], causal,
                                    window)
        torch.testing.assert_close(out[b:b + 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_with_kvcache_reads_the_rows_cache_batch_idx_names(kernels):
    """A contiguous cache with more rows than sequences: sequence b's keys are written to and
    read from row cache_batch_idx[b]; the other rows are left alone."""
    torch.manual_seed(2)
    heads, kv_heads, d, seq_cache = 4, 2, 16, 24
    k_cache, v_cache = torch.randn(5, seq_cache, kv_heads, d), torch.randn(5, seq_cache, kv_heads, d)
    before = k_cache.clone()
    rows, cached = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([7, 12], dtype=torch.int32)
    q, k_new, v_new = torch.randn(2, 1, heads, d), torch.randn(2, 1, kv_heads, d), torch.randn(2, 1, kv_heads, d)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cached,
                                  cache_batch_idx=rows, causal=True, window_size=(5, 0))
    for b, (row, n) in enumerate(zip(rows.tolist(), cached.tolist())):
        assert torch.equal(k_cache[row, n], k_new[b, 0])
        expected = flash_definition(q[b:b + 1], k_cache[row:row + 1, :n + 1], v_cache[row:row + 1, :n + 1], True,
                                    (5, 0))
        torch.testing.assert_close(out[b:b + 1].double(), expected, atol=1e-6, rtol=1e-6)
    for row in (1, 2, 4):
        assert torch.equal(k_cache[row], before[row])


def test_with_kvcache_refuses_what_attngen_does_not_take_by_name(kernels):
    q, k_cache = torch.randn(1, 1, 4, 16), torch.randn(1, 8, 4, 16)
    k, table = torch.randn(1, 1, 4, 16), torch.zeros(1, 1, dtype=torch.int32)
    tables = {"rotary_cos": torch.ones(8, 4), "rotary_sin": torch.zeros(8, 4)}
    for kwargs, name in [({"cache_leftpad": torch.ones(1)}, "cache_leftpad"),
                         ({"num_splits": -1}, "num_splits"),
                         ({"k": k}, "pass both"), ({"rotary_cos": torch.ones(8, 4)}, "come together"),
                         (tables, "pass k and v"),
                         ({"k": k, "v": k, "rotary_cos": torch.ones(4, 4), "rotary_sin": torch.ones(4, 4)},
                          "4 positions; the cache holds 8"),
                         ({"k": k, "v": k, "rotary_cos": torch.ones(8, 9), "rotary_sin": torch.ones(8, 9)},
                          "R <= head_dim 16"),
                         ({"cache_batch_idx": torch.zeros(1, dtype=torch.int32), "block_table": table},
                          "cache_batch_idx with block_table"),
                         ({"cache_batch_idx": torch.zeros(2, dtype=torch.int32)}, r"cache_batch_idx must be \(1,\)")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            flash_attn_with_kvcache(q, k_cache, k_cache.clone(), **kwargs)
    with pytest.raises(attngen.ArgumentError, match="one row per sequence"):
        flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), k_cache, k_cache.clone())


def test_varlen_hands_out_and_num_splits_to_the_kernel(monkeypatch):
    """A serving engine's call: ``out=`` (written and returned) and ``num_splits`` (a paged
    cache's key splits; refused for contiguous keys, which attngen does not split)."""
    seen = []

    def record(self, *args, out=None, splits=None, **kwargs):
        seen.append((out, splits))
        return out
    monkeypatch.setattr(AttentionKernel, "__call__", record)
    monkeypatch.setattr(PagedAttentionKernel, "__call__", record)
    q, out = torch.randn(5, 4, 16), torch.empty(5, 4, 16)
    cache, cu = torch.randn(3, 16, 2, 16), torch.tensor([0, 2, 5], dtype=torch.int32)
    table, used = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32), torch.tensor([20, 9], dtype=torch.int32)
    got = flash_attn_varlen_func(q, cache, cache, cu, None, 3, None, causal=True, block_table=table,
                                 seqused_k=used, out=out, num_splits=4)
    assert got is out and seen == [(out, 4)]
    flash_attn_varlen_func(q, cache, cache, cu, None, 3, None, causal=True, block_table=table, seqused_k=used)
    assert seen[-1] == (None, None)
    k = torch.randn(5, 2, 16)
    assert flash_attn_varlen_func(q, k, k, cu, cu, 3, 3, causal=True, out=out) is out
    for bad, why in [(2, "only for a paged cache"), (-1, "num_splits must be"), (True, "num_splits must be")]:
        with pytest.raises(attngen.ArgumentError, match=why):
            flash_attn_varlen_func(q, k, k, cu, cu, 3, 3, causal=True, num_splits=bad)


# -- FlashAttention 3's API (attngen.flash_attn_interface) ----------------------------------
def test_flash_attn_3_signatures_compute_the_same_as_flash_attention(kernels):
    """FlashAttention 3's argument order (softmax_scale, causal third and fourth; no dropout)
    and answers: out, or (out, softmax_lse) with return_attn_probs."""
    from attngen import flash_attn_interface as fa3
    q, k, v = qkv(2, 20, 20)
    want, want_lse = flash_definition(q, k, v, True, (6, 0), scale=0.3, softcap=5.0, lse=True)
    got = fa3.flash_attn_func(q, k, v, 0.3, True, window_size=(6, 0), softcap=5.0, pack_gqa=True, num_splits=1)
    assert torch.allclose(got, want, atol=1e-12)
    out, lse = fa3.flash_attn_func(q, k, v, 0.3, True, window_size=(6, 0), softcap=5.0, return_attn_probs=True)
    assert torch.allclose(out, want, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)
    q4, k4, v4 = qkv(2, 16, 16, heads=4, kv_heads=4)
    assert torch.allclose(fa3.flash_attn_qkvpacked_func(torch.stack([q4, k4, v4], dim=2), causal=True),
                          flash_definition(q4, k4, v4, True, (-1, -1)), atol=1e-12)
    stacked = torch.cat([q, k, v], dim=2)           # (B, S, H + 2 H_kv, D): GQA heads in one tensor
    assert torch.allclose(fa3.flash_attn_qkvpacked_func(stacked, causal=True, num_heads_q=4),
                          flash_definition(q, k, v, True, (-1, -1)), atol=1e-12)


def test_flash_attn_3_varlen_and_kvcache(kernels):
    """Packed sequences, and flash_attn_with_kvcache with page_table: over a cache that already
    holds the keys, with packed queries (cu_seqlens_q) too, as a serving engine calls it."""
    from attngen import flash_attn_interface as fa3
    q, k, v, cu_q, cu_k = packed_sequences()
    out, lse = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 20, causal=True, window_size=(6, 0),
                                          return_attn_probs=True)
    assert lse.shape == (4, sum(LENGTHS_Q))
    k_cache, v_cache, table, used = paged_cache_of(k, v)
    served, served_lse = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=used, page_table=table,
                                                     cu_seqlens_q=cu_q, max_seqlen_q=12, causal=True,
                                                     window_size=(6, 0), return_softmax_lse=True)
    check_packed([(out, lse), (served, served_lse)], q, k, v, cu_q, cu_k, (6, 0))
    # one decode token per sequence, the new keys appended, pages named page_table
    dec = torch.randn(3, 1, 4, 8, dtype=torch.float64)
    k_new, v_new = torch.randn(3, 1, 2, 8, dtype=torch.float64), torch.randn(3, 1, 2, 8, dtype=torch.float64)
    got = fa3.flash_attn_with_kvcache(dec, k_cache, v_cache, k_new, v_new, cache_seqlens=used, page_table=table,
                                      causal=True)
    for b in range(3):
        k0, k1 = cu_k[b:b + 2].tolist()
        keys, values = torch.cat([k[k0:k1], k_new[b]])[None], torch.cat([v[k0:k1], v_new[b]])[None]
        assert torch.allclose(got[b:b + 1], flash_definition(dec[b:b + 1], keys, values, True, (-1, -1)), atol=1e-12)


def test_flash_attn_3_scheduler_metadata_is_none_and_checks_the_planned_call(kernels):
    """get_scheduler_metadata, which serving engines call once a step before
    flash_attn_with_kvcache: None (attngen's calls plan themselves), which the call takes as
    scheduler_metadata; what that call would refuse is refused here already, by name."""
    from attngen import flash_attn_interface as fa3
    q, k, v, cu_q, cu_k = packed_sequences()
    k_cache, v_cache, table, used = paged_cache_of(k, v)
    plan = dict(batch_size=3, max_seqlen_q=12, max_seqlen_k=20, num_heads_q=4, num_heads_kv=2, headdim=64,
                cache_seqlens=used, page_size=k_cache.shape[1], causal=True, window_size=(6, 0))
    metadata = fa3.get_scheduler_metadata(**plan)
    assert metadata is None
    assert fa3.get_scheduler_metadata(**plan, qkv_dtype=torch.float16, headdim_v=64, has_softcap=True,
                                      num_splits=2, pack_gqa=True, sm_margin=4) is None
    out, lse = fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=used, page_table=table,
                                           cu_seqlens_q=cu_q, max_seqlen_q=12, causal=True, window_size=(6, 0),
                                           scheduler_metadata=metadata, return_softmax_lse=True)
    check_packed([(out, lse)], q, k, v, cu_q, cu_k, (6, 0))
    for change, name in [({"headdim": 72}, "head_dim must be one of"), ({"headdim_v": 32}, "headdim_v"),
                         ({"qkv_dtype": torch.float32}, "qkv_dtype"), ({"num_heads_kv": 3}, "multiple"),
                         ({"page_size": 24}, "page_size=24"), ({"attention_chunk": 8}, "attention_chunk"),
                         ({"cache_leftpad": used}, "cache_leftpad"), ({"cu_seqlens_k_new": used}, "cu_seqlens_k_new"),
                         ({"causal": False, "window_size": (6, -1)}, "one side only")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            fa3.get_scheduler_metadata(**{**plan, **change})


def test_flash_attn_3_arguments_attngen_does_not_compute_are_refused_by_name():
    from attngen import flash_attn_interface as fa3
    q, k, v = qkv(1, 4, 4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    one = torch.ones(1)
    for kwargs, name in [({"qv": q}, "qv"), ({"q_descale": one}, "q_descale"), ({"v_descale": one}, "v_descale"),
                         ({"attention_chunk": 8}, "attention_chunk")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            fa3.flash_attn_func(q, k, v, **kwargs)
    for kwargs, name in [({"seqused_q": cu}, "seqused_q"), ({"seqused_k": cu}, "seqused_k")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            fa3.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)
    with pytest.raises(attngen.ArgumentError, match="two equal groups"):
        fa3.flash_attn_qkvpacked_func(torch.randn(1, 4, 7, 8), num_heads_q=4)
    cache = torch.randn(1, 16, 4, 8)
    for kwargs, name in [({"cache_leftpad": cu}, "cache_leftpad"), ({"cu_seqlens_k_new": cu}, "cu_seqlens_k_new"),
                         ({"rotary_seqlens": cu}, "rotary_seqlens"),
                         ({"cu_seqlens_q": cu, "k": k, "v": v}, "write the new keys into the cache first"),
                         ({"cu_seqlens_q": cu}, "needs cache_seqlens")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            fa3.flash_attn_with_kvcache(q[0] if "cu_seqlens_q" in kwargs else q, cache, cache.clone(), **kwargs)


# -- FlashAttention 4's API (attngen.flash_attn.cute) ------------------------------------------
def test_flash_attn_4_signatures_compute_the_same_as_flash_attention(kernels):
    """FlashAttention 4's arguments (window bounds None for unbounded, learnable_sink) and
    answer, always (out, lse): lse None unless asked for or autograd records the call."""
    from attngen.flash_attn import cute
    q, k, v = qkv(2, 20, 20)
    sinks = torch.randn(4, dtype=torch.float64)
    want, want_lse = flash_definition(q, k, v, True, (6, 0), scale=0.3, softcap=5.0, sinks=sinks, lse=True)
    out, lse = cute.flash_attn_func(q, k, v, 0.3, True, (6, None), sinks, softcap=5.0, pack_gqa=True)
    assert torch.allclose(out, want, atol=1e-12) and lse is None
    out, lse = cute.flash_attn_func(q, k, v, 0.3, True, (6, None), sinks, softcap=5.0, return_lse=True)
    assert torch.allclose(out, want, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)
    for window, fa2_window in [((None, None), (-1, -1)), ((5, 3), (5, 3))]:
        out, _ = cute.flash_attn_func(q, k, v, window_size=window)
        assert torch.allclose(out, flash_definition(q, k, v, False, fa2_window), atol=1e-12)
    trained = [t.clone().requires_grad_() for t in (q, k, v)]
    assert cute.flash_attn_func(*trained, causal=True)[1] is not None      # computed for the backward anyway


def test_flash_attn_4_varlen_packed_batched_and_paged(kernels):
    from attngen.flash_attn import cute
    q, k, v, cu_q, cu_k = packed_sequences()
    packed, packed_lse = cute.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 20, causal=True,
                                                     window_size=(6, 0), return_lse=True)
    k_cache, v_cache, table, used = paged_cache_of(k, v)
    paged, paged_lse = cute.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, max_seqlen_q=12, seqused_k=used,
                                                   page_table=table, causal=True, window_size=(6, 0),
                                                   return_lse=True)
    check_packed([(packed, packed_lse), (paged, paged_lse)], q, k, v, cu_q, cu_k, (6, 0))
    decode = torch.randn(3, 1, 4, 8, dtype=torch.float64)      # batched queries over the pages
    out, lse = cute.flash_attn_varlen_func(decode, k_cache, v_cache, seqused_k=used, page_table=table,
                                           causal=True, return_lse=True)
    assert out.shape == (3, 1, 4, 8) and lse.shape == (3, 4, 1)
    for b in range(3):
        k0, k1 = cu_k[b:b + 2].tolist()
        want, want_lse = flash_definition(decode[b:b + 1], k[None, k0:k1], v[None, k0:k1], True, (-1, -1), lse=True)
        assert torch.allclose(out[b:b + 1], want, atol=1e-12)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=1e-6, rtol=1e-6)
    dense_q, dense_k, dense_v = qkv(2, 10, 10)                  # no offsets: flash_attn_func
    assert torch.allclose(cute.flash_attn_varlen_func(dense_q, dense_k, dense_v, causal=True)[0],
                          flash_definition(dense_q, dense_k, dense_v, True, (-1, -1)), atol=1e-12)


def test_flash_attn_4_arguments_attngen_does_not_compute_are_refused_by_name():
    from attngen.flash_attn import cute
    q, k, v = qkv(1, 4, 4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for kwargs, name in [({"mask_mod": print}, "mask_mod"), ({"block_size": (64, 64)}, "block_size"),
                         ({"window_size": 5}, "window_size must be")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            cute.flash_attn_func(q, k, v, **kwargs)
    for kwargs, name in [({"score_mod": print}, "score_mod"), ({"seqused_q": cu}, "seqused_q"),
                         ({"aux_tensors": [cu]}, "aux_tensors"), ({"seqused_k": cu}, "seqused_k over contiguous"),
                         ({"page_table": cu[None]}, "seqused_k, not cu_seqlens_k")]:
        with pytest.raises(attngen.ArgumentError, match=name):
            cute.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)


def test_flash_attn_combine_merges_attention_over_split_keys():
    """FlashAttention 3's and 4's flash_attn_combine: attention over three slices of the keys,
    merged by their log-sum-exps, is attention over all of them; a slice where a row sees no
    key (lse -inf, its partial output anything) weighs nothing; a row that sees none at all
    gives 0 and +inf."""
    from attngen import flash_attn_interface as fa3
    from attngen.flash_attn import cute
    q, k, v = qkv(2, 6, 30)
    whole, whole_lse = flash_definition(q, k, v, False, (-1, -1), lse=True)
    parts, lses = [], []
    for keys in (slice(0, 7), slice(7, 20), slice(20, 30)):
        out, lse = flash_definition(q, k[:, keys], v[:, keys], False, (-1, -1), lse=True)
        parts.append(out)
        lses.append(lse.transpose(1, 2))                   # (B, S, H)
    parts.append(torch.full_like(parts[0], float("nan")))  # a slice no row sees
    lses.append(torch.full_like(lses[0], float("-inf")))
    out_partial, lse_partial = torch.stack(parts).float(), torch.stack(lses).float()
    lse_partial[:, 1, 2, 0] = float("-inf")                # one row that sees no key at all
    for combine in (fa3.flash_attn_combine, cute.flash_attn_combine):
        out, lse = combine(out_partial, lse_partial, out_dtype=torch.float64)
        assert out.dtype == torch.float64 and lse.shape == (2, 6, 4)
        assert torch.all(out[1, 2, 0] == 0) and lse[1, 2, 0] == float("inf")
        out[1, 2, 0], lse[1, 2, 0] = whole[1, 2, 0], whole_lse[1, 0, 2]
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), whole_lse.transpose(1, 2), atol=1e-5, rtol=1e-5)
    packed, packed_lse = fa3.flash_attn_combine(out_partial.flatten(1, 2), lse_partial.flatten(1, 2))
    assert packed.shape == (12, 4, 8) and packed_lse.shape == (12, 4)
    with pytest.raises(attngen.ArgumentError, match="lse_partial its shape"):
        fa3.flash_attn_combine(out_partial, lse_partial[:, :, :, :2])
