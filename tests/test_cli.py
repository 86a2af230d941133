import subprocess
import sys

from attngen.cli import main

from conftest import ROOT, write


def test_build_then_list(tmp_path, capsys):
    spec = write(tmp_path, "name: c\nwindow: 32\ngqa: 1\nhead_dim: 64\ndtype: bf16\n")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--no-compile"]) == 0
    captured = capsys.readouterr()
    assert "1 spec(s) -> 1 kernel(s)" in captured.err and "(not compiled)" in captured.out
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
