import json

import pytest

from attngen import build as build_module, store
from attngen.build import BuildError, build
from attngen.store import Manifest, StoreError, read_manifest
from attngen.spec import load_text


SPEC = """name: small
window: [64, null]
gqa: 2
head_dim: 64
dtype: fp16
"""
MODEL = """name: tiny-model
gqa: 2
head_dim: 64
dtype: fp16
layers: {count: 4, pattern: [64, null]}
"""


def snapshot(directory):
    return {p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
            for p in directory.rglob("*") if p.is_file() and p.name != ".lock"}


def test_build_writes_packages_and_manifest(tmp_path):
    specs = load_text(SPEC) + load_text(MODEL)
    report = build(specs, tmp_path / "out", archs=())
    out = tmp_path / "out"
    manifest = read_manifest(out)
    assert sorted(manifest.kernels) == sorted(report.kernels)
    assert len(report.kernels) == 2                  # the model reuses both kernels of `small`
    for name in report.kernels:
        files = {p.name for p in (out / name).iterdir()}
        assert files == {"__init__.py", "kernel.py", "launcher.py", f"test_{name}.py"}
    layers = manifest.specs["tiny-model"].layers
    assert [mask.left for mask in layers] == [63, None, 63, None]
    assert manifest.specs["small"].layers is None
    assert read_manifest(out) == manifest == Manifest.from_dict(manifest.to_dict())
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


def test_rebuild_with_unchanged_specs_does_no_work(tmp_path):
    specs = load_text(SPEC)
    out = tmp_path / "out"
    build(specs, out, archs=())
    before = snapshot(out)
    report = build(load_text(SPEC), out, archs=())
    assert report.did_nothing
    assert snapshot(out) == before


def test_changed_spec_replaces_output_and_drops_stale_variants(tmp_path):
    out = tmp_path / "out"
    first = build(load_text(SPEC), out, archs=())
    second = build(load_text(SPEC.replace("[64, null]", "[64]")), out, archs=())
    assert len(second.kernels) == 1 and second.kernels[0] in first.kernels
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == second.kernels
    assert list(read_manifest(out).kernels) == second.kernels


def test_failed_compile_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    build(load_text(SPEC), out, archs=())
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise RuntimeError("tileiras exploded")
    monkeypatch.setattr(build_module, "_compile", lambda *a, **k: broken())
    with pytest.raises(RuntimeError, match="exploded"):
        build(load_text(SPEC.replace("gqa: 2", "gqa: 4")), out, archs=("sm_90",))
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


def test_compile_errors_name_the_variant(tmp_path, monkeypatch):
    def fail(directory, spec_dict, arch, output):
        raise RuntimeError("no such instruction")
    monkeypatch.setattr(build_module, "_export_one", fail)
    monkeypatch.setattr(build_module, "ProcessPoolExecutor", _InlinePool)
    with pytest.raises(BuildError, match=r"causal_w64_g2_d64_fp16_.*\(sm_90\): RuntimeError: no such"):
        build(load_text(SPEC), tmp_path / "out", archs=("sm_90",))
    assert not (tmp_path / "out" / "manifest.json").exists()


class _InlinePool:
    """A stand-in for the process pool that runs jobs in this process."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:     # noqa: BLE001
            future.set_exception(exc)
        return future


def test_real_compile_writes_cubins_and_times(tmp_path):
    specs = load_text(SPEC.replace("[64, null]", "16"))
    out = tmp_path / "out"
    report = build(specs, out, archs=("sm_90",), jobs=1)
    (name,) = report.kernels
    cubin = out / name / f"{name}.sm_90.cubin"
    assert cubin.read_bytes()[:4] == b"\x7fELF"
    entry = read_manifest(out).kernels[name]
    assert entry.cubins == ("sm_90",) and entry.compile_seconds["sm_90"] > 0 and not entry.stale
    again = build(load_text(SPEC.replace("[64, null]", "16")), out, archs=("sm_90",))
    assert again.did_nothing


def test_bad_arch_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="sm_90"):
        build(load_text(SPEC), tmp_path / "out", archs=("hopper",))
    assert not (tmp_path / "out").exists()


def test_manifest_format_is_checked(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(StoreError, match="format 99"):
        read_manifest(tmp_path)


def test_default_out_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_BUILD_DIR", str(tmp_path / "b"))
    assert store.default_out() == tmp_path / "b"
    monkeypatch.delenv("ATTNGEN_BUILD_DIR")
    assert store.default_out() == tmp_path / "cache" / "build"
