import math

import pytest
import torch

from attngen.core import reference
from attngen.core.mask import Mask

MASKS = [Mask(True), Mask(True, 0), Mask(True, 6), Mask(False), Mask(False, 3, 5), Mask(False, 0, 0)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.tag)
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("seq,chunk", [(1, 4), (13, 4), (33, 8), (20, 256)])
def test_banded_equals_dense(mask, heads, heads_kv, seq, chunk):
    gen = torch.Generator().manual_seed(seq * 31 + heads_kv)
    q = torch.randn(2, heads, seq, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, heads_kv, seq, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(2, heads_kv, seq, 16, generator=gen, dtype=torch.float64)
    banded = reference.attention(q, k, v, mask, chunk=chunk)
    dense = reference.dense(q, k, v, mask)
    torch.testing.assert_close(banded, dense, rtol=1e-12, atol=1e-12)


def test_dense_matches_torch_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for mask, is_causal in [(Mask(True), True), (Mask(False), False)]:
        expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        torch.testing.assert_close(reference.dense(q, k, v, mask), expect)


def test_window_equals_an_explicit_band_mask_in_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    i = torch.arange(30)[:, None]
    j = torch.arange(30)[None, :]
    band = (j <= i) & (j > i - 5)              # transformers' sliding_window_overlay(5)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
    torch.testing.assert_close(reference.attention(q, k, v, Mask.from_window(5), chunk=7), expect)


def test_layout_scale_and_dtype():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 9, 4, 8, generator=gen)        # (B, S, H, D)
    k = torch.randn(2, 9, 2, 8, generator=gen)
    v = torch.randn(2, 9, 2, 8, generator=gen)
    mask = Mask.from_window(3)
    out = reference.attention(q, k, v, mask, layout="bshd", scale=0.7)
    assert out.dtype == torch.float64 and out.shape == q.shape
    expect = reference.dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=0.7)
    torch.testing.assert_close(out, expect.transpose(1, 2))


def test_row_without_visible_key_is_zero():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3))
    out = reference.attention(q, k[:, :, :0], v[:, :, :0], Mask(False))
    assert torch.equal(out, torch.zeros_like(out))


def test_rejects_bad_heads_and_layout():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        reference.attention(q, k, k, Mask(True))
    with pytest.raises(ValueError, match="layout"):
        reference.attention(q, q, q, Mask(True), layout="sbhd")


def test_query_slice_with_offset_equals_the_full_result():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 40, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    for mask in MASKS:
        full = reference.attention(q, k, v, mask, chunk=16)
        part = reference.attention(q[:, :, 25:], k, v, mask, q_offset=25, chunk=16)
        torch.testing.assert_close(part, full[:, :, 25:], rtol=1e-12, atol=1e-12)


def test_softcap_sinks_and_chunked_queries_equal_dense():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64) * 3
    k, v = (torch.randn(2, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    for mask in MASKS:
        kw = dict(softcap=2.0, sinks=sinks, q_offset=21)
        banded = reference.attention(q, k, v, mask, chunk=4, **kw)
        torch.testing.assert_close(banded, reference.dense(q, k, v, mask, **kw), rtol=1e-12, atol=1e-12)


def test_sinks_follow_gpt_oss_eager_formula():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    scores = q @ k.transpose(-1, -2) * 8 ** -0.5
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    logits = torch.cat([scores, sinks.reshape(1, 2, 1, 1).expand(1, 2, 6, 1)], dim=-1)
    expect = torch.softmax(logits, dim=-1)[..., :-1] @ v
    torch.testing.assert_close(reference.attention(q, k, v, Mask(True), sinks=sinks), expect)


def test_varlen_sequences_never_see_each_other():
    gen = torch.Generator().manual_seed(6)
    lens = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18])
    q, k, v = (torch.randn(18, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = Mask.from_window(3)
    out = reference.varlen(q, k, v, cu, cu, mask)
    for b, n in enumerate(lens):
        s = cu[b].item()
        one = reference.dense(q[None, s:s + n], k[None, s:s + n], v[None, s:s + n], mask, layout="bshd")[0]
        torch.testing.assert_close(out[s:s + n], one)


def test_probabilities_cap_before_the_mask_sinks_in_the_denominator_empty_rows_zero():
    """The shared softmax (reference, transformers decode and fallback, context parallelism):
    the cap applies to the scores before the mask; a sink takes its share of each row and adds
    no key; a row with no visible key and no sink is all zeros with the default fill, and
    spreads evenly with transformers' finite fill."""
    from attngen.core.reference import probabilities, resolve_scale

    assert resolve_scale(None, 64) == 0.125 and resolve_scale(0.3, 64) == 0.3
    scores = torch.tensor([[80.0, 0.0, -80.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    visible = torch.tensor([[True, True, False], [False, False, False]])
    capped = probabilities(scores, visible, softcap=10.0)
    want = torch.softmax(torch.tensor([10 * math.tanh(8.0), 0.0], dtype=torch.float64), -1)
    assert torch.allclose(capped[0, :2], want) and capped[0, 2] == 0
    assert torch.equal(capped[1], torch.zeros(3, dtype=torch.float64))
    uniform = probabilities(scores, visible, fill=torch.finfo(scores.dtype).min)
    assert torch.allclose(uniform[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    sink = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
    with_sink = probabilities(scores, visible, sinks=sink)
    plain = probabilities(scores, visible)
    p_sink = 1 - with_sink.sum(-1)
    assert torch.allclose(p_sink[0], torch.sigmoid(0.5 - torch.logsumexp(scores[0, :2], 0)))
    assert torch.allclose(with_sink[0], plain[0] * (1 - p_sink[0]))
    assert p_sink[1] == 1
