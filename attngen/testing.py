"""What the generated test suites run: the checks on one case of one variant.

:func:`check_case` runs a case (:mod:`attngen.generate.cases`) against the float64 reference with
fresh random inputs and a poisoned output; :func:`check_aot` compiles without a GPU.  With
``ATTNGEN_EMULATE=1`` the cases run on the CPU instead, in :mod:`attngen.emulator` (slowly: a
generated suite's GPU tests on a machine without one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random

import pytest
import torch

from . import emulator
from .core import reference
from .core.mask import Mask
from .core.support import DTYPES
from .core.variant import Features, KernelSpec, compiled_by_default
from .generate import codegen
from .generate.cases import Case, cases_for

EMULATE_VARIABLE = "ATTNGEN_EMULATE"


def emulating() -> bool:
    """Whether ``ATTNGEN_EMULATE`` asks for the kernels to run in the CPU emulator."""
    return os.environ.get(EMULATE_VARIABLE, "").strip() not in ("", "0")


needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() or emulating()),
                               reason=f"needs a CUDA GPU (or {EMULATE_VARIABLE}=1: the CPU emulator)")


#: for GPU tests that need the GPU itself (CUDA graphs, the compiler, its memory): they skip
#: where there is none, and under ATTNGEN_EMULATE=1 (a run of the emulator's checks only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or emulating(),
                                reason=f"needs a CUDA GPU itself (and no {EMULATE_VARIABLE}=1)")


@contextlib.contextmanager
def kernel_device():
    """The device the checks run the kernels on: the GPU, or with ``ATTNGEN_EMULATE=1`` the
    CPU, inside the emulator."""
    if emulating():
        with emulator.emulated():
            yield torch.device("cpu")
    else:
        yield torch.device("cuda")


def _tensor(shape, dtype, generator, gain=1.0):
    """Random normal values (times ``gain``) in ``dtype``, on ``generator``'s device."""
    return (torch.randn(shape, dtype=torch.float32, device=generator.device, generator=generator)
            * gain).to(dtype)


SEED_VARIABLE = "ATTNGEN_TEST_SEED"


def case_seed() -> int:
    """The seed of a case's random inputs: ``ATTNGEN_TEST_SEED`` when set (a failing case
    reports its seed; set it to run the case again on the same inputs), else a fresh one."""
    text = os.environ.get(SEED_VARIABLE, "").strip()
    if not text:
        return random.randrange(2**31)
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        raise ValueError(f"{SEED_VARIABLE} must be an integer in 0 .. 2**63 - 1, got {text!r}")
    return seed


def _generator(device: torch.device):
    """A generator on ``device`` seeded by :func:`case_seed` (fresh inputs every run unless
    fixed)."""
    seed = case_seed()
    return seed, torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def built_cubins_fit(what: str):
    """Fails ``what`` when a built cubin could not serve one of its launches because the call
    lays out its parameters otherwise (:data:`attngen.runtime.prebuilt.layout_misses`): the
    kernel was then compiled at the call and gave right answers, but what `attngen build`
    compiled does not run."""
    from .runtime import prebuilt

    before = len(prebuilt.layout_misses)
    yield
    missed = prebuilt.layout_misses[before:]
    assert not missed, f"{what}: a built cubin could not serve the call: {missed[0]}"


def _where(case: Case, seed: int) -> str:
    return f"{case.id} (seed {seed}: {SEED_VARIABLE}={seed} reproduces it)"


def _rel(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _max_err(x, ref) -> float:
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def _inputs(spec: KernelSpec, case: Case, gen):
    """Fresh random inputs of one case: (tensors, call, reference).  ``tensors`` are q, k, v
    and, with sinks, the sink logits; ``call(launch, q, k, v, sinks, **kw)`` runs a launcher on
    them; ``reference(q, k, v, sinks, dtype)`` is the banded reference in ``dtype``."""
    f = spec.features
    dtype = getattr(torch, DTYPES[spec.dtype])
    heads, d = case.heads_kv * spec.gqa, spec.head_dim
    mask = Mask(spec.mask.causal) if case.versus_full else spec.mask
    q_gain = 1.0 if f.softcap is None else f.softcap / 4   # scores large enough for the cap to bite
    device = gen.device
    sinks = torch.randn(heads, device=device, generator=gen) * 2 if f.sinks else None

    def options(sinks):
        return {"scale": case.scale, **({"sinks": sinks} if f.sinks else {})}

    if f.paged:
        cu_q = torch.tensor([0] + [q for q, _ in case.lengths], device=device).cumsum(0).to(torch.int32)
        q = _tensor((int(cu_q[-1]), heads, d), dtype, gen, q_gain)
        k, v, seqused_k, table = paged_cache([n for _, n in case.lengths], case.page, case.heads_kv, d, dtype,
                                             gen, shared=case.shared)

        def call(launch, q, k, v, sinks, **kw):
            return launch(q, k, v, cu_q, seqused_k, table, splits=case.splits, **options(sinks), **kw)

        def ref(q, k, v, sinks, dtype=torch.float64, lse=False):   # lse: each row's log-sum-exp
            options = {"scale": case.scale, "softcap": f.softcap, "sinks": sinks, "dtype": dtype}
            if lse:
                keys, cu_k = reference.gather_pages(k, table, seqused_k)
                return reference.varlen_logsumexp(q, keys, cu_q, cu_k, mask, **options)
            return reference.paged(q, k, v, cu_q, seqused_k, table, mask, **options)
    elif f.varlen:
        cu_q = torch.tensor([0] + [q for q, _ in case.lengths], device=device).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + [k for _, k in case.lengths], device=device).cumsum(0).to(torch.int32)
        q = _tensor((int(cu_q[-1]), heads, d), dtype, gen, q_gain)
        k = _tensor((int(cu_k[-1]), case.heads_kv, d), dtype, gen)
        v = _tensor((int(cu_k[-1]), case.heads_kv, d), dtype, gen)

        def call(launch, q, k, v, sinks, **kw):
            return launch(q, k, v, cu_q, *((cu_k,) if f.chunked else ()), **options(sinks), **kw)

        def ref(q, k, v, sinks, dtype=torch.float64):
            return reference.varlen(q, k, v, cu_q, cu_k, mask, scale=case.scale, softcap=f.softcap,
                                    sinks=sinks, dtype=dtype)
    else:
        seq_k = case.seq_k or case.seq

        def shape(h, s):
            return (case.batch, h, s, d) if case.layout == "bhsd" else (case.batch, s, h, d)
        q = _tensor(shape(heads, case.seq), dtype, gen, q_gain)
        k = _tensor(shape(case.heads_kv, seq_k), dtype, gen)
        v = _tensor(shape(case.heads_kv, seq_k), dtype, gen)

        def call(launch, q, k, v, sinks, **kw):
            return launch(q, k, v, layout=case.layout, **options(sinks), **kw)

        def ref(q, k, v, sinks, dtype=torch.float64):
            return reference.attention(q, k, v, mask, layout=case.layout, q_offset=seq_k - case.seq,
                                       scale=case.scale, softcap=f.softcap, sinks=sinks, dtype=dtype)
    return {"q": q, "k": k, "v": v, **({"sinks": sinks} if f.sinks else {})}, call, ref


def paged_cache(lengths, page: int, heads_kv: int, head_dim: int, dtype, gen, shared: bool = False,
                spare_pages: int = 3):
    """A paged K/V cache holding ``lengths`` keys per sequence in pages of ``page``: (k_cache,
    v_cache, seqused_k, block_table), on ``gen``'s device.  Each sequence's pages are drawn in
    turn from a shuffled pool with ``spare_pages`` unused ones; with ``shared`` the second
    sequence's first pages (all its full ones but one) are the first's, a shared prefix.
    Every cache slot no sequence uses holds NaN, and block-table entries past a sequence's
    pages are -1: a kernel that reads either gives NaN or fails."""
    total = sum(-(-n // page) for n in lengths) + spare_pages
    order = torch.randperm(total, device=gen.device, generator=gen).to(torch.int32)
    table = reference.page_table(lengths, page, order)
    if shared:
        reuse = min(n // page for n in lengths[:2]) - 1
        table[1, :max(reuse, 0)] = table[0, :max(reuse, 0)]
    caches = [reference.scatter_pages(_tensor((sum(lengths), heads_kv, head_dim), dtype, gen), lengths, table,
                                      total, page) for _ in range(2)]
    seqused_k = torch.tensor(lengths, dtype=torch.int32, device=gen.device)
    return caches[0], caches[1], seqused_k, table


def _log(record: dict) -> None:
    log = os.environ.get("ATTNGEN_TEST_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(record) + "\n")


#: floor added to 2 x eager's error, per dtype (see check_case and check_grad_case)
FLOOR = {"fp16": 5e-4, "bf16": 1e-3}


def check_case(launch, spec_dict: dict, case: Case) -> float:
    """Run one case on the GPU (or in the emulator) against the float64 reference.  Rule (the
    gradients' too, see :func:`check_grad_case`): the relative error ||o - ref|| / ||ref|| is
    at most 2 x the error of the same computation by PyTorch eager math in the kernel's dtype,
    plus ``FLOOR``; and, FlashAttention's rule, so that one wrong row cannot hide in the norm,
    so is the largest error of one element.  The output is poisoned first (every element must
    be written) and a second launch must give the same bits.  Returns the error."""
    with kernel_device() as device, built_cubins_fit(case.id):
        return _check_case(launch, KernelSpec.from_dict(spec_dict), case, device)


def _check_case(launch, spec: KernelSpec, case: Case, device: torch.device) -> float:
    seed, gen = _generator(device)
    tensors, call, ref_fn = _inputs(spec, case, gen)
    q, sinks = tensors["q"], tensors.get("sinks")
    k, v = tensors["k"], tensors["v"]
    out = torch.full_like(q, float("nan"))      # poisoned: every element must be written
    result = call(launch, q, k, v, sinks, out=out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    where = _where(case, seed)
    assert result is out, f"{where}: launch did not return out="
    unwritten = torch.isnan(out).sum().item()
    assert unwritten == 0, f"{where}: {unwritten} output elements not written (or NaN)"

    ref = ref_fn(q, k, v, sinks)
    eager_out = ref_fn(q, k, v, sinks, dtype=getattr(torch, DTYPES[spec.dtype]))
    err, eager = _rel(out, ref), _rel(eager_out, ref)
    worst, eager_worst = _max_err(out, ref), _max_err(eager_out, ref)
    _log({"kernel": spec.name, "case": case.id, "rel_err": err, "eager_err": eager, "max_err": worst,
          "eager_max_err": eager_worst})
    bound = 2 * eager + FLOOR[spec.dtype]
    assert err <= bound, f"{where}: relative error {err:.3g} > 2 x eager {eager:.3g} + floor"
    assert worst <= 2 * eager_worst + FLOOR[spec.dtype], \
        f"{where}: largest element error {worst:.3g} > 2 x eager's {eager_worst:.3g} + floor"

    fresh = call(launch, q, k, v, sinks)
    assert fresh.shape == q.shape and fresh.is_contiguous()
    assert torch.equal(fresh, out), f"{where}: a second launch gave different bits"
    if spec.features.paged:
        _check_paged_lse(launch, call, ref_fn, q, k, v, sinks, ref, bound, spec.name, case.id, where)
    return err


def _check_paged_lse(launch, call, ref_fn, q, k, v, sinks, ref, bound: float, kernel: str, case_id: str,
                     where: str) -> None:
    """A paged call with ``return_lse`` (the split kernel, even for one slice, and the merge):
    its output by :func:`check_case`'s rule (``bound``), and its log-sum-exp against the
    float64 reference's: the largest error at most 2 x that of the same computation by
    PyTorch in fp32 (the kernels' arithmetic on these exactly representable inputs), plus
    1e-3 (the softmax's normalizer to 0.1 %).  A row that sees no key gives +inf, or with
    sinks its sink's logit (the reference's -inf or sink).  The dense kernels' log-sum-exp
    is the training forward's, which the gradient checks already hold to account."""
    out, lse = call(launch, q, k, v, sinks, return_lse=True)
    err = _rel(out, ref)
    assert err <= bound, f"{where}: return_lse: relative error {err:.3g} of the output > {bound:.3g}"
    exact = ref_fn(q, k, v, sinks, lse=True)
    seen = exact.isfinite()
    assert torch.all(lse[~seen] == float("inf")), f"{where}: a row that sees no key: lse is not +inf"
    eager = ref_fn(q, k, v, sinks, dtype=torch.float32, lse=True).double()
    lse_err = (lse.double() - exact)[seen].abs().max().item() if seen.any() else 0.0
    eager_err = (eager - exact)[seen].abs().max().item() if seen.any() else 0.0
    _log({"kernel": kernel, "case": case_id, "lse_err": lse_err, "lse_eager_err": eager_err})
    assert lse_err <= 2 * eager_err + 1e-3, \
        f"{where}: log-sum-exp error {lse_err:.3g} > 2 x fp32 PyTorch's {eager_err:.3g} + 1e-3"


def check_grad_case(launch, spec_dict: dict, case: Case) -> dict:
    """Gradients of one case on the GPU (dq, dk, dv and, with sinks, dsinks) against autograd
    of the float64 reference, in both backward modes: the default (where the head dim has
    one, the fused kernel that adds dQ atomically) and ``deterministic=True``.  Rule (FlashAttention's): each gradient's error is
    at most 2 x the error of the same computation by PyTorch eager math in the kernel's dtype,
    plus ``FLOOR``.  Errors are ||x - ref|| / max(||ref||, 1e-2 ||dv_ref||): relative,
    except for a gradient that is exactly zero (a window of one key), measured against dv's
    scale.  A second deterministic backward must give the same bits.  Returns the errors by
    mode: {"default": {name: (ours, eager's)}, "deterministic": {...}}."""
    with kernel_device() as device, built_cubins_fit(case.id):
        return _check_grad_case(launch, KernelSpec.from_dict(spec_dict), case, device)


def _check_grad_case(launch, spec: KernelSpec, case: Case, device: torch.device) -> dict:
    seed, gen = _generator(device)
    tensors, call, ref_fn = _inputs(spec, case, gen)
    names = list(tensors)
    where = _where(case, seed)

    def grads(fn, dtype=None):
        leaves = {n: (t.detach().to(dtype) if dtype else t.detach()).requires_grad_() for n, t in tensors.items()}
        out = fn(**leaves)
        out.backward(dout.to(out.dtype))
        return out, {n: leaves[n].grad for n in names}

    def run(deterministic):
        return lambda q, k, v, sinks=None: call(launch, q, k, v, sinks, deterministic=deterministic)

    dout = _tensor(tensors["q"].shape, tensors["q"].dtype, gen)
    out, fused = grads(run(False))
    assert out.grad_fn is not None, f"{where}: the output does not carry gradients"
    _, fixed = grads(run(True))
    _, again = grads(run(True))
    for n in names:
        assert torch.equal(fixed[n], again[n]), \
            f"{where}: deterministic d{n} differs between two runs"
    _, exact = grads(lambda q, k, v, sinks=None: ref_fn(q, k, v, sinks), torch.float64)
    low = getattr(torch, DTYPES[spec.dtype])
    _, eager = grads(lambda q, k, v, sinks=None: ref_fn(q, k, v, sinks, dtype=low), low)
    scale = 1e-2 * exact["v"].norm().item()
    errors = {}
    for mode, got in (("default", fused), ("deterministic", fixed)):
        errors[mode] = {}
        for n in names:
            ref = exact[n]

            def err(x):
                return ((x.double() - ref).norm() / max(ref.norm().item(), scale)).item()
            errors[mode][n] = (err(got[n]), err(eager[n]))
            _log({"kernel": spec.name, "case": case.id, "mode": mode, "grad": n,
                  "rel_err": errors[mode][n][0], "eager_err": errors[mode][n][1]})
    for mode, by_name in errors.items():
        for n, (ours, theirs) in by_name.items():
            bound = 2 * theirs + FLOOR[spec.dtype]
            assert ours <= bound, f"{where}: {mode} d{n} error {ours:.3g} > 2 x eager {theirs:.3g} + floor"
    return errors


def check_aot(module, spec_dict: dict, suffix: str, arch: str, directory) -> None:
    """One kernel of the variant (``suffix``: see KernelSpec.kernels), compiled ahead of time
    for ``arch``: the cubin `attngen build` wrote beside it, or, in a package generated with
    --no-compile, compiled now.  Needs the tile compiler, not a GPU."""
    from pathlib import Path

    from .generate.aot import export
    from .generate.store import cubin_name

    spec = KernelSpec.from_dict(spec_dict)
    built = Path(directory) / cubin_name(spec.name + suffix, arch)
    if built.exists():
        binary = built.read_bytes()
    elif not compiled_by_default(suffix) and any(Path(directory).glob("*.cubin")):
        pytest.skip("compiled on first need (`attngen build --all` compiles it ahead of time)")
    else:
        buf = io.BytesIO()
        export(getattr(module, spec.name + suffix), spec, arch, buf, spec.kernels[suffix])
        binary = buf.getvalue()
    assert binary[:4] == b"\x7fELF", "the compiler did not return a cubin"


def long_context_errors(seq: int, layout: str, *, backward: bool = True, heads: int = 32,
                        kv_heads: int = 8, head_dim: int = 128, window: int = 4096,
                        rows: int = 256, say=lambda _: None) -> dict[str, float]:
    """One sequence of ``seq`` tokens of a causal ``window`` layer (shape A by default), fp16,
    through ``attngen.get_kernel`` in ``layout`` (``bhsd``, ``bshd`` or ``packed``): sizes
    where q passes 2^31 elements take the kernels' 64-bit twins.  Returns the relative errors
    against the float64 reference of the first and last ``rows`` queries' outputs and, with
    ``backward``, of dq of the last rows and dk, dv of the last ``rows`` keys (only the last
    queries see those, so a band of the reference gives them exactly)."""
    from .runtime.registry import get_kernel

    packed = layout == "packed"
    attn = get_kernel(window=window, gqa=heads // kv_heads, varlen=packed)
    mask = Mask.from_window(window)

    def make(h):
        shape = (seq, h, head_dim) if packed else (1, h, seq, head_dim) if layout == "bhsd" else (1, seq, h, head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.float16).requires_grad_(backward)

    def rows_of(t, sl):        # (1, seq, H, D) view of a tensor, its rows ``sl``
        t = t[None] if packed else t if layout == "bshd" else t.transpose(1, 2)
        return t[:, sl].detach()

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    say(f"{layout}: S={seq}: q has {q.numel() / 2**31:.3f} x 2^31 elements")
    extra = {"cu_seqlens_q": torch.tensor([0, seq], dtype=torch.int32, device="cuda"),
             "max_seqlen_q": seq} if packed else {"layout": layout}
    out = attn(q, k, v, **extra)

    def rel(x, ref):
        return ((x.double() - ref).norm() / ref.norm()).item()

    first = slice(0, rows)
    lo = max(0, seq - rows - window + 1)
    last, band = slice(seq - rows, seq), slice(lo, seq)
    errors = {"out_first": rel(rows_of(out, first), reference.attention(
        *(rows_of(t, first) for t in (q, k, v)), mask, layout="bshd"))}
    ref_in = [rows_of(t, sl).double().requires_grad_(backward) for t, sl in ((q, last), (k, band), (v, band))]
    ref_out = reference.attention(*ref_in, mask, layout="bshd", q_offset=seq - rows - lo)
    errors["out_last"] = rel(rows_of(out, last), ref_out)
    if backward:
        dout = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        rq, rk, rv = torch.autograd.grad(ref_out, ref_in, rows_of(dout, last).double())
        errors.update(dq_last=rel(rows_of(dq, last), rq), dk_last=rel(rows_of(dk, last), rk[:, -rows:]),
                      dv_last=rel(rows_of(dv, last), rv[:, -rows:]))
    say("  " + ", ".join(f"{name} {err:.2e}" for name, err in errors.items()))
    return errors


# -- the emulator's variants, and mutants of them -------------------------------------------------
#: one small variant of every kind (window shapes, GQA, head dims 64, 128 and 256 with the fused
#: backward, softcap, sinks, chunked, packed and paged sequences, fp16 and bf16), windows small
#: enough that their generated cases run in the emulator in minutes
EMULATED_VARIANTS = {
    "causal-window-gqa2-d64-bf16": (Mask(True, 31), 2, 64, "bf16", {}),
    "bidir-window-d64-fp16": (Mask(False, 40, 23), 1, 64, "fp16", {}),
    "causal-full-d128-fp16": (Mask(True), 1, 128, "fp16", {}),
    "causal-window-softcap-d256-fused": (Mask(True, 70), 2, 256, "bf16", {"softcap": 30.0}),
    "causal-window-sinks-gqa8": (Mask(True, 47), 8, 64, "bf16", {"sinks": True}),
    "causal-window-chunked": (Mask(True, 150), 2, 64, "bf16", {"chunked": True}),
    "causal-window-varlen-chunked-d128": (Mask(True, 90), 4, 128, "bf16", {"varlen": True, "chunked": True}),
    "bidir-varlen-sinks": (Mask(False, 20, 35), 2, 64, "fp16", {"varlen": True, "sinks": True}),
    "paged-window-gqa4-d128": (Mask(True, 100), 4, 128, "bf16", {"paged": True}),
    "paged-full-sinks-gqa8": (Mask(True), 8, 64, "bf16", {"paged": True, "sinks": True}),
    "paged-window-softcap": (Mask(True, 40), 2, 64, "fp16", {"paged": True, "softcap": 20.0}),
    "paged-bidir-d96": (Mask(False, 40, 8), 2, 96, "fp16", {"paged": True, "softcap": 30.0}),
}


def emulated_variant(name: str) -> KernelSpec:
    """The spec of :data:`EMULATED_VARIANTS` ``name``."""
    mask, gqa, head_dim, dtype, features = EMULATED_VARIANTS[name]
    return KernelSpec.tuned(mask, gqa, head_dim, dtype, Features(**features))


def check_variant(module, spec: KernelSpec, cases=None) -> None:
    """Both checks of every case (``cases``, default the spec's generated ones) on a variant's
    launcher ``module``: :func:`check_case` and, but for a paged variant, :func:`check_grad_case`."""
    for case in cases_for(spec) if cases is None else cases:
        check_case(module.launch, module.SPEC, case)
        if not spec.features.paged:
            check_grad_case(module.launch, module.SPEC, case)


def render_mutant(spec: KernelSpec, sources: dict, tag: str, directory):
    """``spec`` rendered from the template ``sources`` (a mutation of them) into a package
    named ``<spec.name>_<tag>`` under ``directory``, imported: its launcher registers under
    that name, so the real variant stays untouched.  None when the mutation leaves the
    variant's kernels as they are."""
    from pathlib import Path

    def rendered(template_sources):
        saved = codegen.template_sources
        codegen.template_sources = lambda: template_sources
        codegen._environment.cache_clear()
        try:
            return codegen.render(spec)
        finally:
            codegen.template_sources = saved
            codegen._environment.cache_clear()

    files = rendered(sources)
    if files == rendered(codegen.template_sources()):
        return None
    mutant = f"{spec.name}_{tag}"
    package = Path(directory) / mutant
    package.mkdir(parents=True)
    for file, text in files.items():
        (package / file.replace(spec.name, mutant)).write_text(text.replace(spec.name, mutant))
    return codegen.load_package(package)
