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


def test_paged_loop_variants_still_find_the_loop_they_rewrite():
    """scripts/paged_loop_variants.py cuts today's paged kernel at fixed lines of its key loop:
    each variant must still differ from the shipped source and parse."""
    import ast
    import importlib.util

    from attngen.generate.codegen import render

    spec = importlib.util.spec_from_file_location("paged_loop_variants", ROOT / "scripts" / "paged_loop_variants.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = render(script.PAGED)["kernel.py"]
    variants = dict(script.sources(src))
    assert set(variants) == {"low_hints", "v_first", "one_load", "one_load_ahead", "pieces_ahead", "affine_bound"}
    for label, text in variants.items():
        assert text != src, label
        ast.parse(text)
