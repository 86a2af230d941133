"""Every script in scripts/ still imports and answers --help on a machine without a GPU, so a
module it uses cannot move or change under it unnoticed."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def test_scripts_are_found():
    assert SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def _paged_loop_variants():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paged_loop_variants", ROOT / "scripts" / "paged_loop_variants.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_paged_loop_variants_compute_what_the_shipped_kernels_do(tmp_path):
    """scripts/paged_loop_variants.py cuts today's paged kernels at fixed lines of their key
    loop: each rewritten loop must still be found, and compute, in the CPU emulator, what the
    shipped kernel does over a shuffled cache (a prefill chunk over whole and partial blocks,
    a decode step), so that GPU time goes to timing them only."""
    import torch

    from attngen import emulator
    from attngen.generate.codegen import render
    from attngen.runtime.inputs import launch_grid, scale_arg
    from attngen.runtime.registry import default_registry
    from attngen.testing import paged_cache

    script = _paged_loop_variants()
    src = render(script.PAGED)["kernel.py"]
    variants = {label: (suffix, text) for label, suffix, text in script.sources(src)}
    assert set(variants) == {"whole", "pieces", "whole_ahead", "pieces_low_hints"}
    assert all(text != src for label, (_, text) in variants.items() if label not in ("whole", "pieces"))
    launcher = default_registry.module(script.PAGED)
    gen = torch.Generator().manual_seed(0)
    lengths, q_lens = [300, 77], [130, 1]
    q = torch.randn(sum(q_lens), 8, 128, generator=gen).to(torch.bfloat16)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    tiles, pairs = -(-max(q_lens) // launcher.POSITIONS), len(lengths) * q.shape[1] // launcher.PACK
    for page in (16, 64):
        k_cache, v_cache, used, table = paged_cache(lengths, page, 2, 128, torch.bfloat16, gen)
        with emulator.emulated():
            want = launcher.infer(q, k_cache, v_cache, cu_q, used, table, splits=1).float()
        rows = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
        for label, (suffix, text) in variants.items():
            if page % launcher.BLOCK_N and not suffix:
                continue
            kernel = getattr(script.load(label, text, str(tmp_path)), script.PAGED.name + suffix)
            out = torch.full_like(q, float("nan"))
            emulator.launch(None, launch_grid(tiles, pairs), kernel,
                            (q, rows(k_cache), rows(v_cache), out, cu_q, used, table, page, scale_arg(None, 128)))
            assert torch.allclose(out.float(), want, atol=2e-2, rtol=0), (label, page)


def test_sass_report_reads_every_kernel_of_a_build(tmp_path):
    """scripts/sass_report.py on a real build: one line a kernel (no 64-bit twin), with the
    key loop's counts and, asked, its order of work."""
    pytest.importorskip("cuda.tile")
    from attngen.generate.build import build
    from attngen.generate.spec import load_text

    build(load_text("name: tiny\nwindow: 16\ngqa: 2\nhead_dim: 64\ndtype: fp16\n"), tmp_path, archs=("sm_90",))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_report.py"), str(tmp_path), "--schedule"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    kernels = [line.split()[0] for line in lines if not line.startswith("    ")]
    assert sorted(kernels) == sorted(c.name.split(".")[0] for c in tmp_path.glob("*/*.sm_90.cubin")
                                     if "_i64" not in c.name)
    forward = next(i for i, line in enumerate(lines) if line.split()[0].endswith("_fwd"))
    assert "spill   0" in lines[forward] and "mma" in lines[forward]
    assert "exp" in lines[forward + 1] and "mma x" in lines[forward + 1]      # its schedule
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "sass_report.py"), str(tmp_path / "none")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert missing.returncode != 0 and "no sm_90 cubins" in missing.stderr
