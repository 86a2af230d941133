"""transformers config -> YAML model spec (`attngen spec --from-hf-config`), on the CPU."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from attngen.integrations import hfconfig  # noqa: E402
from attngen.cli import main  # noqa: E402
from attngen.integrations import transformers as ag  # noqa: E402
from attngen.core.mask import Mask  # noqa: E402
from attngen.generate.spec import SpecError, load_files, load_text  # noqa: E402

from hf_models import MODELS, tiny_config, tiny_model  # noqa: E402

W = lambda w: Mask.from_window(w, causal=True)  # noqa: E731
FULL = Mask(True)


def small(cls, **kw):
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=512)
    return getattr(transformers, cls)(**{**common, **kw})


# config -> expected (layers, gqa, head_dim, scale, softcap, sinks)
CASES = {
    "mistral": (small("MistralConfig", num_hidden_layers=3, head_dim=128, sliding_window=4096),
                dict(layers=(W(4096),) * 3, gqa=4, head_dim=128)),
    "mixtral": (small("MixtralConfig", num_hidden_layers=2, sliding_window=None, num_attention_heads=4),
                dict(layers=(FULL,) * 2, gqa=2, head_dim=64)),                       # D = 256 // 4
    "gemma2": (small("Gemma2Config", num_hidden_layers=4, head_dim=256, sliding_window=4096,
                     query_pre_attn_scalar=224, attn_logit_softcapping=50.0),
               dict(layers=(W(4096), FULL) * 2, gqa=4, head_dim=256, scale=224 ** -0.5, softcap=50.0)),
    "gemma3": (transformers.Gemma3Config(text_config=dict(
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_size=256, intermediate_size=512, vocab_size=512, sliding_window=1024,
                   query_pre_attn_scalar=256)),
               dict(layers=(W(1024),) * 5 + (FULL,) + (W(1024),) * 2, gqa=2, head_dim=256, scale=1 / 16)),
    "gpt-oss": (small("GptOssConfig", num_hidden_layers=4, head_dim=64, sliding_window=128,
                      num_local_experts=4, num_experts_per_tok=2),
                dict(layers=(W(128), FULL) * 2, gqa=4, head_dim=64, sinks=True)),
    "qwen2": (small("Qwen2Config", num_hidden_layers=4, use_sliding_window=True, sliding_window=512,
                    max_window_layers=2, num_attention_heads=4),                       # D = 256 // 4
              dict(layers=(FULL, FULL, W(512), W(512)), gqa=2, head_dim=64)),
    "qwen2-no-swa": (small("Qwen2Config", num_hidden_layers=2, sliding_window=512,    # use_sliding_window off
                           num_attention_heads=4), dict(layers=(FULL, FULL), gqa=2, head_dim=64)),
    "modernbert": (transformers.ModernBertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                                                 intermediate_size=512, vocab_size=512, local_attention=128,
                                                 global_attn_every_n_layers=3),
                   dict(layers=(Mask(False), Mask(False, 64, 64), Mask(False, 64, 64), Mask(False)),
                        gqa=1, head_dim=64)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_config_gives_the_models_attention(family):
    config, expect = CASES[family]
    got = hfconfig.attention_of(config)
    assert got.layers == expect["layers"]
    assert (got.gqa, got.head_dim) == (expect["gqa"], expect["head_dim"])
    assert got.scale == pytest.approx(expect.get("scale")) if "scale" in expect else got.scale is None
    assert got.softcap == expect.get("softcap")
    assert got.sinks == expect.get("sinks", False)
    assert got.causal == (family != "modernbert")


@pytest.mark.parametrize("family", sorted(CASES))
def test_yaml_loads_back_to_the_same_layers(family):
    config, expect = CASES[family]
    text = hfconfig.to_yaml(hfconfig.attention_of(config), family.replace("_", "-"), ["fp16", "bf16"])
    (spec,) = load_text(text)
    assert spec.layers == expect["layers"]
    assert spec.dtypes == ("fp16", "bf16")
    assert {k.gqa for k in spec.kernels} == {expect["gqa"]}
    assert spec.scale == (pytest.approx(expect["scale"]) if "scale" in expect else None)
    assert {k.features.softcap for k in spec.kernels} == {expect.get("softcap")}
    assert {k.features.sinks for k in spec.kernels} == {expect.get("sinks", False)}


def test_layer_pattern_is_folded_to_its_period():
    config, _ = CASES["gemma3"]
    text = hfconfig.to_yaml(hfconfig.attention_of(config), "g3")
    assert "count: 8\n  pattern: [1024, 1024, 1024, 1024, 1024, null]\n" in text
    config, _ = CASES["modernbert"]
    text = hfconfig.to_yaml(hfconfig.attention_of(config), "mb")
    assert "pattern: [null, {left: 64, right: 64}, {left: 64, right: 64}]" in text


@pytest.mark.parametrize("family", sorted(MODELS))
def test_spec_matches_what_each_layer_passes_at_run_time(family, monkeypatch):
    """Run the tiny model (CPU, fallback path) and record the mask every layer call asks for."""
    seen = {}
    real = Mask.from_transformers

    def spy(cls, sliding_window, causal):
        mask = real(sliding_window, causal)
        seen.setdefault(len(seen), mask)
        return mask
    monkeypatch.setattr(Mask, "from_transformers", classmethod(spy))
    ag.register()
    model = tiny_model(family, "attngen", torch.float32)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 512, (1, 12)))
    monkeypatch.undo()
    expect = hfconfig.attention_of(tiny_config(family)).layers
    assert tuple(seen[i] for i in range(len(seen))) == expect


def test_cli_writes_a_buildable_spec(tmp_path, capsys):
    config, _ = CASES["gemma2"]
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path / "gemma-2-9b")
    out = tmp_path / "g2.yaml"
    assert main(["spec", "--from-hf-config", str(tmp_path / "gemma-2-9b" / "config.json"), "-o", str(out)]) == 0
    (spec,) = load_files([out])
    assert spec.name == "gemma-2-9b" and spec.dtypes == ("bf16",)
    assert "softcap: 50.0" in out.read_text()
    assert main(["spec", "--from-hf-config", str(tmp_path / "gemma-2-9b"), "--name", "g2",
                 "--dtype", "fp16"]) == 0                                   # a model directory, to stdout
    (spec,) = load_text(capsys.readouterr().out)
    assert spec.name == "g2" and spec.dtypes == ("fp16",)


def test_cli_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["spec", "--from-hf-config", str(tmp_path / "missing" / "config.json")]) == 2
    assert "no such file or model directory" in capsys.readouterr().err
    assert main(["spec", "--from-hf-config", "nobody/not-cached-model"]) == 2
    assert "local HF cache" in capsys.readouterr().err
    small("MistralConfig", num_hidden_layers=2, head_dim=72).save_pretrained(tmp_path / "odd")
    out = tmp_path / "odd.yaml"
    assert main(["spec", "--from-hf-config", str(tmp_path / "odd"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "head_dim: head_dim 72 is not supported" in err
    assert not out.exists()                                                 # nothing half-written


def test_unsupported_layer_types_are_refused():
    config = small("MistralConfig", num_hidden_layers=2, head_dim=64, sliding_window=64)
    config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(SpecError, match="chunked_attention"):
        hfconfig.attention_of(config)


def test_bad_sliding_window_is_refused():
    config = small("MistralConfig", num_hidden_layers=2, head_dim=64, sliding_window=64)
    config.sliding_window = -3
    with pytest.raises(SpecError, match="sliding_window must be a positive integer, got -3"):
        hfconfig.attention_of(config)
