"""The bench module's pure parts (timing itself needs a GPU)."""
import argparse
import json

import pytest

from attngen import bench
from attngen.tuning import Tiles, tiles_for


def test_tiles_round_trip_through_their_tag():
    for tiles in (Tiles(128, 64, 2, 1), Tiles(128, 64, 2, 1, 8), Tiles(64, 128, 1, 2),
                  Tiles(128, 128, 1, 1, worker_warps=8), Tiles(64, 64, 2, 1, 4, 8)):
        assert bench.parse_tiles(tiles.tag) == tiles
    with pytest.raises(argparse.ArgumentTypeError, match="tiles look like"):
        bench.parse_tiles("128x64")
    with pytest.raises(argparse.ArgumentTypeError, match="power of two"):
        bench.parse_tiles("100x64o2c1")


def test_every_preset_is_a_variant_attngen_builds():
    """What `bench run` times for each preset is a kernel the generator accepts and renders."""
    from attngen.codegen import render
    from attngen.variant import Features, KernelSpec

    for shape in bench.PRESETS.values():
        group = shape.heads // shape.heads_kv
        spec = KernelSpec(shape.mask, group, shape.head_dim, shape.dtype,
                          tiles_for(shape.head_dim, shape.mask, group),
                          Features(shape.softcap, shape.sinks, chunked=shape.prefix > 0))
        assert spec.mask.window == shape.window and "def launch(" in render(spec)["launcher.py"]
        assert shape.mask.pairs(min(shape.seqs)) > 0


def test_table_and_plot_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": "A", "batch": 1, "heads": 2, "heads_kv": 1, "head_dim": 64, "window": 8,
             "dtype": "fp16", "gpu": "test", "seq": s, "impl": impl, "us_p50": t, "tflops": 1.0,
             "io_gb_s": 1.0, "extra_mem_bytes": 0, "rel_err": None, "attngen_speedup": 1.0}
            for s in (1024, 2048) for impl, t in (("attngen", 1.0), ("flex", 2.0))]
    assert "attngen" in bench.table(rows)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    assert bench.main(["plot", str(path), str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_run_without_gpu_says_so(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert bench.main(["run", "--preset", "A"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
