import subprocess
import sys

from attngen.cli import main

from conftest import ROOT, write


def test_build_then_list(tmp_path, capsys):
    spec = write(tmp_path, "name: c\nwindow: 32\ngqa: 1\nhead_dim: 64\ndtype: bf16\n")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--no-compile"]) == 0
    captured = capsys.readouterr()
    assert "1 spec(s) -> 1 variant(s)" in captured.err and "(not compiled)" in captured.out
    assert main(["build", str(spec), "--out", str(out), "--no-compile"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert main(["list", "--out", str(out)]) == 0
    assert "causal_w32_g1_d64_bf16" in capsys.readouterr().out


def test_bad_spec_fails_with_location_and_writes_nothing(tmp_path, capsys):
    good = write(tmp_path, "name: a\ngqa: 1\nhead_dim: 64\ndtype: bf16\n", "a.yaml")
    bad = write(tmp_path, "name: b\ngqa: 1\nhead_dim: 64\ndtype: bf16\nwindow: -1\n", "b.yaml")
    out = tmp_path / "out"
    assert main(["build", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"attngen: error: {bad}:5: window: window must be a positive integer" in err
    assert not out.exists()


def test_console_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "attngen", "--version"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("attngen ")


class _FakeCompile:
    """Stands in for the compile workers: writes a stub cubin at once, in this process (one
    that spills 720 bytes a thread for the kernels of ``spilling``, by suffix)."""

    def __init__(self, monkeypatch, spilling=()):
        from attngen.generate import build as build_module

        from conftest import fake_cubin
        from test_build import _InlinePool

        def export_one(directory, spec_dict, suffix, arch, output):
            from attngen.generate.store import cubin_name
            from attngen.core.variant import KernelSpec
            (output / cubin_name(KernelSpec.from_dict(spec_dict).name + suffix, arch)).write_bytes(
                fake_cubin(local_bytes=720 if suffix in spilling else 0))
            return 0.5
        monkeypatch.setattr(build_module, "_export_one", export_one)
        monkeypatch.setattr(build_module, "ProcessPoolExecutor", _InlinePool)


def test_build_shows_a_bar_and_right_counts(tmp_path, capsys, monkeypatch):
    from attngen.generate.spec import load_files
    from attngen.core.variant import compiled_by_default

    _FakeCompile(monkeypatch)
    spec = write(tmp_path, "name: c\nwindow: [32, 64]\ngqa: 1\nhead_dim: 64\ndtype: bf16\n")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out)]) == 0
    kernels = load_files([spec])[0].kernels
    default = sum(compiled_by_default(s) for k in kernels for s in k.kernels)
    later = sum(not compiled_by_default(s) for k in kernels for s in k.kernels)
    err = capsys.readouterr().err
    assert f"{default}/{default} [" in err                      # the bar's count, then its clock
    assert f"{default} kernel(s) compiled; {later} kernel(s) left to first need" in err
    assert main(["build", str(spec), "--out", str(out), "--all"]) == 0
    err = capsys.readouterr().err
    assert f"{later}/{later} [" in err and f"{later} kernel(s) compiled" in err
    assert "left to first need" not in err


def test_quiet_build_prints_nothing(tmp_path, capsys, monkeypatch):
    _FakeCompile(monkeypatch)
    spec = write(tmp_path, "name: c\nwindow: 32\ngqa: 1\nhead_dim: 64\ndtype: bf16\n")
    assert main(["build", str(spec), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_build_names_the_kernels_that_spill_registers(tmp_path, capsys, monkeypatch):
    _FakeCompile(monkeypatch, spilling=("_fwd", "_dkdv"))
    kernel = "window: 32\ngqa: 1\nhead_dim: 64\ndtype: bf16\n"
    spec = write(tmp_path, f"name: c\n{kernel}---\nname: same-kernel\n{kernel}")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if "causal_w32" in line]
    assert len(lines) == 2 and all(line.endswith("spills: _dkdv sm_90 720 B, _fwd sm_90 720 B") for line in lines)
    assert "note: 2 kernel(s) spill registers" in captured.err      # a kernel two specs share counts once
    assert main(["build", str(spec), "--out", str(out)]) == 0          # read again from the cubins
    assert "(cached)  spills: _dkdv" in capsys.readouterr().out
    _FakeCompile(monkeypatch)
    spec = write(tmp_path, "name: d\nwindow: 64\ngqa: 1\nhead_dim: 64\ndtype: bf16\n", "d.yaml")
    assert main(["build", str(spec), "--out", str(tmp_path / "clean")]) == 0
    captured = capsys.readouterr()
    assert "spills" not in captured.out and "note:" not in captured.err
