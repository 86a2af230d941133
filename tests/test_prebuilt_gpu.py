"""On a GPU: a built variant's first call in a fresh process runs the built cubins and compiles
nothing, and a call the build did not specialize for still gets a right answer (compiled then).

    pytest -m gpu tests/test_prebuilt_gpu.py -s -q

prints the first-call times (inference, then a first training step) of a fresh process.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from attngen.testing import needs_cuda

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, needs_cuda]

SPEC = """name: mistral-like
window: 4096
gqa: 4
head_dim: 128
dtype: bf16
"""

# Runs in a fresh process: the registry reads only `out`, cuTile's disk cache is empty, and its
# compile entry point raises (STRICT=1) or counts its calls (STRICT=0).
CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import cuda.tile._compile as cutile_compile

    compiles = []
    real = cutile_compile.compile_tile
    def compile_tile(*args, **kwargs):
        if os.environ["STRICT"] == "1":
            raise AssertionError("the tile compiler ran")
        compiles.append(1)
        return real(*args, **kwargs)
    cutile_compile.compile_tile = compile_tile

    import attngen

    S, B = int(os.environ["SEQ"]), int(os.environ["BATCH"])
    g = torch.Generator(device="cuda").manual_seed(0)
    def make(heads, offset=0):
        flat = torch.randn(B * heads * S * 128 + offset, device="cuda", dtype=torch.bfloat16, generator=g)
        return flat[offset:].view(B, heads, S, 128)
    offset = int(os.environ["OFFSET"])               # elements: 1 breaks 16-byte alignment
    q, k, v = make(32, offset), make(8, offset), make(8, offset)
    torch.cuda.synchronize()

    start = time.perf_counter()
    attn = attngen.get_kernel(window=4096, gqa=4)
    out = attn(q, k, v)
    torch.cuda.synchronize()
    first = time.perf_counter() - start

    start = time.perf_counter()
    out = attn(q, k, v)
    torch.cuda.synchronize()
    second = time.perf_counter() - start

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    attn(qg, kg, vg).float().square().sum().backward()
    torch.cuda.synchronize()
    train = time.perf_counter() - start

    # check against dense attention over the same window (float32 SDPA with a band mask)
    rows = torch.arange(S, device="cuda")
    band = (rows[None, :] <= rows[:, None]) & (rows[None, :] > rows[:, None] - 4096)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=band, enable_gqa=True)
    want.square().sum().backward()
    errors = {"out": (out.float() - want).abs().max().item()}
    for name, got, ref in (("dq", qg, qf), ("dk", kg, kf), ("dv", vg, vf)):
        errors[name] = ((got.grad.float() - ref.grad).abs().max() / ref.grad.abs().max()).item()
    print(json.dumps({"first_ms": first * 1e3, "second_ms": second * 1e3, "train_ms": train * 1e3,
                      "compiles": len(compiles), "errors": errors}))
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from cuda.tile._cext import get_compute_capability

    from attngen.generate.build import build
    from attngen.generate.spec import load_text

    out = tmp_path_factory.mktemp("built") / "out"
    arch = "sm_{}{}".format(*get_compute_capability())
    build(load_text(SPEC), out, archs=(arch,))
    return out


def fresh_process(out, tmp_path, *, strict, offset=0, seq=8192, batch=1):
    env = {**os.environ, "ATTNGEN_PATH": str(out), "ATTNGEN_JIT": "0",
           "ATTNGEN_CACHE_DIR": str(tmp_path / "attngen-cache"),
           "CUDA_TILE_CACHE_DIR": str(tmp_path / "cutile-cache"),     # empty: no cached cubin
           "STRICT": "1" if strict else "0", "OFFSET": str(offset), "SEQ": str(seq),
           "BATCH": str(batch)}
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def check_errors(errors):
    assert errors["out"] < 2e-2, errors
    assert max(errors[g] for g in ("dq", "dk", "dv")) < 2e-2, errors


# 1001: rows of odd length, whose per-row statistics attngen pads to keep the built kernels'
# stride assumptions; a batch of one cuTile launches under one calling convention, of two
# under the other
@pytest.mark.parametrize("seq,batch", [(8192, 1), (1001, 1), (2048, 2)])
def test_first_call_in_a_fresh_process_compiles_nothing(built, tmp_path, seq, batch):
    found, log = fresh_process(built, tmp_path, strict=True, seq=seq, batch=batch)
    check_errors(found["errors"])
    assert found["compiles"] == 0 and "compiling" not in log
    print(f"\nfresh process, built variant, B={batch} S={seq}: first call {found['first_ms']:.1f} ms "
          f"(second {found['second_ms']:.2f} ms), first training step {found['train_ms']:.1f} ms")


def test_a_call_the_build_did_not_specialize_for_compiles_and_is_right(built, tmp_path):
    found, log = fresh_process(built, tmp_path, strict=False, offset=1, seq=1024)
    check_errors(found["errors"])
    assert found["compiles"] > 0 and "base address" in log
