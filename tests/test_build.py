import json

import pytest

from attngen.generate import build as build_module, store
from attngen.generate.build import BuildError, build
from attngen.generate.store import Manifest, StoreError, read_manifest
from attngen.generate.spec import load_text
from attngen.core.variant import KernelSpec, compiled_by_default


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
    def fail(directory, spec_dict, suffix, arch, output):
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

    def shutdown(self, wait=True, cancel_futures=False):
        pass

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
    (spec,) = specs[0].kernels
    default = [s for s in spec.kernels if compiled_by_default(s)]
    assert {p.name for p in (out / name).glob("*.cubin")} == {f"{name}{s}.sm_90.cubin" for s in default}
    assert (out / name / f"{name}.sm_90.cubin").read_bytes()[:4] == b"\x7fELF"
    assert report.cubins == len(default) and report.deferred == len(spec.kernels) - len(default)
    entry = read_manifest(out).kernels[name]
    assert entry.cubins == ("sm_90",) and entry.compile_seconds["sm_90"] > 0 and not entry.stale
    again = build(load_text(SPEC.replace("[64, null]", "16")), out, archs=("sm_90",))
    assert again.did_nothing


def test_all_kernels_compiles_only_what_is_missing(tmp_path, monkeypatch):
    compiled = []

    def export_one(directory, spec_dict, suffix, arch, output):
        compiled.append(suffix)
        (output / store.cubin_name(KernelSpec.from_dict(spec_dict).name + suffix, arch)).write_bytes(b"c")
        return 0.0
    monkeypatch.setattr(build_module, "_export_one", export_one)
    monkeypatch.setattr(build_module, "ProcessPoolExecutor", _InlinePool)
    out = tmp_path / "out"
    (spec,) = load_text(SPEC.replace("[64, null]", "16"))[0].kernels
    build(load_text(SPEC.replace("[64, null]", "16")), out, archs=("sm_90",))
    assert sorted(compiled) == sorted(s for s in spec.kernels if compiled_by_default(s))
    compiled.clear()
    report = build(load_text(SPEC.replace("[64, null]", "16")), out, archs=("sm_90",), all_kernels=True)
    assert sorted(compiled) == sorted(s for s in spec.kernels if not compiled_by_default(s))
    assert report.cubins == len(compiled) and report.deferred == 0
    assert len(list((out / spec.name).glob("*.cubin"))) == len(spec.kernels)
    assert build(load_text(SPEC.replace("[64, null]", "16")), out, archs=("sm_90",),
                 all_kernels=True).did_nothing


def test_default_rule_keeps_every_64_bit_twin_for_first_need():
    (spec,) = load_text(SPEC.replace("[64, null]", "16"))[0].kernels
    assert "" in spec.kernels and compiled_by_default("")
    assert all(not compiled_by_default(s) for s in spec.kernels if s.endswith("_i64"))


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


def test_truncated_manifest_is_a_store_error_and_the_next_build_repairs_it(tmp_path):
    out = tmp_path / "out"
    build(load_text(SPEC), out, archs=())
    text = (out / "manifest.json").read_text()
    for cut in (0, 1, len(text) // 2, len(text) - 3):
        (out / "manifest.json").write_text(text[:cut])
        with pytest.raises(StoreError, match="manifest.json"):
            read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({"format": 1, "kernels": {}}))   # a key missing
    with pytest.raises(StoreError, match="not a whole manifest"):
        read_manifest(out)
    build(load_text(SPEC), out, archs=())
    assert sorted(read_manifest(out).kernels) == sorted(k.name for k in load_text(SPEC)[0].kernels)


def content(directory):
    """Every file's bytes; the manifest without compile times (a repaired build has none for
    the cubins a killed build left)."""
    files = {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")
             if p.is_file() and p.name not in (".lock", "manifest.json")}
    manifest = read_manifest(directory).to_dict()
    for entry in manifest["kernels"].values():
        entry.pop("compile_seconds")
    return files, manifest


@pytest.mark.parametrize("first", [SPEC, SPEC.replace("[64, null]", "[64, 128]")])
def test_a_build_killed_at_any_rename_is_repaired_by_the_next(tmp_path, monkeypatch, first):
    """Kill the build at each of its renames (the commit) in turn: the previous manifest stays
    readable and names only whole packages, and the next build completes the output exactly
    as an uninterrupted build makes it."""
    monkeypatch.setattr(build_module, "_export_one", _stub_export)
    monkeypatch.setattr(build_module, "ProcessPoolExecutor", _InlinePool)
    target = SPEC.replace("[64, null]", "[64, 32]")
    clean = tmp_path / "clean"
    build(load_text(first), clean, archs=("sm_90",))
    build(load_text(target), clean, archs=("sm_90",))
    real_replace, n = build_module.os.replace, 0
    while True:
        out = tmp_path / f"out{n}"
        build(load_text(first), out, archs=("sm_90",))
        calls = []

        def dying(src, dst):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(dst)
            real_replace(src, dst)
        monkeypatch.setattr(build_module.os, "replace", dying)
        try:
            build(load_text(target), out, archs=("sm_90",))
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            monkeypatch.setattr(build_module.os, "replace", real_replace)
        for name in read_manifest(out).kernels:         # what a reader would load is whole
            assert {"__init__.py", "kernel.py", "launcher.py"} <= {p.name for p in (out / name).iterdir()}
        build(load_text(target), out, archs=("sm_90",))
        assert content(out) == content(clean), n
        if finished:
            break
        n += 1
    assert n > 3


def test_half_removed_package_and_leftover_staging_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "_export_one", _stub_export)
    monkeypatch.setattr(build_module, "ProcessPoolExecutor", _InlinePool)
    out = tmp_path / "out"
    build(load_text(SPEC), out, archs=("sm_90",))
    clean = content(out)
    name = sorted(read_manifest(out).kernels)[0]
    for f in ("__init__.py", "kernel.py"):          # an rmtree killed half way
        (out / name / f).unlink()
    (out / ".staging-killed").mkdir()                # a killed build's staging directory
    (out / ".staging-killed" / "junk").write_text("x")
    (out / "causal_w9_g1_d64_fp16_64x64o4c1_0123abcd").mkdir()   # a package nothing lists
    build(load_text(SPEC), out, archs=("sm_90",))
    assert content(out) == clean
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out.iterdir()
                                                           if p.name in read_manifest(out).kernels
                                                           or p.name in (".lock", "manifest.json"))


def _stub_export(directory, spec_dict, suffix, arch, output):
    name = KernelSpec.from_dict(spec_dict).name + suffix
    (output / store.cubin_name(name, arch)).write_bytes(name.encode())
    return 0.0
