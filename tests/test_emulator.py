"""The CPU emulator of the generated kernels (attngen.emulator): its tile operations follow
cuTile's documented semantics, it stops where a GPU would do something undefined or racy, and
under it every kind of generated variant (window shapes, GQA, head dims 64 / 128 / 256 with
the fused backward, softcap, sinks, chunked, packed and paged sequences, split keys) passes
its generated suite's cases, forward and gradients in both backward modes, against the
float64 reference, and fails one when the templates carry a one-token bug."""
import pytest
import torch

import cuda.tile as ct

from attngen import emulator
from attngen.emulator import KernelFault
from attngen.generate import codegen
from attngen.generate.cases import cases_for
from attngen.runtime.registry import default_registry
from attngen.testing import EMULATED_VARIANTS, check_variant, emulated_variant, render_mutant

ZERO = ct.PaddingMode.ZERO
TM = 4


def run(kernel, grid, *args):
    emulator.launch(None, grid, kernel, args)


# -- the tile operations, as cuTile documents them ---------------------------------------------
@ct.kernel
def load_rows(X, Out, zero_padded: int):
    i = ct.bid(0)
    if zero_padded:
        t = ct.load(X, index=(i,), shape=(TM,), padding_mode=ZERO)
    else:
        t = ct.load(X, index=(i,), shape=(TM,))
    ct.store(Out, index=(i,), tile=t)


def test_load_reads_tile_index_times_shape_and_pads_past_the_end():
    x = torch.arange(10, dtype=torch.float32)
    out = torch.empty(12)
    run(load_rows, (3,), x, out, 1)
    assert out.tolist() == list(range(10)) + [0, 0]
    run(load_rows, (3,), x, out, 0)        # padding left undetermined: the emulator reads NaN
    assert out[:10].tolist() == list(range(10)) and out[10:].isnan().all()


@ct.kernel
def load_columns(X, Out):
    j = ct.bid(0)
    ct.store(Out, index=(j, 0), tile=ct.load(X, index=(j, 0), shape=(1, 4), order="F"))


@ct.kernel
def load_transposed_planes(X, Out):
    b = ct.bid(0)
    ct.store(Out, index=(b, 0, 0), tile=ct.load(X, index=(b, 0, 0), shape=(1, 2, 2), order=(0, 2, 1)))


def test_order_permutes_the_array_axes_before_tiling():
    x = torch.arange(16).reshape(4, 4)
    out = torch.empty(4, 4, dtype=x.dtype)
    run(load_columns, (4,), x, out)
    assert torch.equal(out, x.T)
    x3 = torch.arange(8).reshape(2, 2, 2)
    out3 = torch.empty_like(x3)
    run(load_transposed_planes, (2,), x3, out3)
    assert torch.equal(out3, x3.transpose(1, 2))


@ct.kernel
def store_ones_then_twos(X):
    ct.store(X, (0,), ct.full((4,), 1, dtype=ct.int32))
    ct.store(X, (1,), ct.full((4,), 2, dtype=ct.int32))
    ct.store(X, (5,), 7)       # a scalar: one element


def test_store_drops_what_lies_past_the_array():
    x = torch.zeros(6, dtype=torch.int32)
    run(store_ones_then_twos, (1,), x)
    assert x.tolist() == [1, 1, 1, 1, 2, 7]


@ct.kernel
def copy_sequence(X, Out, Cu):
    b = ct.bid(0)
    start = ct.load(Cu, index=(b,), shape=())
    stop = ct.load(Cu, index=(b + 1,), shape=())
    Xs = X.slice(0, start, stop)
    Os = Out.slice(0, start, stop)
    ct.store(Os, index=(0,), tile=ct.load(Xs, index=(0,), shape=(TM,), padding_mode=ZERO) + 100)


def test_a_slice_bounds_loads_and_stores_to_its_own_rows():
    x = torch.arange(6, dtype=torch.int32)
    out = torch.full((6,), -1, dtype=torch.int32)
    run(copy_sequence, (2,), x, out, torch.tensor([0, 3, 5], dtype=torch.int32))
    # sequence 0 is rows 0..2: its tile of 4 reads and writes nothing of sequence 1
    assert out.tolist() == [100, 101, 102, 103, 104, -1]


@ct.kernel
def gather_pages(Table, Out):
    idx = ct.arange(8, dtype=ct.int32) - 2
    ct.store(Out, index=(0,), tile=ct.gather(Table, idx, mask=idx != 3, padding_value=-9))


def test_gather_pads_masked_and_out_of_bounds_indices():
    table = torch.arange(10, 15, dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int32)
    run(gather_pages, (1,), table, out)
    assert out.tolist() == [-9, -9, 10, 11, 12, -9, 14, -9]


@ct.kernel
def integer_rounding(Out):
    x = ct.arange(4, dtype=ct.int32) - 5                  # -5 -4 -3 -2
    ct.store(Out, index=(0, 0), tile=(x // 4).reshape((1, 4)))
    ct.store(Out, index=(1, 0), tile=(x % 4).reshape((1, 4)))
    ct.store(Out, index=(2, 0), tile=ct.cdiv(x, 4).reshape((1, 4)))


def test_integer_division_rounds_toward_negative_infinity():
    out = torch.empty(3, 4, dtype=torch.int32)
    run(integer_rounding, (1,), out)
    assert out.tolist() == [[-2, -1, -1, -1], [3, 0, 1, 2], [-1, -1, 0, 0]]


@ct.kernel
def maxima(X, Out):
    x = ct.load(X, index=(0, 0), shape=(2, 4))
    ct.store(Out, index=(0, 0), tile=max(x, 0.5))                          # Python's max: element-wise
    ct.store(Out, index=(0, 4), tile=ct.max(x, axis=-1, keepdims=True))   # ct.max: a reduction


def test_max_is_element_wise_or_a_reduction_and_ignores_nan():
    x = torch.tensor([[0.0, 1.0, float("nan"), 0.25], [-1.0, float("nan"), 2.0, 0.75]])
    out = torch.zeros(2, 5)
    run(maxima, (1,), x, out)
    assert out[:, :4].tolist() == [[0.5, 1.0, 0.5, 0.5], [0.5, 0.5, 2.0, 0.75]]
    assert out[:, 4].tolist() == [1.0, 2.0]


@ct.kernel
def matmul_acc(A, B, Out):
    a = ct.load(A, index=(0, 0), shape=(16, 32))
    b = ct.load(B, index=(0, 0), shape=(32, 8))
    acc = ct.mma(a, b, ct.full((16, 8), 1.0, dtype=ct.float32))
    ct.store(Out, index=(0, 0), tile=acc)


def test_mma_accumulates_bf16_products_in_fp32():
    a, b = torch.randn(16, 32).bfloat16(), torch.randn(32, 8).bfloat16()
    out = torch.empty(16, 8)
    run(matmul_acc, (1,), a, b, out)
    torch.testing.assert_close(out.double(), a.double() @ b.double() + 1, atol=1e-5, rtol=1e-6)


@ct.kernel
def grid_ids(Out, scale: float):
    x, y, z = ct.bid(0), ct.bid(1), ct.bid(2)
    ct.store(Out, index=(z, y, x), tile=(x + 10 * y + 100 * z + ct.num_blocks(0) * 1000) * 1.0)
    if x == 0 and y == 0 and z == 0:
        ct.store(Out, index=(0, 0, 0), tile=scale + 0.0)


def test_every_block_of_the_grid_runs_and_float_parameters_are_fp32():
    out = torch.zeros(2, 3, 4, dtype=torch.float64)
    run(grid_ids, (4, 3, 2), out, 0.1)
    x, y, z = torch.meshgrid(torch.arange(4), torch.arange(3), torch.arange(2), indexing="ij")
    want = (x + 10 * y + 100 * z + 4000).permute(2, 1, 0).double()
    assert torch.equal(out.flatten()[1:], want.flatten()[1:])
    assert out[0, 0, 0].item() == float(torch.tensor(0.1, dtype=torch.float32))


# -- faults: what a GPU would do silently wrong ----------------------------------------------
@ct.kernel
def load_at(X, Out, i: int):
    ct.store(Out, index=(0,), tile=ct.load(X, index=(i,), shape=(TM,), padding_mode=ZERO))


@ct.kernel
def load_unchecked(X, Out):
    ct.store(Out, index=(0,), tile=ct.load(X, index=(1,), shape=(TM,), check_bounds=False))


def test_a_tile_outside_its_array_is_a_fault():
    x, out = torch.zeros(8), torch.zeros(4)
    run(load_at, (1,), x, out, 1)
    with pytest.raises(KernelFault, match="entirely outside"):
        run(load_at, (1,), x, out, 2)
    with pytest.raises(KernelFault, match="entirely outside"):
        run(load_at, (1,), x, out, -1)
    run(load_unchecked, (1,), x, out)
    with pytest.raises(KernelFault, match="check_bounds=False"):
        run(load_unchecked, (1,), torch.zeros(6), out)


def test_a_slice_outside_the_array_is_a_fault():
    with pytest.raises(KernelFault, match="slice"):
        run(copy_sequence, (2,), torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32),
            torch.tensor([0, 3, 7], dtype=torch.int32))


@ct.kernel
def overlapping_stores(Out):
    i = ct.bid(0)
    ct.store(Out, index=(0,), tile=ct.full((TM,), i, dtype=ct.int32))


@ct.kernel
def read_a_neighbour(X):
    i = ct.bid(0)
    ct.store(X, index=(i,), tile=ct.load(X, index=((i + 1) % 2,), shape=(TM,)) + 1)


@ct.kernel
def accumulate(Acc, X, atomic_only: int):
    i = ct.bid(0)
    Acc.tiled_view((TM,)).atomic_store_add((0,), ct.load(X, index=(i,), shape=(TM,)))
    if not atomic_only and i == 1:
        ct.store(Acc, index=(0,), tile=ct.full((TM,), 0.0, dtype=ct.float32))


def test_races_between_programs_are_faults_and_atomic_adds_are_not():
    with pytest.raises(KernelFault, match="race"):
        run(overlapping_stores, (2,), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(KernelFault, match="race"):
        run(read_a_neighbour, (2,), torch.zeros(8, dtype=torch.int32))
    acc, x = torch.zeros(TM), torch.randn(3 * TM)
    run(accumulate, (3,), acc, x, 1)
    torch.testing.assert_close(acc, x.reshape(3, TM).sum(0))
    with pytest.raises(KernelFault, match="race"):
        run(accumulate, (3,), torch.zeros(TM), x, 0)


@ct.kernel
def tile_as_condition(X):
    if ct.load(X, index=(0,), shape=(TM,)) > 0:
        ct.store(X, index=(0,), tile=ct.full((TM,), 0.0, dtype=ct.float32))


@ct.kernel
def uses_printf(X):
    ct.printf("%d", 1)


def test_non_scalar_conditions_unknown_operations_and_device_tensors_are_faults():
    with pytest.raises(KernelFault, match="only 0-d tiles"):
        run(tile_as_condition, (1,), torch.ones(TM))
    with pytest.raises(KernelFault, match="printf is not emulated"):
        run(uses_printf, (1,), torch.ones(TM))
    with pytest.raises(KernelFault, match="CPU tensors"):
        run(tile_as_condition, (1,), torch.ones(TM, device="meta"))


def test_emulated_launchers_take_cpu_tensors_and_restore_the_hooks():
    from attngen.runtime import inputs
    launch, devices = ct.launch, inputs.KERNEL_DEVICES
    with emulator.emulated():
        assert ct.launch is emulator.launch and inputs.KERNEL_DEVICES == ("cpu",)
    assert ct.launch is launch and inputs.KERNEL_DEVICES == devices


# -- every kind of variant, its generated suite's cases, under the emulator -------------------
@pytest.mark.parametrize("name, case", [(name, case) for name in EMULATED_VARIANTS
                                        for case in cases_for(emulated_variant(name))],
                         ids=lambda x: x if isinstance(x, str) else x.id)
def test_generated_cases_pass_under_the_emulator(name, case, monkeypatch):
    """The generated suite's two GPU tests of one case, run on the CPU: the output (and for a
    paged variant the returned log-sum-exp) and, for the others, every gradient in both
    backward modes against the float64 reference, by the suites' own rules."""
    monkeypatch.setenv("ATTNGEN_EMULATE", "1")
    spec = emulated_variant(name)
    check_variant(default_registry.module(spec), spec, [case])


# -- and the emulated cases fail a kernel that is wrong ---------------------------------------
#: one-token changes of the templates, each a bug a kernel could have, and a variant that has it
MUTATIONS = {
    "window-edge-off-by-one": ("kernel.py.j2", "(keys >= rows - WINDOW_LEFT)", "(keys > rows - WINDOW_LEFT)",
                               "causal-window-gqa2-d64-bf16"),
    "window-edge-block-unmasked": ("kernel.py.j2", "{{ rows_per_tile }} - 1 - WINDOW_LEFT, 0)",
                                   "{{ rows_per_tile }} - 2 - WINDOW_LEFT, 0)", "causal-window-chunked"),
    "diagonal-block-unmasked": ("kernel.py.j2", "unmasked_stop = (m0 + 1) // {{ block_n }}",
                                "unmasked_stop = (m0 + 2) // {{ block_n }}", "causal-window-chunked"),
    "fused-backward-skips-a-query-tile": ("kernel.py.j2", "first = max(n0 - offset, 0) // {{ M }}",
                                          "first = max(n0 - offset, 0) // {{ M }} + 1",
                                          "causal-window-softcap-d256-fused"),
    "page-offset-in-the-wrong-unit": ("kernel.py.j2", "% page) // PAGE_ROWS", "% PAGE_ROWS) // PAGE_ROWS",
                                      "paged-window-gqa4-d128"),
    "tail-block-values-unmasked": ("kernel.py.j2", "min(last, seq // BLOCK_N)", "min(last, seq // BLOCK_N + 1)",
                                   "paged-window-gqa4-d128"),
    "whole-block-drops-its-place-in-the-page": ("kernel.py.j2", "* page + j * BLOCK_N % page", "* page",
                                                "paged-window-gqa4-d128"),
    "past-the-end-keys-seen-in-the-tail": ("kernel.py.j2", "if not m.causal and not inside", "if not m.causal and inside",
                                           "paged-bidir-d96"),
    "piece-keys-placed-at-the-first-piece": ("kernel.py.j2", "keys = n{{ i }} + cols", "keys = n{{ 0 }} + cols",
                                             "paged-window-gqa4-d128"),
    "piece-tail-values-one-row-too-many": ("kernel.py.j2", "ct.where(n{{ i }} + lane[:, None] < seq",
                                           "ct.where(n{{ i }} + lane[:, None] <= seq", "paged-window-gqa4-d128"),
    "key-splits-overlap": ("kernel.py.j2", "last = min(first + per_slice, last)",
                           "last = min(first + per_slice + 1, last)", "paged-window-gqa4-d128"),
    "merge-drops-a-weight": ("kernel.py.j2", "total = total + w", "total = max(total, w)",
                             "paged-full-sinks-gqa8"),
    "row-without-keys-divides-by-zero": ("kernel.py.j2", "l_i = max(l_i, 1.0)", "l_i = l_i",
                                         "paged-window-gqa4-d128"),
    "split-grid-too-small": ("launcher.py.j2", "launch_grid(tiles * splits, pairs)",
                             "launch_grid(tiles, pairs)", "paged-window-gqa4-d128"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_broken_kernel_fails_its_emulated_cases(mutation, tmp_path, monkeypatch):
    """Each mutation of the templates, rendered into a variant of its own name, fails one of
    the cases the emulated suites run: those checks can fail."""
    template, old, new, name = MUTATIONS[mutation]
    sources = dict(codegen.template_sources())
    assert old in sources[template], f"{mutation}: the template no longer has {old!r}"
    sources[template] = sources[template].replace(old, new)
    spec = emulated_variant(name)
    module = render_mutant(spec, sources, mutation.replace("-", "_"), tmp_path)
    assert module is not None, f"{mutation} changes nothing of {name}"
    monkeypatch.setenv("ATTNGEN_EMULATE", "1")
    with pytest.raises((AssertionError, KernelFault)):
        check_variant(module, spec)
