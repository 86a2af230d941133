"""`attngen bench model`'s pure parts: configs, the padded batch, argument parsing, the rows.

Timing needs a GPU; here the same code runs on tiny stand-ins of the models on the CPU (the
attngen implementation falls back to PyTorch there), which checks everything but the numbers."""
import json

import pytest

from attngen.bench import cli, models as bm


def test_configs_have_the_real_shapes():
    pytest.importorskip("transformers")
    mistral = bm.build_config("mistral-7b")
    assert (mistral.num_hidden_layers, mistral.hidden_size, mistral.num_attention_heads,
            mistral.num_key_value_heads, mistral.head_dim, mistral.intermediate_size,
            mistral.sliding_window, mistral.vocab_size) == (4, 4096, 32, 8, 128, 14336, 4096, 32000)
    assert type(mistral).__name__ == "MistralConfig"

    gemma = bm.build_config("gemma-3-4b")
    assert type(gemma).__name__ == "Gemma3TextConfig"
    assert (gemma.num_hidden_layers, gemma.hidden_size, gemma.intermediate_size, gemma.num_attention_heads,
            gemma.num_key_value_heads, gemma.head_dim, gemma.sliding_window,
            gemma.query_pre_attn_scalar) == (6, 2560, 10240, 8, 4, 256, 1024, 256)
    assert gemma.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert bm.build_config("gemma-3-4b", 12).layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 2

    oss = bm.build_config("gpt-oss-20b")
    assert type(oss).__name__ == "GptOssConfig"
    assert (oss.num_hidden_layers, oss.hidden_size, oss.num_attention_heads, oss.num_key_value_heads,
            oss.head_dim, oss.sliding_window, oss.num_local_experts,
            oss.num_experts_per_tok) == (4, 2880, 64, 8, 64, 128, 32, 4)
    assert oss.layer_types == ["sliding_attention", "full_attention"] * 2


def test_config_fields_are_pure_and_take_layers_and_positions():
    fields = bm.config_fields("mistral-7b", 2, min_positions=65536)
    assert fields["num_hidden_layers"] == 2 and fields["max_position_embeddings"] == 65536
    assert "layer_types" not in fields                 # every Mistral layer slides
    assert bm.config_fields("gpt-oss-20b", 3)["layer_types"] == \
        ["sliding_attention", "full_attention", "sliding_attention"]
    tiny = bm.config_fields("gemma-3-4b", overrides=bm.TINY)
    assert tiny["hidden_size"] == 64 and "num_local_experts" not in tiny    # only the model's own keys
    with pytest.raises(ValueError, match="at least one layer"):
        bm.config_fields("mistral-7b", 0)


def test_padded_batch_pads_a_quarter_of_row_zero_on_the_left():
    mask, positions = bm.padded_batch(32768)
    assert mask.shape == positions.shape == (2, 16384)
    assert mask[0, :4096].sum() == 0 and bool(mask[0, 4096:].all()) and bool(mask[1].all())
    assert positions[0, 4096].item() == 0 and positions[0, -1].item() == 16384 - 4096 - 1
    assert positions[1].tolist() == list(range(16384))
    assert positions[0, :4096].sum() == 0
    assert bm._shape_label("prefill-padded", bm.Options(seq=32768)) == "2x16384, row 0 4096 pad"


def test_eager_is_skipped_where_its_scores_do_not_fit():
    pytest.importorskip("transformers")
    opts = bm.Options(seq=32768, context=8192)
    mistral, gemma = bm.build_config("mistral-7b"), bm.build_config("gemma-3-4b")
    assert bm.eager_score_bytes(mistral, 1, 32768, 32768) == 32 * 32768 ** 2 * 2
    assert "skipped" in bm._eager_limit_reason(mistral, "prefill", opts)
    assert "skipped" in bm._eager_limit_reason(mistral, "prefill-padded", opts)     # 34 GB
    assert bm._eager_limit_reason(mistral, "decode", opts) is None
    assert bm._eager_limit_reason(gemma, "prefill", opts) is None                   # 17 GB
    assert "skipped" in bm._eager_limit_reason(bm.build_config("gpt-oss-20b"), "prefill", opts)


def test_arguments():
    args = cli.parse_args(["model"])
    assert args.model == list(bm.MODELS) and args.impl == list(bm.IMPLS)
    assert args.measures == ["prefill", "prefill-padded", "decode"] and args.layers == {}
    assert (args.options.seq, args.options.context, args.options.new_tokens) == (32768, 8192, 32)
    args = cli.parse_args(["model", "--compiled", "--layers", "2", "gemma-3-4b=6", "--seq", "4096"])
    assert args.measures[-1] == "decode-compiled" and args.options.seq == 4096
    assert args.layers == {"mistral-7b": 2, "gemma-3-4b": 6, "gpt-oss-20b": 2}
    assert cli.parse_args(["model", "--compiled-only"]).measures == ["decode-compiled"]
    for bad in (["--layers", "llama=2"], ["--layers", "0"], ["--new-tokens", "1"], ["--impl", "flash"]):
        with pytest.raises(SystemExit):
            cli.parse_args(["model", *bad])


def test_bench_model_without_gpu_says_so(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main(["model", "--model", "mistral-7b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["model", "--help"])
    assert "attngen bench model" in capsys.readouterr().out


def test_rows_from_tiny_models_on_the_cpu(tmp_path):
    """The whole run on tiny stand-ins: one row per model, implementation and measurement,
    failures (gpt-oss has no SDPA path; eager past its limit) as rows with their error."""
    pytest.importorskip("transformers")
    import torch

    path = tmp_path / "rows.json"
    argv = ["--model", "mistral-7b", "gpt-oss-20b", "--impl", "attngen", "sdpa", "eager", "--layers", "2",
            "--seq", "48", "--context", "24", "--new-tokens", "3", "--reps", "1", "--json", str(path),
            "--eager-limit-gb", str(3 * 48 * 48 * 2 / 1e9)]
    said = []
    rows = bm.run(cli.parse_args(["model", *argv]), argv, device="cpu", overrides=dict(bm.TINY), say=said.append)
    got = json.loads(path.read_text())
    assert got["command"].startswith("attngen bench model --model") and got["partial"] is False
    assert got["rows"] == json.loads(json.dumps(rows))
    assert len(rows) == 2 * 3 * 3
    for row in rows:
        assert set(bm.ROW_KEYS) <= set(row)
        assert (row["ms"] is None) == (row["error"] is not None)
        assert row["gpu"] and row["peak_mb"] is None                   # no GPU memory on a CPU
    by = {(r["model"], r["impl"], r["measure"]): r for r in rows}
    assert by[("mistral-7b", "attngen", "prefill")]["ms"] > 0
    assert by[("mistral-7b", "attngen", "decode")]["reference"] == "sdpa"
    assert by[("mistral-7b", "eager", "prefill")]["error"].startswith("skipped: eager attention scores 1x4x48x48")
    assert by[("mistral-7b", "eager", "prefill-padded")]["ms"] > 0         # 2 x 24 x 24 fits
    assert "does not support" in by[("gpt-oss-20b", "sdpa", "prefill")]["error"]
    assert by[("gpt-oss-20b", "attngen", "decode")]["reference"] == "eager"
    assert by[("gpt-oss-20b", "eager", "decode")]["same_tokens"] == 3
    assert by[("gpt-oss-20b", "eager", "decode")]["logits_rel_diff"] is None          # the reference
    # the same computation in PyTorch on a CPU (attngen falls back there); eager's prefill skipped
    for impl, measure in [("attngen", "prefill"), ("attngen", "prefill-padded"), ("attngen", "decode"),
                          ("eager", "prefill-padded"), ("eager", "decode")]:
        assert by[("mistral-7b", impl, measure)]["logits_rel_diff"] < 0.05
    table = said[-1]
    assert "mistral-7b: 2 layers" in table and "skipped" in table and "gpt-oss-20b" in table
    assert torch.get_default_device().type == "cpu"


def test_table_and_plot(tmp_path):
    rows = [{"model": "m", "impl": impl, "measure": measure, "ms": None if impl == "eager" else 2.0,
             "peak_mb": 1024.0, "gpu": "test", "error": "skipped: too big" if impl == "eager" else None,
             "tokens": "1x8", "layers": 1, "weights_mb": 512.0, "same_tokens": None, "reference": None}
            for impl in ("attngen", "sdpa", "eager") for measure in ("prefill", "decode")]
    text = bm.table(rows)
    assert "2.00 / 1.0G" in text and "skipped" in text
    import matplotlib  # noqa: F401  (the test extra installs it: the plots are tested everywhere)
    bm.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
