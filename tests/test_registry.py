import threading

import pytest
import torch

import attngen
from attngen.generate.build import build, read_manifest
from attngen.runtime.inputs import InputError
from attngen.core.mask import Mask, MaskError
from attngen.runtime.registry import KernelNotFound, Registry
from attngen.generate.spec import load_files, load_text

SPECS = """name: lib
window: [128, 4096]
gqa: [1, 4]
head_dim: [64, 128]
dtype: [fp16, bf16]
---
name: toy-model
gqa: 2
head_dim: 64
dtype: bf16
scale: 0.125
layers: {count: 5, pattern: [128, 128, null]}
"""


@pytest.fixture
def built(tmp_path):
    build(load_text(SPECS), tmp_path / "build", archs=())
    return tmp_path / "build"


def registry(built, tmp_path, jit=False):
    return Registry([built], jit_dir=tmp_path / "jit", jit=jit)


def test_selection_is_exact_and_dispatches_on_head_dim_and_dtype(built, tmp_path):
    reg = registry(built, tmp_path)
    kernel = attngen.get_kernel(window=4096, gqa=4, registry=reg)
    assert kernel.family.mask == Mask(True, 4095) and kernel.family.gqa == 4
    for head_dim in (64, 128):
        for dtype in ("fp16", "bf16"):
            launch = reg.launcher(kernel.family, head_dim, dtype)
            assert f"_d{head_dim}_{dtype}_" in launch.__module__
    assert reg.launcher(kernel.family, 64, "fp16") is reg.launcher(kernel.family, 64, "fp16")


def test_miss_lists_the_nearest_variants(built, tmp_path):
    reg = registry(built, tmp_path)
    with pytest.raises(KernelNotFound) as info:
        attngen.get_kernel(window=4095, gqa=4, registry=reg)
    text = str(info.value)
    assert "window=4095, causal=True, gqa=4" in text and "ATTNGEN_JIT=0" in text
    first = text.splitlines()[1]
    assert "window=4096" in first and "gqa=4" in first and "128/bf16" in first
    with pytest.raises(KernelNotFound, match="head_dim=256"):
        attngen.get_kernel(window=128, gqa=1, head_dim=256, dtype="fp16", registry=reg)


def test_invalid_queries_are_errors_not_misses(built, tmp_path):
    reg = registry(built, tmp_path, jit=True)
    with pytest.raises(ValueError, match="gqa"):
        attngen.get_kernel(window=128, gqa=0, registry=reg)
    with pytest.raises(MaskError, match="positive"):
        attngen.get_kernel(window=0, registry=reg)
    with pytest.raises(ValueError, match="head_dim"):
        attngen.get_kernel(window=128, head_dim=72, registry=reg)
    with pytest.raises(ValueError, match="dtype"):
        attngen.get_kernel(window=128, dtype="fp32", registry=reg)


def test_on_demand_generation_happens_once_across_threads(built, tmp_path, caplog):
    reg = registry(built, tmp_path, jit=True)
    kernel = attngen.get_kernel(window=300, gqa=3, registry=reg)
    results = []
    threads = [threading.Thread(target=lambda: results.append(reg.launcher(kernel.family, 96, "bf16")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r is results[0] for r in results)
    jit = read_manifest(tmp_path / "jit").kernels
    assert len(jit) == 1 and next(iter(jit)).startswith("causal_w300_g3_d96_bf16_")
    assert sum("generating" in r.message for r in caplog.records) == 1
    # a fresh registry finds it in the cache without generating again
    caplog.clear()
    fresh = registry(built, tmp_path, jit=True)
    fresh.launcher(kernel.family, 96, "bf16")
    assert not caplog.records


def test_layer_kernels_follow_the_model_spec(built, tmp_path):
    reg = registry(built, tmp_path)
    layers = attngen.get_layer_kernels("toy-model", registry=reg)
    assert [k.family.mask.window for k in layers] == [128, 128, None, 128, 128]
    assert layers[0] is layers[1] and layers[0] is not layers[2]
    assert all(k.scale == 0.125 and k.head_dim == 64 and k.family.gqa == 2 for k in layers)
    with pytest.raises(KernelNotFound, match="toy-model"):
        attngen.get_layer_kernels("nope", registry=reg)


def test_environment_chooses_build_dirs(built, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_PATH", str(built))
    monkeypatch.setenv("ATTNGEN_JIT", "0")
    reg = Registry()
    assert reg.paths == [built] and not reg.jit
    assert attngen.get_kernel(window=128, gqa=1, registry=reg)


def test_callable_checks_inputs_before_launching(built, tmp_path):
    reg = registry(built, tmp_path)
    attn = attngen.get_kernel(window=128, gqa=4, registry=reg)
    q = torch.randn(1, 8, 16, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    with pytest.raises(InputError, match="runs on CUDA tensors"):
        attn(q, k, k)
    with pytest.raises(InputError, match="dtype torch.float32"):
        attn(q.float(), k.float(), k.float())
    with pytest.raises(InputError, match="head_dim 72 is not supported"):
        attn(torch.randn(1, 8, 16, 72, dtype=torch.float16), k, k)
    with pytest.raises(InputError, match="4-D"):
        attn(q[0], k, k)
    layer = attngen.get_layer_kernels("toy-model", registry=reg)[0]
    with pytest.raises(InputError, match="head_dim 64, q has 128"):
        layer(torch.randn(1, 4, 16, 128, dtype=torch.bfloat16), k, k)


def test_every_input_error_names_the_kernel(built, tmp_path):
    """The callable's own checks, the launcher's and the ops' all start with the variant."""
    reg = registry(built, tmp_path, jit=True)        # nothing is generated: each call fails first
    attn = attngen.get_kernel(window=128, gqa=4, registry=reg)
    packed = attngen.get_kernel(window=128, gqa=4, varlen=True, registry=reg)
    q = torch.randn(1, 8, 16, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    launcher = reg.variant(attn.family, 64, "fp16")
    calls = [
        (attn, (q.float(), k.float(), k.float()), {}, "dtype torch.float32"),
        (attn, (q[0], k, k), {}, "4-D"),
        (attn, (torch.randn(1, 8, 16, 72, dtype=torch.float16), k, k), {}, "head_dim 72"),
        (attn, (q, k, k), {"sinks": torch.zeros(8)}, "sinks=True"),
        (attn, (q, k, k), {"scale": -1.0}, "positive finite"),
        (packed, (q[0], k[0], k[0]), {}, "cu_seqlens_q"),
    ]
    for kernel, args, kw, problem in calls:
        with pytest.raises(InputError, match=problem) as info:
            kernel(*args, **kw)
        assert str(info.value).startswith(f"{kernel.key}: "), str(info.value)
    with pytest.raises(InputError, match="runs on CUDA tensors") as info:
        launcher.launch(q, k, k)
    assert str(info.value).startswith(f"{launcher.NAME}: "), str(info.value)


def test_a_kernel_not_built_is_not_generated_for_cpu_tensors(tmp_path):
    reg = Registry([], jit_dir=tmp_path / "jit", jit=True)
    attn = attngen.get_kernel(window=64, gqa=2, registry=reg)
    q = torch.randn(1, 4, 16, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    for grad in (False, True):
        with pytest.raises(InputError, match="runs on CUDA tensors") as info:
            attn(q.requires_grad_(grad), k, k)
        assert str(info.value).startswith(f"{attn.key}: q is on cpu")
    assert not (tmp_path / "jit").exists() or not any((tmp_path / "jit").iterdir())


def test_ensure_generates_exactly_the_spec_asked_for(tmp_path, caplog):
    """The one way to a launcher (registry, bench, integration): a tile override included."""
    from attngen.core.tuning import Tiles
    from attngen.core.variant import KernelSpec

    reg = Registry([], jit_dir=tmp_path / "jit", jit=True)
    spec = KernelSpec.tuned(Mask(True, 127), 8, 64, "bf16", tiles=Tiles(128, 64, 2, 1, 8))
    launch = reg.ensure(spec)
    assert launch.__module__ == f"{spec.name}.launcher"
    assert reg.ensure(spec) is launch and sum("generating" in r.message for r in caplog.records) == 1
    assert read_manifest(tmp_path / "jit").kernels[spec.name].spec == spec


def test_a_tuners_candidate_never_stands_in_for_the_tuned_kernel(tmp_path):
    """A kernel built with a candidate's backward tiles (`bench tune`) shares its family,
    head_dim, dtype and forward tiles with the tuned one; a query still gets the tuned one."""
    from dataclasses import replace

    from attngen.core.tuning import Tiles
    from attngen.core.variant import Family, KernelSpec

    tuned = KernelSpec.tuned(Mask(True, 127), 2, 64, "bf16")
    # a candidate named before the tuned kernel: the one a choice by name alone would take
    candidates = [replace(tuned, dq_tiles=Tiles(m, n, o, 1)) for m in (16, 32, 64, 128)
                  for n in (16, 32, 64, 128) for o in (1, 2, 4)]
    candidate = min(candidates, key=lambda c: c.name)
    reg = Registry([], jit_dir=tmp_path / "jit", jit=True)
    for spec in (candidate, tuned):
        reg.ensure(spec)
    fresh = Registry([], jit_dir=tmp_path / "jit", jit=False)
    assert fresh.variant(Family(tuned.mask, 2), 64, "bf16").NAME == tuned.name


def test_stale_build_names_the_command_that_rebuilds_it(tmp_path, monkeypatch):
    """A kernel built by other templates (or attngen, cuTile) is never used: with on-demand
    generation off it is an error naming the rebuild; with it on, it is regenerated."""
    from attngen.core import version
    from attngen.core.variant import Family

    spec_file = tmp_path / "lib.yaml"
    spec_file.write_text(SPECS.split("---")[0])
    build(load_files([spec_file]), tmp_path / "build", archs=())
    sources = dict(version.template_sources())
    sources["kernel.py.j2"] += "\n# changed\n"
    monkeypatch.setattr(version, "template_sources", lambda: sources)
    version.fingerprint.cache_clear()
    try:
        reg = Registry([tmp_path / "build"], jit_dir=tmp_path / "jit", jit=False)
        family = Family(Mask(True, 127), 4)
        with pytest.raises(KernelNotFound, match=rf"another attngen.*`attngen build {spec_file} --out "):
            reg.launcher(family, 64, "fp16")
        with pytest.raises(KernelNotFound, match="rebuild it"):
            attngen.get_kernel(window=128, gqa=4, registry=reg)
        fresh = Registry([tmp_path / "build"], jit_dir=tmp_path / "jit", jit=True)
        launch = fresh.launcher(family, 64, "fp16")
        assert launch.__module__.split(".")[0] in read_manifest(tmp_path / "jit").kernels
    finally:
        version.fingerprint.cache_clear()


@pytest.mark.parametrize("kwargs, problem", [
    ({"window": -1}, "window must be a positive integer"),
    ({"window": 8, "causal": "yes"}, "causal must be true or false"),
    ({"window": Mask(True, 7), "causal": False}, "contradicts the mask"),
    ({"gqa": 0}, "gqa must be a positive integer"),
    ({"head_dim": 72}, "head_dim must be one of"),
    ({"dtype": "fp32"}, "dtype must be one of"),
    ({"softcap": -5.0}, "softcap must be a positive finite number"),
    ({"scale": 0.0}, "scale must be a positive finite number"),
    ({"sinks": 1}, "sinks must be true or false"),
    ({"deterministic": "yes"}, "deterministic must be True, False or None"),
])
def test_every_bad_get_kernel_argument_raises_argument_error(tmp_path, kwargs, problem):
    reg = Registry([], jit_dir=tmp_path / "jit", jit=True)
    with pytest.raises(attngen.ArgumentError, match=problem) as info:
        attngen.get_kernel(**kwargs, registry=reg)
    assert isinstance(info.value, ValueError)                    # what it raised before
    if "window" in kwargs:
        assert isinstance(info.value, MaskError)
    assert not (tmp_path / "jit").exists()
