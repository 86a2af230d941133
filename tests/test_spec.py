from dataclasses import replace

import pytest

from attngen.core.mask import Mask
from attngen.generate.spec import SpecError, load_files, load_text, unique_kernels
from attngen.core.variant import KernelSpec

from conftest import SHIPPED, write

BASE = "name: t\ngqa: 4\nhead_dim: 128\ndtype: fp16\n"


def test_shipped_variants_load():
    specs = load_files(SHIPPED)
    names = {s.name for s in specs}
    assert {"mistral-7b", "mixtral-8x7b", "gemma3-4b", "gemma3-27b", "gpt-oss-20b",
            "modernbert-base", "full-causal"} <= names
    kernels = unique_kernels(specs)
    assert len({k.name for k in kernels}) == len(kernels)


def test_model_layer_maps():
    specs = {s.name: s for s in load_files(SHIPPED)}
    gemma = specs["gemma3-4b"]
    assert len(gemma.layers) == 34
    assert [m.left for m in gemma.layers[:7]] == [1023] * 5 + [None, 1023]
    assert gemma.scale == 0.0625 and gemma.gqa == 2 and gemma.head_dim == 256
    assert len(gemma.kernels) == 2                    # each distinct kernel once
    oss = specs["gpt-oss-20b"]
    assert [m.window for m in oss.layers[:4]] == [128, None, 128, None]
    bert = specs["modernbert-base"]
    assert bert.layers[0] == Mask(False) and bert.layers[1] == Mask(False, 64, 64)
    assert len(bert.layers) == 22 and len(bert.kernels) == 4     # 2 masks x 2 dtypes
    assert {k.mask for k in bert.kernels if k.dtype == "bf16"} == set(bert.layers)


def test_lists_expand_into_the_cross_product():
    (spec,) = load_text("name: x\nwindow: [128, null]\ngqa: [1, 8]\nhead_dim: [64, 128]\n"
                        "dtype: [fp16, bf16]\n")
    assert len(spec.kernels) == 16
    assert {k.mask.window for k in spec.kernels} == {128, None}


def test_several_documents_and_top_level_list():
    docs = load_text(BASE + "---\n" + BASE.replace("name: t", "name: u"))
    assert [d.name for d in docs] == ["t", "u"]
    listed = load_text("- {name: a, gqa: 1, head_dim: 64, dtype: bf16}\n"
                       "- {name: b, gqa: 1, head_dim: 64, dtype: bf16, causal: false}\n")
    assert [d.kernels[0].mask for d in listed] == [Mask(True), Mask(False)]


def test_tiles_override_merges_with_the_table():
    (spec,) = load_text(BASE + "tiles: {block_n: 64}\n")
    assert spec.kernels[0].tiles.block_n == 64
    assert spec.kernels[0].tiles.block_m == 128


@pytest.mark.parametrize("extra,path,line,match", [
    ("colour: red\n", "colour", 5, "unknown key 'colour'"),
    ("window: 0\n", "window", 5, "positive"),
    ("window: -4\n", "window", 5, "positive"),
    ("window: big\n", "window", 5, "positive integer"),
    ("window: [128, 0]\n", "window[1]", 5, "positive"),
    ("causal: false\nwindow: 128\n", "window", 6, "left: L, right: R"),
    ("causal: false\nwindow: {left: 1, rite: 2}\n", "window.rite", 6, "unknown key 'rite'"),
    ("causal: maybe\n", "causal", 5, "true or false"),
    ("scale: 0.1\n", "scale", 5, "add layers"),
    ("layers: [128]\nwindow: 128\n", "window", 6, "not both"),
    ("layers: {count: 3}\n", "layers", 5, "count and pattern"),
    ("layers: {count: 0, pattern: [1]}\n", "layers.count", 5, "positive"),
    ("layers: {count: 2, pattern: [1, -1]}\n", "layers.pattern[1]", 5, "positive"),
    ("layers: []\n", "layers", 5, "at least one"),
    ("tiles: {block_m: 100}\n", "tiles", 5, "power of two"),
    ("tiles: {warps: 4}\n", "tiles.warps", 5, "unknown key"),
    ("tiles: {worker_warps: 3}\n", "tiles", 5, "worker_warps must be one of"),
    ("tiles: {worker_warps: 8.0}\n", "tiles", 5, "worker_warps must be one of"),
    ("window: []\n", "window", 5, "empty list"),
])
def test_bad_specs_name_file_key_and_line(tmp_path, extra, path, line, match):
    f = write(tmp_path, BASE + extra)
    with pytest.raises(SpecError, match=match) as info:
        load_files([f])
    err = info.value
    assert (err.source, err.path, err.line) == (str(f), path, line)
    assert str(err).startswith(f"{f}:{line}: {path}: ")


@pytest.mark.parametrize("field,value,match", [
    ("gqa", "0", "gqa must be a positive integer"),
    ("gqa", "two", "gqa must be a positive integer"),
    ("head_dim", "72", "head_dim must be one of"),
    ("dtype", "fp32", "dtype must be one of"),
    ("dtype", "float16", "dtype must be one of"),
])
def test_bad_field_values(tmp_path, field, value, match):
    text = BASE.replace(f"{field}: ", f"{field}: {value} #", 1)
    f = write(tmp_path, text)
    with pytest.raises(SpecError, match=match) as info:
        load_files([f])
    assert info.value.path == field and info.value.line is not None


def test_missing_keys_duplicates_and_yaml_errors(tmp_path):
    with pytest.raises(SpecError, match="missing required key 'dtype'"):
        load_text("name: t\ngqa: 1\nhead_dim: 64\n")
    with pytest.raises(SpecError, match="duplicate key") as info:
        load_text(BASE + "gqa: 2\n", "dup.yaml")
    assert info.value.line == 5
    with pytest.raises(SpecError, match="invalid YAML") as info:
        load_text(BASE + "window: [1, 2\n", "broken.yaml")
    assert info.value.source == "broken.yaml" and info.value.line is not None
    with pytest.raises(SpecError, match="name must match"):
        load_text(BASE.replace("name: t", "name: Has Spaces"))
    a, b = write(tmp_path, BASE, "a.yaml"), write(tmp_path, BASE, "b.yaml")
    with pytest.raises(SpecError, match="already used"):
        load_files([a, b])
    with pytest.raises(SpecError, match="cannot read"):
        load_files([tmp_path / "missing.yaml"])
    with pytest.raises(SpecError, match="holds no spec"):
        load_files([write(tmp_path, "# nothing\n", "empty.yaml")])


def test_a_file_that_is_not_utf8_is_a_spec_error_naming_it(tmp_path, capsys):
    from attngen.cli import main

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(BASE.replace("name: t", "name: t\ndescription: caf\xe9").encode("latin-1"))
    with pytest.raises(SpecError, match="not a UTF-8 text file") as info:
        load_files([latin1])
    assert info.value.source == str(latin1)
    assert main(["build", str(latin1), "--out", str(tmp_path / "out"), "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attngen: error: {latin1}: not a UTF-8") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_specs_take_one_gqa_and_head_dim():
    with pytest.raises(SpecError, match="one gqa"):
        load_text("name: m\ngqa: [1, 2]\nhead_dim: 64\ndtype: fp16\nlayers: [1]\n")


def test_canonical_name_is_mechanical_and_stable():
    (spec,) = load_text(BASE + "window: 4096\n")
    kernel = spec.kernels[0]
    assert kernel.name.startswith("causal_w4096_g4_d128_fp16_128x128o2c2_")
    again = KernelSpec.from_dict(kernel.as_dict())
    assert again == kernel and again.name == kernel.name
    other = replace(kernel, dtype="bf16")
    assert other.name != kernel.name and other.hash != kernel.hash


def test_feature_fields():
    (spec,) = load_text(BASE + "softcap: 50\nsinks: true\nchunked: true\nvarlen: true\n")
    f = spec.kernels[0].features
    assert (f.softcap, f.sinks, f.chunked, f.varlen) == (50.0, True, True, True)
    assert "_sc50_sinks_chunked_varlen_" in spec.kernels[0].name
    for extra, path, match in [("softcap: 0\n", "softcap", "positive"),
                               ("softcap: [1, 2]\n", "softcap", "positive"),
                               ("sinks: yes please\n", "sinks", "true or false"),
                               ("varlen: 1\n", "varlen", "true or false"),
                               ("varlen: true\ntiles: {pack: 2}\n", "tiles", "pack 1")]:
        with pytest.raises(SpecError, match=match) as info:
            load_text(BASE + extra)
        assert info.value.path == path


def test_model_spec_features_reach_the_layer_map():
    specs = {s.name: s for s in load_files(SHIPPED)}
    assert all(k.features.sinks for k in specs["gpt-oss-20b"].kernels)
    assert all(k.features.softcap == 50.0 for k in specs["gemma2-9b"].kernels)


def test_error_on_a_key_without_a_line_falls_back_to_the_document():
    """Found by fuzzing: an error at a top-level key the document does not hold (say "tiles",
    raised by a value type's own check) looped forever looking for a parent key's line."""
    from attngen.generate.spec import _Doc
    err = _Doc({}, {"": 1}, "f.yaml").error("tiles", "x")
    assert (err.path, err.line) == ("tiles", 1)


def test_transformers_word_adds_every_kernel_the_integration_calls():
    base = "name: m\ngqa: 2\nhead_dim: 64\ndtype: [fp16, bf16]\nlayers: {count: 4, pattern: [64, null]}\n"
    (plain,) = load_text(base)
    (full,) = load_text(base + "transformers: true\n")
    assert full.kernels[:len(plain.kernels)] == plain.kernels        # the model's own first
    kinds = {(k.features.varlen, k.features.chunked) for k in full.kernels}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}
    assert len(full.kernels) == 4 * len(plain.kernels)
    assert {(k.mask, k.dtype) for k in full.kernels if k.features.varlen} == \
        {(k.mask, k.dtype) for k in plain.kernels}
    (encoder,) = load_text(base.replace("gqa", "causal: false\ngqa").replace("[64, null]", "[{left: 4, right: 4}, null]")
                           + "transformers: true\n")
    assert {(k.features.varlen, k.features.chunked) for k in encoder.kernels} == {(False, False), (True, False)}
    with pytest.raises(SpecError, match="transformers"):
        load_text("name: x\nwindow: 8\ngqa: 1\nhead_dim: 64\ndtype: fp16\ntransformers: true\n")
    with pytest.raises(SpecError, match="true or false"):
        load_text(base + "transformers: yes please\n")
