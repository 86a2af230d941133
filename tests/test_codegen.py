import ast
import re

import pytest

from attngen import codegen, spec as spec_module
from attngen.cases import cases_for
from attngen.mask import Mask
from attngen.spec import KernelSpec
from attngen.tuning import Tiles, tiles_for


def kernel(mask=Mask(True, 4095), gqa=4, head_dim=128, dtype="fp16"):
    return KernelSpec(mask, gqa, head_dim, dtype, tiles_for(head_dim, mask))


def source(spec):
    return codegen.render(spec)["kernel.py"]


def test_rendered_files_are_python_named_by_the_spec():
    spec = kernel()
    files = codegen.render(spec)
    assert set(files) == {"__init__.py", "kernel.py", "launcher.py", f"test_{spec.name}.py"}
    for text in files.values():
        ast.parse(text)
    assert f"def {spec.name}(Q, K, V, Out, qk_scale_log2: float):" in files["kernel.py"]
    assert codegen.render(spec) == files            # deterministic


def test_full_causal_kernel_has_no_window_code():
    text = source(kernel(Mask(True)))
    assert "WINDOW" not in text and "first" not in text and "unmasked_start" not in text
    assert "ct.where((keys <= rows), s, MASKED)" in text
    assert "for j in range(0, last):" in text


def test_causal_window_kernel_bakes_the_window():
    text = source(kernel(Mask(True, 4095)))
    assert "WINDOW_LEFT = 4095" in text and "WINDOW_RIGHT" not in text
    assert "(keys <= rows) & (keys >= rows - WINDOW_LEFT)" in text
    assert "for j in range(first, last):" in text
    assert "if (j < unmasked_start) | (j >= unmasked_stop):" in text


def test_bidirectional_kernels():
    local = source(kernel(Mask(False, 3, 17)))
    assert "WINDOW_LEFT = 3" in local and "WINDOW_RIGHT = 17" in local
    assert "(keys >= rows - WINDOW_LEFT) & (keys <= rows + WINDOW_RIGHT) & (keys < seq)" in local
    full = source(kernel(Mask(False)))
    assert "WINDOW" not in full and "ct.where((keys < seq), s, MASKED)" in full


def test_gqa_and_head_dim_specialization():
    mha = source(kernel(gqa=1))
    assert "GROUP" not in mha and "index=(b, h, 0, j)" in mha
    gqa = source(kernel(gqa=8))
    assert "GROUP = 8" in gqa and "index=(b, h // GROUP, 0, j)" in gqa
    padded = source(kernel(head_dim=80))
    assert "HEAD_DIM = 80" in padded and "TILE_D = 128" in padded
    assert "TILE_D" not in source(kernel(head_dim=64))


def test_tiles_and_hints_are_baked_in():
    spec = KernelSpec(Mask(True), 1, 64, "bf16", Tiles(64, 32, 3, 1))
    text = source(spec)
    assert "BLOCK_M = 64" in text and "BLOCK_N = 32" in text
    assert "@ct.kernel(occupancy=3, num_ctas=1)" in text
    assert "DTYPE = torch.bfloat16" in codegen.render(spec)["launcher.py"]


def test_generated_test_lists_the_variant_cases():
    spec = kernel(Mask(True, 127), gqa=8, head_dim=64)
    text = codegen.render(spec, ("sm_80", "sm_90"))[f"test_{spec.name}.py"]
    for case in cases_for(spec):
        assert repr(case) in text
    assert "['sm_80', 'sm_90']" in text


def test_cases_cover_the_edges():
    spec = kernel(Mask(True, 4095))
    cases = {re.sub(r"-b\d+-.*", "", c.id): c for c in cases_for(spec)}
    assert cases["one-token"].seq == 1 and cases["one-token"].heads_kv == 1      # MQA, S = 1
    assert cases["shorter-than-tile"].seq < spec.tiles.block_m
    assert cases["ragged-batch2"].batch == 2 and cases["ragged-batch2"].seq % spec.tiles.block_m
    assert cases["window-covers-seq"].versus_full
    assert cases["just-past-window"].seq > 4096
    assert cases["bshd-views"].layout == "bshd" and cases["explicit-scale"].scale == 0.3
    ids = [c.id for c in cases_for(spec)]
    assert len(set(ids)) == len(ids)
    assert "one-token-b1-h4kv1-s1-w4096-bhsd" in ids


def test_name_depends_on_templates(monkeypatch):
    spec = kernel()
    before = spec.name
    sources = dict(codegen.template_sources())
    sources["kernel.py.j2"] += "\n# changed\n"
    monkeypatch.setattr(codegen, "template_sources", lambda: sources)
    spec_module.fingerprint.cache_clear()
    try:
        assert spec.name != before
    finally:
        monkeypatch.undo()
        spec_module.fingerprint.cache_clear()
    assert spec.name == before


def test_kernel_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="gqa"):
        KernelSpec(Mask(True), 0, 64, "fp16", tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="head_dim"):
        KernelSpec(Mask(True), 1, 72, "fp16", tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="power of two"):
        Tiles(96, 64, 1, 1)


def test_packed_gqa_heads_share_a_tile():
    whole = source(KernelSpec(Mask(True, 127), 8, 64, "bf16", Tiles(128, 64, 2, 1, 8)))
    assert "PACK = 8" in whole and "POSITIONS = 16" in whole and "GROUP" not in whole
    assert "index=(b, hp, 0, j)" in whole and "shape=(1, PACK, POSITIONS, HEAD_DIM)" in whole
    assert "last = ct.cdiv(min(m0 + POSITIONS, seq), BLOCK_N)" in whole
    half_spec = KernelSpec(Mask(False, 4, 4), 4, 128, "fp16", Tiles(128, 64, 2, 1, 2))
    half = source(half_spec)
    assert "GROUP = 4" in half and "index=(b, hp * PACK // GROUP, 0, j)" in half
    assert "grid = ((seq + 63) // 64, batch * heads // 2, 1)" in codegen.render(half_spec)["launcher.py"]
    assert half_spec.name.split("_")[-2] == "128x64o2c1p2"
    with pytest.raises(ValueError, match="must divide gqa"):
        KernelSpec(Mask(True), 2, 64, "fp16", Tiles(128, 64, 2, 1, 4))


def feature_source(**features):
    from attngen.spec import Features
    spec = KernelSpec(Mask(True, 127), 2, 64, "bf16", Tiles(64, 64, 4, 1), Features(**features))
    return spec, codegen.render(spec)


def test_features_are_generated_only_where_used():
    plain, files = feature_source()
    for word in ("tanh", "SOFTCAP", "Sinks", "slice", "seq_q", "Cu"):
        assert word not in files["kernel.py"]
    assert "qk_scale_log2: float" in files["kernel.py"]


def test_softcap_kernel():
    spec, files = feature_source(softcap=50.0)
    text = files["kernel.py"]
    assert "SOFTCAP_LOG2 = 72.13475204444816" in text and "qk_scale_over_cap: float" in text
    assert "s = ct.tanh(s * qk_scale_over_cap) * SOFTCAP_LOG2" in text
    assert "p = ct.exp2(s - m_new, flush_to_zero=True)" in text
    assert "scale_arg(scale, HEAD_DIM, SOFTCAP)" in files["launcher.py"]
    assert "_sc50_" in spec.name


def test_sinks_chunked_and_varlen_kernels():
    _, sinks = feature_source(sinks=True)
    assert "(Q, K, V, Out, Sinks, qk_scale_log2: float)" in sinks["kernel.py"]
    assert "def launch(q, k, v, *, scale=None, sinks, out=None" in sinks["launcher.py"]
    _, chunked = feature_source(chunked=True)
    assert "m0 = seq - seq_q + tile * BLOCK_M" in chunked["kernel.py"]
    assert "chunked=True" in chunked["launcher.py"]
    _, varlen = feature_source(varlen=True)
    text = varlen["kernel.py"]
    assert "(Q, K, V, Out, Cu, qk_scale_log2: float)" in text and "Qs = Q.slice(0, q_start" in text
    assert "return  # this sequence is shorter" in text
    assert "def launch(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None" in varlen["launcher.py"]
    _, both = feature_source(varlen=True, chunked=True)
    assert "(Q, K, V, Out, CuQ, CuK, qk_scale_log2: float)" in both["kernel.py"]


def test_varlen_takes_one_head_per_tile():
    from attngen.spec import Features
    with pytest.raises(ValueError, match="pack 1"):
        KernelSpec(Mask(True), 8, 64, "fp16", Tiles(128, 64, 2, 1, 8), Features(varlen=True))
