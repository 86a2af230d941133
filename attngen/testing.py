"""What the generated test suites run: the checks on one case of one variant.

:func:`check_case` runs a case (:mod:`attngen.cases`) against the float64 reference with
fresh random inputs and a poisoned output; :func:`check_aot` compiles without a GPU.
"""

from __future__ import annotations

import io
import json
import os
import random

import pytest
import torch

from . import reference
from .cases import TOLERANCE, Case
from .mask import Mask
from .spec import DTYPES, KernelSpec

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tensor(shape, dtype, device, generator):
    return torch.randn(shape, dtype=torch.float32, device=device, generator=generator).to(dtype)


def check_case(launch, spec_dict: dict, case: Case) -> float:
    """Run one case on the GPU; assert it matches the float64 reference. Returns the error."""
    spec = KernelSpec.from_dict(spec_dict)
    dtype = getattr(torch, DTYPES[spec.dtype])
    seed = random.randrange(2**31)             # fresh inputs every run; the seed is reported
    gen = torch.Generator(device="cuda").manual_seed(seed)
    heads = case.heads_kv * spec.gqa

    def shape(h):
        if case.layout == "bhsd":
            return (case.batch, h, case.seq, spec.head_dim)
        return (case.batch, case.seq, h, spec.head_dim)

    q = _tensor(shape(heads), dtype, "cuda", gen)
    k = _tensor(shape(case.heads_kv), dtype, "cuda", gen)
    v = _tensor(shape(case.heads_kv), dtype, "cuda", gen)
    out = torch.full_like(q, float("nan"))      # poisoned: every element must be written
    result = launch(q, k, v, scale=case.scale, out=out, layout=case.layout)
    torch.cuda.synchronize()
    where = f"{case.id} (seed {seed})"
    assert result is out, f"{where}: launch did not return out="
    unwritten = torch.isnan(out).sum().item()
    assert unwritten == 0, f"{where}: {unwritten} output elements not written (or NaN)"

    mask = Mask(spec.mask.causal) if case.versus_full else spec.mask
    ref = reference.attention(q, k, v, mask, scale=case.scale, layout=case.layout)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    log = os.environ.get("ATTNGEN_TEST_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"kernel": spec.name, "case": case.id, "rel_err": err}) + "\n")
    assert err <= TOLERANCE[spec.dtype], f"{where}: relative error {err:.3g} > {TOLERANCE[spec.dtype]}"

    fresh = launch(q, k, v, scale=case.scale, layout=case.layout)
    assert fresh.shape == q.shape and fresh.is_contiguous()
    assert torch.equal(fresh, out), f"{where}: a second launch gave different bits"
    return err


def check_aot(kernel, spec_dict: dict, arch: str) -> None:
    """Compile the kernel ahead of time for ``arch``; needs the tile compiler, not a GPU."""
    from .aot import export

    buf = io.BytesIO()
    export(kernel, KernelSpec.from_dict(spec_dict), arch, buf)
    assert buf.getvalue()[:4] == b"\x7fELF", "the compiler did not return a cubin"
