"""Tiny randomly initialized transformers models whose sequences outrun their windows."""

# family -> config class name, model class name, causal, config overrides
MODELS = {
    "mistral": dict(config="MistralConfig", model="MistralForCausalLM", causal=True,
                    extra=dict(sliding_window=8)),
    "gemma3": dict(config="Gemma3TextConfig", model="Gemma3ForCausalLM", causal=True,
                   extra=dict(sliding_window=8, query_pre_attn_scalar=64,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                           "sliding_attention"])),
    "gemma2": dict(config="Gemma2Config", model="Gemma2ForCausalLM", causal=True,
                   extra=dict(sliding_window=8, query_pre_attn_scalar=64, attn_logit_softcapping=50.0)),
    "gpt-oss": dict(config="GptOssConfig", model="GptOssForCausalLM", causal=True,
                    extra=dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
                               layer_types=["sliding_attention", "full_attention"] * 2)),
    "qwen2": dict(config="Qwen2Config", model="Qwen2ForCausalLM", causal=True,
                  extra=dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "modernbert": dict(config="ModernBertConfig", model="ModernBertForMaskedLM", causal=False,
                       extra=dict(local_attention=16, global_attn_every_n_layers=2,
                                  pad_token_id=0)),
}


def tiny_config(family, initializer_range=0.02):
    import transformers

    spec = MODELS[family]
    config_cls = getattr(transformers, spec["config"])
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, initializer_range=initializer_range)
    if family != "modernbert":
        common.update(num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    return config_cls(**common, **spec["extra"])


def tiny_model(family, attn_implementation, dtype, initializer_range=0.02, **overrides):
    import transformers

    config = tiny_config(family, initializer_range)
    for key, value in overrides.items():
        setattr(config, key, value)
    model_cls = getattr(transformers, MODELS[family]["model"])
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


# a padding-free batch of two rows: several sequences along each row (position ids restart),
# and each sequence's (row, start, end)
PACKED_ROWS = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5],
               [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 0, 1, 2, 3, 4, 5, 6]]
SEQUENCES = [(0, 0, 12), (0, 12, 22), (0, 22, 28), (1, 0, 21), (1, 21, 28)]


IMAGE_TOKEN = 299


def tiny_gemma3_vision(attn_implementation, dtype, initializer_range=0.02):
    """A tiny Gemma 3 with its vision tower (Gemma3ForConditionalGeneration): its image tokens
    see each other both ways, an overlay on the causal mask.  ``image_batch`` makes inputs."""
    import transformers

    text = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=8,
                query_pre_attn_scalar=64, max_position_embeddings=512, initializer_range=initializer_range,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=IMAGE_TOKEN, boi_token_index=297,
                                       eoi_token_index=298, initializer_range=initializer_range)
    model = transformers.Gemma3ForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def image_batch(device="cpu", dtype=None, seq=24):
    """Input ids of two rows with 4 image tokens each (at different places), their
    token_type_ids and one image per row."""
    import torch

    ids = torch.randint(1, 290, (2, seq), device=device)
    ids[0, 5:9] = ids[1, 12:16] = IMAGE_TOKEN
    pixels = torch.randn(2, 3, 28, 28, device=device, dtype=dtype)
    return ids, (ids == IMAGE_TOKEN).long(), pixels
