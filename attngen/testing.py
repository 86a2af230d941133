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
from .support import DTYPES
from .variant import KernelSpec

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tensor(shape, dtype, generator, gain=1.0):
    return (torch.randn(shape, dtype=torch.float32, device="cuda", generator=generator) * gain).to(dtype)


def check_case(launch, spec_dict: dict, case: Case) -> float:
    """Run one case on the GPU; assert it matches the float64 reference. Returns the error."""
    spec = KernelSpec.from_dict(spec_dict)
    f = spec.features
    dtype = getattr(torch, DTYPES[spec.dtype])
    seed = random.randrange(2**31)             # fresh inputs every run; the seed is reported
    gen = torch.Generator(device="cuda").manual_seed(seed)
    heads, d = case.heads_kv * spec.gqa, spec.head_dim
    mask = Mask(spec.mask.causal) if case.versus_full else spec.mask
    extra, ref_kw = {}, {"scale": case.scale, "softcap": f.softcap}
    q_gain = 1.0 if f.softcap is None else f.softcap / 4   # scores large enough for the cap to bite
    if f.sinks:
        sinks = torch.randn(heads, device="cuda", generator=gen) * 2
        extra["sinks"], ref_kw["sinks"] = sinks, sinks

    if f.varlen:
        cu_q = torch.tensor([0] + [q for q, _ in case.lengths], device="cuda").cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + [k for _, k in case.lengths], device="cuda").cumsum(0).to(torch.int32)
        q = _tensor((int(cu_q[-1]), heads, d), dtype, gen, q_gain)
        k = _tensor((int(cu_k[-1]), case.heads_kv, d), dtype, gen)
        v = _tensor((int(cu_k[-1]), case.heads_kv, d), dtype, gen)
        args = (q, k, v, cu_q) + ((cu_k,) if f.chunked else ())
        reference_out = lambda: reference.varlen(q, k, v, cu_q, cu_k, mask, **ref_kw)  # noqa: E731
    else:
        seq_k = case.seq_k or case.seq

        def shape(h, s):
            return (case.batch, h, s, d) if case.layout == "bhsd" else (case.batch, s, h, d)
        q = _tensor(shape(heads, case.seq), dtype, gen, q_gain)
        k = _tensor(shape(case.heads_kv, seq_k), dtype, gen)
        v = _tensor(shape(case.heads_kv, seq_k), dtype, gen)
        args = (q, k, v)
        extra["layout"] = case.layout
        reference_out = lambda: reference.attention(  # noqa: E731
            q, k, v, mask, layout=case.layout, q_offset=seq_k - case.seq, **ref_kw)

    out = torch.full_like(q, float("nan"))      # poisoned: every element must be written
    result = launch(*args, scale=case.scale, out=out, **extra)
    torch.cuda.synchronize()
    where = f"{case.id} (seed {seed})"
    assert result is out, f"{where}: launch did not return out="
    unwritten = torch.isnan(out).sum().item()
    assert unwritten == 0, f"{where}: {unwritten} output elements not written (or NaN)"

    ref = reference_out()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    log = os.environ.get("ATTNGEN_TEST_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"kernel": spec.name, "case": case.id, "rel_err": err}) + "\n")
    assert err <= TOLERANCE[spec.dtype], f"{where}: relative error {err:.3g} > {TOLERANCE[spec.dtype]}"

    fresh = launch(*args, scale=case.scale, **extra)
    assert fresh.shape == q.shape and fresh.is_contiguous()
    assert torch.equal(fresh, out), f"{where}: a second launch gave different bits"
    return err


def check_aot(kernel, spec_dict: dict, arch: str) -> None:
    """Compile the kernel ahead of time for ``arch``; needs the tile compiler, not a GPU."""
    from .aot import export

    buf = io.BytesIO()
    export(kernel, KernelSpec.from_dict(spec_dict), arch, buf)
    assert buf.getvalue()[:4] == b"\x7fELF", "the compiler did not return a cubin"
