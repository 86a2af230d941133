"""The transformers integration on the CPU: registration, window conventions, fallback masks
against transformers' own, and whole tiny models against eager attention."""
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import masking_utils  # noqa: E402

from attngen.integrations import transformers as ag  # noqa: E402
from attngen.core.mask import Mask  # noqa: E402

from hf_models import MODELS, PACKED_ROWS, SEQUENCES, tiny_model  # noqa: E402


def test_register_adds_attention_and_mask_functions():
    ag.register()
    assert transformers.AttentionInterface._global_mapping["attngen"] is ag.attention_forward
    assert masking_utils.AttentionMaskInterface._global_mapping["attngen"] is ag.padding_mask


def test_layer_mask_follows_transformers_conventions():
    assert Mask.from_transformers(4096, causal=True) == Mask(True, 4095)     # kv_idx > q_idx - W
    assert Mask.from_transformers(None, causal=True) == Mask(True)
    assert Mask.from_transformers(65, causal=False) == Mask(False, 64, 64)   # ModernBERT: window // 2 + 1
    assert Mask.from_transformers(None, causal=False) == Mask(False)


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (1, 9), (3, 9)])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_causal_fallback_mask_equals_transformers(q_len, kv_len, window):
    padding = torch.ones(2, kv_len, dtype=torch.bool)
    padding[1, :2] = False                                    # left padding in the 2nd row
    fn = masking_utils.causal_mask_function if window is None else \
        masking_utils.sliding_window_causal_mask_function(window)
    expect = masking_utils.sdpa_mask(batch_size=2, q_length=q_len, kv_length=kv_len,
                                     q_offset=kv_len - q_len, mask_function=fn,
                                     attention_mask=padding, allow_is_causal_skip=False)
    got = ag.fallback_mask(Mask.from_transformers(window, True), q_len, kv_len, padding, "cpu")
    assert torch.equal(got.expand_as(expect), expect)


@pytest.mark.parametrize("half_window", [None, 0, 2])
def test_bidirectional_fallback_mask_equals_transformers(half_window):
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, -3:] = False                                   # right padding (encoder)
    fn = masking_utils.bidirectional_mask_function if half_window is None else \
        masking_utils.sliding_window_bidirectional_mask_function(half_window)
    expect = masking_utils.sdpa_mask(batch_size=2, q_length=8, kv_length=8, mask_function=fn,
                                     attention_mask=padding, allow_is_causal_skip=False)
    # the attention module passes sliding_window = half_window + 1
    mask = Mask.from_transformers(None if half_window is None else half_window + 1, causal=False)
    got = ag.fallback_mask(mask, 8, 8, padding, "cpu")
    assert torch.equal(got.expand_as(expect), expect)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_tiny_model_on_cpu_matches_eager(family, caplog):
    """On the CPU every call falls back, with the window: logits must equal eager's."""
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    model = tiny_model(family, "eager", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0 if MODELS[family]["causal"] else 1
    if not MODELS[family]["causal"]:
        mask[1, -3:] = 0
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("attngen")
        with caplog.at_level(logging.WARNING, logger="attngen"):
            got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expect[keep], rtol=1e-4, atol=1e-4)
    reasons = [r.message for r in caplog.records if "falling back" in r.message]
    assert reasons and all("on cpu" in m for m in reasons), reasons


def test_from_pretrained_takes_attn_implementation_attngen(tmp_path):
    """The README's way in: register, then from_pretrained(..., attn_implementation="attngen")."""
    import attngen

    tiny_model("gemma3", "eager", torch.float32).save_pretrained(tmp_path / "tiny-gemma3")
    attngen.register_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny-gemma3", attn_implementation="attngen", dtype=torch.float32)
    assert model.config._attn_implementation == "attngen"
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny-gemma3", attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(1, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_training_step_on_cpu_matches_eager(family, caplog):
    """A model in train() mode on the CPU falls back to PyTorch with the window: every
    parameter's gradient as with eager attention (the GPU test runs the generated backward)."""
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    model = tiny_model(family, "eager", torch.float32).train()
    ids = torch.randint(1, model.config.vocab_size, (2, 21))

    def grads():
        model.zero_grad()
        model(input_ids=ids).logits.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expect = grads()
    model.set_attn_implementation("attngen")
    with caplog.at_level(logging.WARNING, logger="attngen"):
        got = grads()
    assert set(got) == set(expect)
    attention = [n for n in got if any(p in n for p in ("q_proj", "k_proj", "Wqkv", "sinks"))]
    assert attention and all(got[n].abs().sum() > 0 for n in attention)
    for name in expect:
        torch.testing.assert_close(got[name], expect[name], rtol=1e-4, atol=1e-5, msg=name)
    reasons = [r.message for r in caplog.records if "falling back" in r.message]
    assert reasons and all("on cpu" in m for m in reasons), reasons


def test_mixed_precision_runs_on_the_kernels_in_the_autocast_dtype(monkeypatch, caplog):
    """fp32 weights under torch.autocast (transformers' Trainer with bf16=True): rotary
    embeddings hand the attention function fp32 queries and keys and a bf16 value.  Outside
    autocast such a call falls back; inside, it runs on attngen's kernel in bf16, as SDPA
    would.  Fake CUDA tensors (the fallback cannot run on them in a CPU build of torch, which
    also turns CUDA autocast off: its two queries stand in for it)."""
    import types
    from torch._subclasses.fake_tensor import FakeTensorMode

    ag._said.clear()
    layer = types.SimpleNamespace(is_causal=True, training=True)
    with FakeTensorMode(), caplog.at_level(logging.WARNING, logger="attngen"):
        q = torch.randn(2, 4, 16, 64, device="cuda")           # (B, H, S, D), as transformers passes
        k = torch.randn(2, 2, 16, 64, device="cuda")
        v = torch.randn(2, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
        assert ag._fallback_reason(layer, q, False, 0.0) == "dtype torch.float32"
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type="cuda": device_type == "cuda")
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
        out, _ = ag.attention_forward(layer, q, k, v, None, scaling=0.125, sliding_window=8)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 4, 64)
    assert not [r.message for r in caplog.records if "falling back" in r.message]


# ModernBERT does not hand its position ids to attention (nor do eager and SDPA look at them
# there): only FlashAttention's offsets pack it
@pytest.mark.parametrize("family, how", [(f, h) for f in sorted(MODELS) for h in ("position_ids", "offsets")
                                         if (f, h) != ("modernbert", "position_ids")])
def test_packed_rows_keep_their_sequences_apart(family, how):
    """A padding-free batch (several sequences along each row, as transformers'
    DataCollatorWithFlattening makes them, marked by restarting position ids or by
    FlashAttention's cu_seq_lens/max_length): every sequence gets the logits it has alone."""
    ag.register()
    torch.manual_seed(0)
    model = tiny_model(family, "attngen", torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 28))
    positions = torch.tensor(PACKED_ROWS)
    cu = torch.tensor([0, 12, 22, 28, 49, 56], dtype=torch.int32)
    extra = {"position_ids": positions} if how == "position_ids" else \
        {"position_ids": positions, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": 21,
         "max_length_k": 21}
    with torch.no_grad():
        packed = model(input_ids=ids, use_cache=False, **extra).logits
        for row, start, end in SEQUENCES:
            alone = model(input_ids=ids[row:row + 1, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[row, start:end], alone, rtol=1e-4, atol=1e-5)


def test_packed_rows_given_as_offsets_compile_in_one_graph(caplog):
    """FlashAttention's offsets need no host read: torch.compile(fullgraph=True) traces a
    padding-free batch given so into one graph, with the eager call's logits.  Given only as
    restarting position ids, which cannot be read while tracing, the sequences are not looked
    for, and attngen says so."""
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    model = tiny_model("mistral", "attngen", torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 28))
    cu = torch.tensor([0, 12, 22, 28, 49, 56], dtype=torch.int32)
    extra = {"position_ids": torch.tensor(PACKED_ROWS), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
             "max_length_q": 21, "max_length_k": 21}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False, **extra).logits,
                                   model(input_ids=ids, use_cache=False, **extra).logits)
        with caplog.at_level(logging.WARNING, logger="attngen"):
            compiled(input_ids=ids[:1], use_cache=False, position_ids=extra["position_ids"][:1])
    assert any("position_ids are not looked for" in r.message for r in caplog.records), caplog.records


def test_fp32_queries_of_a_half_precision_layer_run_in_its_dtype(caplog):
    """Outside autocast, fp32 queries and keys reach a layer whose weights are bf16 when PEFT
    keeps some layers in fp32: they run on attngen's kernel in the weights' dtype, as
    transformers' FlashAttention path runs them.  A float32 layer keeps float32 (the
    fallback)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ag._said.clear()
    layer = torch.nn.Module()
    layer.q_proj = torch.nn.Linear(8, 8, dtype=torch.bfloat16)
    layer.is_causal, layer.training = True, True
    with FakeTensorMode(), caplog.at_level(logging.WARNING, logger="attngen"):
        q = torch.randn(2, 4, 16, 64, device="cuda")
        k, v = torch.randn(2, 2, 16, 64, device="cuda"), torch.randn(2, 2, 16, 64, device="cuda")
        out, _ = ag.attention_forward(layer, q, k, v, None, scaling=0.125, sliding_window=8)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 4, 64)
    assert not [r.message for r in caplog.records if "falling back" in r.message]
    layer.q_proj.to(torch.float32)
    assert all(t.dtype == torch.float32 for t in ag._weights_dtype(layer, *(torch.ones(2) for _ in range(3))))


def test_image_tokens_that_see_each_other_keep_transformers_mask():
    """Gemma 3 with images: its image tokens see each other both ways, an overlay on the causal
    mask that no kernel computes.  attngen's mask function finds it and hands the layers
    transformers' own mask (they fall back to PyTorch with it): logits as eager's.  A batch
    without images keeps the kernels' mask (None: no padding)."""
    from hf_models import image_batch, tiny_gemma3_vision

    ag.register()
    torch.manual_seed(0)
    model = tiny_gemma3_vision("eager", torch.float32)
    ids, token_types, pixels = image_batch()
    with torch.no_grad():
        expect = model(input_ids=ids, token_type_ids=token_types, pixel_values=pixels, use_cache=False).logits
        text = model(input_ids=ids[:, 17:], use_cache=False).logits
        model.set_attn_implementation("attngen")
        got = model(input_ids=ids, token_type_ids=token_types, pixel_values=pixels, use_cache=False).logits
        text_got = model(input_ids=ids[:, 17:], use_cache=False).logits
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_got, text, rtol=1e-4, atol=1e-5)
    later = lambda b, h, q, kv: kv <= q + (q == 3).long()      # noqa: E731  (query 3 sees key 4)
    dense = ag.padding_mask(1, 8, 8, mask_function=later, use_vmap=True)
    assert dense.shape == (1, 1, 8, 8) and bool(dense[0, 0, 3, 4]) and not bool(dense[0, 0, 2, 3])
    causal = transformers.masking_utils.causal_mask_function
    assert ag.padding_mask(1, 8, 8, mask_function=causal, use_vmap=True) is None
    assert ag.padding_mask(1, 8, 8, mask_function=later) is None      # not marked: never looked at

    def scalar_only(b, h, q, kv):   # a mask function written for vmap (one index at a time)
        return (kv <= q).view(1)[0]
    assert ag.padding_mask(1, 8, 8, mask_function=scalar_only, use_vmap=True).shape == (1, 1, 8, 8)
    both_ways = transformers.masking_utils.bidirectional_mask_function    # a bidirectional mask's call
    assert ag.padding_mask(1, 8, 8, mask_function=both_ways, use_vmap=True, allow_is_causal_skip=False,
                           allow_is_bidirectional_skip=True) is None


def test_padding_the_packed_kernels_take():
    """Left and right padding pack into one run per row; a hole in a row, or right padding
    under a chunk of queries after cached keys, goes to the fallback."""
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    hole = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]])

    def packs(mask, q_len, kv_len):
        return ag._packing(mask, q_len, kv_len, "cpu") is not None
    assert packs(right, 5, 5) and packs(left, 5, 5)
    assert packs(left, 2, 5)                                        # a chunk after cached keys
    assert not packs(right, 2, 5)
    assert not packs(hole, 5, 5)
    assert packs(torch.tensor([[0, 0, 0], [1, 1, 1]]), 3, 3)        # an empty row
    p = ag._packing(left, 2, 5, "cpu")
    assert [r.tolist() for r in p.keys] == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 2, 3, 4]]
    assert [r.tolist() for r in p.queries] == [[0, 0, 1, 1], [0, 1, 0, 1]]     # in the last 2
    assert p.cu_q.tolist() == [0, 2, 4] and p.cu_k.tolist() == [0, 5, 8]
    assert (p.longest_q, p.longest_k, p.chunked) == (2, 5, True)
    assert ag._packing(left, 2, 5, "cpu") is p                    # once per mask: every layer shares it


@pytest.mark.parametrize("window", [None, 1, 4, 64])
@pytest.mark.parametrize("feature", ["plain", "softcap", "sinks"])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_the_masked_computation(window, feature, padded):
    """A decode step reads only the keys its window reaches, GQA heads sharing K/V: the same
    numbers as the full masked computation over every cached key (``fallback``)."""
    torch.manual_seed(0)
    batch, heads, kv_heads, kv_len, d = 3, 8, 2, 23, 16
    query = torch.randn(batch, heads, 1, d, dtype=torch.float64)
    key, value = (torch.randn(batch, kv_heads, kv_len, d, dtype=torch.float64) for _ in range(2))
    padding = None
    if padded:
        padding = torch.ones(batch, kv_len, dtype=torch.long)
        padding[1, :5] = 0                                        # left padding
        padding[2, :kv_len - 2] = 0                               # only two real tokens
    mask = Mask.from_transformers(window, causal=True)
    extra = {"softcap": 2.0} if feature == "softcap" else {}
    if feature == "sinks":
        extra["sinks"] = torch.randn(heads, dtype=torch.float64)
    module = torch.nn.Module().eval()
    expect = ag.fallback(module, query * 3, key, value, padding, mask, 0.0, 0.3, **extra)
    got = ag.decode(query * 3, key, value, padding, mask, 0.3, **extra)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)   # the fallback softmaxes in fp32


@pytest.mark.parametrize("family", ["gemma3", "gpt-oss", "mistral"])
def test_static_cache_generation_matches_eager(family):
    """A static cache hands a full-attention layer all of its slots, the unfilled ones too:
    every step's logits must still equal eager attention's (prefill and decode)."""
    ag.register()
    torch.manual_seed(0)
    model = tiny_model(family, "eager", torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        expect = model.generate(ids, **kw)
        model.set_attn_implementation("attngen")
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, expect.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expect.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
