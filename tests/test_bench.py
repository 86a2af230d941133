"""The bench module's pure parts (timing itself needs a GPU)."""
import argparse
import json

import pytest

from attngen.bench import cli, presets, report, timing
from attngen.bench.tune import tune
from attngen.core.tuning import Tiles, tiles_for


def test_tiles_round_trip_through_their_tag():
    for tiles in (Tiles(128, 64, 2, 1), Tiles(128, 64, 2, 1, 8), Tiles(64, 128, 1, 2),
                  Tiles(128, 128, 1, 1, worker_warps=8), Tiles(64, 64, 2, 1, 4, 8)):
        assert presets.parse_tiles(tiles.tag) == tiles
    with pytest.raises(argparse.ArgumentTypeError, match="tiles look like"):
        presets.parse_tiles("128x64")
    with pytest.raises(argparse.ArgumentTypeError, match="power of two"):
        presets.parse_tiles("100x64o2c1")


def test_every_preset_is_a_variant_attngen_builds():
    """What `bench run` times for each preset is a kernel the generator accepts and renders."""
    from attngen.generate.codegen import render

    for shape in presets.PRESETS.values():
        spec = shape.spec()
        group = shape.heads // shape.heads_kv
        assert spec.tiles == tiles_for(shape.head_dim, shape.mask, group) and spec.gqa == group
        assert (spec.features.softcap, spec.features.sinks, spec.features.chunked) == \
            (shape.softcap, shape.sinks, shape.prefix > 0)
        assert spec.mask.window == shape.window and "def launch(" in render(spec)["launcher.py"]
        assert shape.mask.pairs(min(shape.seqs)) > 0


def test_table_and_plot_from_rows(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs it: the plots are tested everywhere)
    rows = [{"shape": "A", "batch": 1, "heads": 2, "heads_kv": 1, "head_dim": 64, "window": 8,
             "dtype": "fp16", "gpu": "test", "seq": s, "impl": impl, "us_p50": t, "tflops": 1.0,
             "io_gb_s": 1.0, "extra_mem_bytes": 0, "rel_err": None, "attngen_speedup": 1.0}
            for s in (1024, 2048) for impl, t in (("attngen", 1.0), ("flex", 2.0))]
    assert "attngen" in report.table(rows)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    assert cli.main(["plot", str(path), str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_run_without_gpu_says_so(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main(["run", "--preset", "A"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_window_override_and_graph_flags(monkeypatch, capsys):
    assert presets.parse_window("full") == "full" and presets.parse_window("4096") == 4096
    for bad in ("0", "-3", "wide"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'full'"):
            presets.parse_window(bad)
    with pytest.raises(SystemExit):
        cli.main(["run", "--graph", "--pass", "bwd"])
    assert "a captured backward needs its forward" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(cli, "bench", lambda shape, **kw: seen.append((shape, kw)) or [])
    assert cli.main(["run", "--preset", "A", "--window", "full", "--graph", "--pass", "fwd+bwd"]) == 0
    assert cli.main(["run", "--preset", "C", "--window", "32768"]) == 0
    (full, kw), (wide, _) = seen
    assert full.window is None and full.mask.left is None and kw["graph"] and kw["which"] == "fwd+bwd"
    assert wide.window == 32768 and wide.mask.left == 32767 and wide.heads == 64


@pytest.mark.parametrize("flags", [{}, {"deterministic": True}, {"deterministic": True, "dq": True},
                                   {"deterministic": True, "dkdv": True}])
def test_backward_tune_swaps_only_the_tiles_asked_for(monkeypatch, flags):
    """`tune --backward` times attngen on the shape's tuned spec with each candidate as the
    fused kernel's tiles; with `--deterministic` as dK/dV's and dQ's, `--dq` dQ's alone,
    `--dkdv` dK/dV's alone (the others keeping their tuned tiles, even where dQ and dK/dV
    share a table row), and times attngen-det; the tuned tables are never changed."""
    import copy

    from attngen.core import tuning

    seen = []

    def fake_bench(shape, names, spec, say, which):
        seen.append((names, spec, which))
        return [{"seq": 1, "us_p50": 1.0, "tflops": 1.0, "rel_err": 0.0}]

    monkeypatch.setattr(timing, "bench", fake_bench)
    candidate = Tiles(32, 32, 1, 1)
    tables = (tuning.TUNED, tuning.FUSED, tuning.DKDV, tuning.DQ)
    for head_dim in (64, 256):      # 64: a dQ row of its own, no fused kernel; 256: a fused row
        shape = presets.Shape("t", 2, 1, head_dim, 64, "fp16", (128,))
        tuned, before = shape.spec(), copy.deepcopy(tables)
        tune(shape, [candidate], say=lambda _: None, backward=True, **flags)
        fused, dkdv, dq = tuned.fused_tiles, tuned.dkdv_tiles, tuned.dq_tiles
        expect = {(): (candidate, dkdv, dq), ("deterministic",): (fused, candidate, candidate),
                  ("deterministic", "dq"): (fused, dkdv, candidate),
                  ("deterministic", "dkdv"): (fused, candidate, dq)}[tuple(flags)]
        names, spec, which = seen.pop()
        assert (spec.fused_tiles, spec.dkdv_tiles, spec.dq_tiles) == expect and which == "bwd"
        assert spec.tiles == tuned.tiles and spec.family == tuned.family
        assert spec.name != tuned.name          # a candidate is its own kernel, never the tuned one
        assert names == (("attngen-det",) if flags else ("attngen",))
        assert tables == before
    tune(shape, [candidate], say=lambda _: None)      # the forward's tiles alone
    names, spec, which = seen.pop()
    assert (spec.tiles, spec.dq_tiles, which) == (candidate, shape.spec().dq_tiles, "fwd")
    with pytest.raises(ValueError, match="at most one"):
        tune(shape, [candidate], backward=True, deterministic=True, dq=True, dkdv=True)
    with pytest.raises(ValueError, match="give deterministic too"):
        tune(shape, [candidate], backward=True, dq=True)


def test_paged_decode_times_each_split_asked_then_the_launchers_choice(monkeypatch):
    from attngen.bench import paged

    seen = {}
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(paged, "decode", lambda shape, **kw: seen.update(kw) or [])
    assert cli.main(["paged", "--only", "decode", "--splits", "2", "8", "--batch", "16"]) == 0
    assert seen["splits"] == (2, 8, None) and seen["batches"] == (16,)
    assert cli.main(["paged", "--only", "decode"]) == 0
    assert seen["splits"] == (None,)


def test_paged_bench_times_the_preset_asked_one_preset_per_shape(monkeypatch, capsys):
    from attngen.bench import paged

    seen = []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    for what in ("prefill", "decode", "mixed"):
        monkeypatch.setattr(paged, what, lambda shape, **kw: seen.append(shape) or [])
    assert cli.main(["paged"]) == 0
    assert seen == [paged.PRESETS["A"]] * 3                       # Mistral-7B unless asked
    assert cli.main(["paged", "--preset", "C", "--only", "decode"]) == 0
    assert seen[-1] == paged.PRESETS["C"]
    assert list(paged.SHAPES) == ["A", "B", "B'", "C", "G2"]     # plain, and C16 is C's shape
    with pytest.raises(SystemExit):
        cli.main(["paged", "--preset", "C-sinks"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_subcommand_and_every_preset_shape(capsys):
    from attngen.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    listed = text.split("positional arguments:")[1].split("options:")[0]
    for command in ("run", "tune", "plot", "model"):
        assert f"\n    {command} " in listed, command
    assert "attngen tune" not in text
    for key, shape in presets.PRESETS.items():
        line = next(line for line in text.splitlines() if line.split()[:1] == [key])
        window = " full" if shape.window is None else str(shape.window)
        assert f"H{shape.heads}/{shape.heads_kv} D{shape.head_dim} W{window} {shape.dtype}" in line, line
