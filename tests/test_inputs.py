import pytest
import torch

from attngen.runtime import inputs
from attngen.runtime.inputs import (InputError, grad_output, no_out_with_grad, prepare, scale_arg, softmax_scale,
                            wants_grad)

ARGS = dict(layout="bhsd", head_dim=64, dtype=torch.float16, group=4, name="k")


def tensors(b=1, h=8, hkv=2, s=16, d=64, dtype=torch.float16):
    return (torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, hkv, s, d, dtype=dtype),
            torch.randn(b, hkv, s, d, dtype=dtype))


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q, k, v[:, :1]), "k and v must have one shape"),
    (lambda q, k, v: (q[..., :32], k, v), "head_dim must be 64"),
    (lambda q, k, v: (q[:, :4], k, v), "so k and v need 1, got 2"),
    (lambda q, k, v: (q[:, :7], k, v), "not a multiple of 4"),
    (lambda q, k, v: (q, k[:, :, :8], v[:, :, :8]), "as many keys as queries"),
    (lambda q, k, v: (torch.cat([q, q]), k, v), "batch sizes differ"),
    (lambda q, k, v: (q.float(), k, v), "q has dtype torch.float32"),
    (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), "unit stride"),
    (lambda q, k, v: (q, k, v[0]), "v must be 4-D"),
    (lambda q, k, v: (q, "k", v), "k must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v), "runs on CUDA tensors"),
])
def test_prepare_names_the_problem(change, match):
    with pytest.raises(InputError, match=match) as info:
        prepare(*change(*tensors()), None, **ARGS)
    assert str(info.value).startswith("k: ")


def test_layout_and_scale_checks():
    with pytest.raises(InputError, match="layout"):
        prepare(*tensors(), None, **{**ARGS, "layout": "sbhd"})
    with pytest.raises(InputError, match="positive finite"):
        scale_arg(float("nan"), 64)
    with pytest.raises(InputError, match="positive finite"):
        scale_arg(-1.0, 64)
    assert scale_arg(None, 64) == pytest.approx(0.125 * 1.4426950408889634)


def test_autograd_helpers():
    q = torch.randn(2, 3)
    assert not wants_grad(q, None)
    leaf = torch.randn(2, 3, requires_grad=True)
    assert wants_grad(q, leaf)
    with torch.no_grad():
        assert not wants_grad(leaf)
    no_out_with_grad(None, "k")
    with pytest.raises(InputError, match="^k: out= cannot be used while autograd records"):
        no_out_with_grad(q, "k")
    assert softmax_scale(None, 64) == 0.125 and softmax_scale(0.3, 64) == 0.3
    with pytest.raises(InputError, match="positive finite"):
        softmax_scale(0.0, 64)
    out = torch.randn(2, 4, 8)
    assert grad_output(out, out, "k") is out
    strided = torch.randn(2, 8, 4).transpose(1, 2)              # last stride 4
    assert grad_output(strided, out, "k").stride(-1) == 1
    with pytest.raises(InputError, match="gradient has shape"):
        grad_output(out[:1], out, "k")


def test_wide_index_only_past_int32():
    from attngen.runtime.inputs import wide_index

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float16)
    assert not wide_index(meta(2, 32, 262144, 128))                      # 2^31 elements exactly
    assert wide_index(meta(2, 32, 262145, 128))                          # one row past it
    assert wide_index(meta(1, 32, 524288, 128))                          # a batch stride of 2^31
    assert wide_index(meta(1, 32, 524288, 128).transpose(1, 2)[:, :1])   # a stride past int32
    assert wide_index(meta(2, 8, 131073, 1024))                          # batch offsets past it
    assert not wide_index(meta(0, 32, 10**6, 128))                        # empty: nothing indexed
    assert not wide_index(meta(2**20, 8, 128))


@pytest.mark.parametrize("pairs", [1, 7, 65535, 65536, 70400, 131071, 131072, 10**6])
def test_launch_grid_folds_pairs_over_y_and_z(pairs):
    """Every (batch, head) pair gets a program, no axis past 65535, and fewer than z spare
    programs (the ones the kernels skip)."""
    tiles, y, z = inputs.launch_grid(5, pairs)
    assert tiles == 5 and y <= inputs.GRID_YZ_MAX and z <= inputs.GRID_YZ_MAX
    assert pairs <= y * z < pairs + z
    assert (y, z) == (pairs, 1) or pairs > inputs.GRID_YZ_MAX


@pytest.mark.parametrize("shape", [(2, 3, 1001), (2, 3, 8192), (50, 6), (4, 7, 5)])
def test_row_stats_keep_every_stride_a_multiple_of_16_bytes(shape):
    from attngen.runtime.inputs import row_stats

    rows = row_stats(shape, "cpu")
    assert rows.shape == shape and rows.dtype == torch.float32 and rows.stride(-1) == 1
    assert all(s * 4 % 16 == 0 for s in rows.stride()[:-1]), rows.stride()
    padded = -(-shape[-1] // 4) * 4
    assert rows.stride(-2) == padded          # no more than the padding a row needs


def test_merged_lse_is_the_log_sum_exp_over_every_slice():
    """A split call's slices (log2 units, M_START where a row sees no key of the slice) merge
    into the natural-log log-sum-exp over all of them; a row that sees no key anywhere gives
    +inf, or with a sink, the sink's logit; the sink is one more term otherwise."""
    empty = -1.0e30
    scores = torch.randn(3, 5, 4, 7, dtype=torch.float64)            # slice, row, head, key
    scores[:, 0] = float("-inf")                                      # row 0 sees no key at all
    scores[1:, 2] = float("-inf")                                     # row 2 sees keys of slice 0 only
    per_slice = torch.logsumexp(scores, dim=-1) * inputs.LOG2E        # log2 units
    part = per_slice.masked_fill(per_slice == float("-inf"), empty).float()
    got = inputs.merged_lse(part, None, empty)
    want = torch.logsumexp(scores.permute(1, 2, 0, 3).flatten(2), dim=-1)
    assert got[0].eq(float("inf")).all()
    torch.testing.assert_close(got[1:].double(), want[1:], atol=1e-5, rtol=1e-6)
    sinks = torch.randn(4)
    with_sinks = inputs.merged_lse(part, sinks, empty)
    torch.testing.assert_close(with_sinks[0], sinks)
    torch.testing.assert_close(with_sinks[1:].double(), torch.logaddexp(want[1:], sinks.double()), atol=1e-5,
                               rtol=1e-6)


def test_a_trusted_call_gets_the_same_views_without_the_checks(monkeypatch):
    """check=False (a backward given its forward's own tensors) returns what a checked call
    returns, and checks nothing: tensors on the CPU pass, where a checked call refuses them."""
    q, k, v = (t.transpose(1, 2) for t in tensors())           # (B, S, H, D)
    out = torch.empty_like(q)
    trusted = prepare(q, k, v, out, **{**ARGS, "layout": "bshd"}, check=False)
    monkeypatch.setattr(inputs, "KERNEL_DEVICES", ("cpu",))
    checked = prepare(q, k, v, out, **{**ARGS, "layout": "bshd"})
    assert all(a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
               for a, b in zip(trusted, checked))
    monkeypatch.undo()
    fresh = prepare(q, k, v, None, **{**ARGS, "layout": "bshd"}, check=False)[4]
    assert fresh.shape == q.shape and fresh.is_contiguous()


def test_a_trusted_packed_call_still_reads_the_longest_sequence():
    q, k, v = torch.randn(10, 8, 64, dtype=torch.float16), *(torch.randn(10, 2, 64, dtype=torch.float16),) * 2
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    packed = dict(head_dim=64, dtype=torch.float16, group=4, name="k", chunked=False, need_longest_k=True)
    cu_q, cu_k, longest, longest_k, out = inputs.prepare_varlen(q, k, v, cu, None, None, None, None, **packed,
                                                                check=False)
    assert (longest, longest_k) == (7, 7) and out.shape == q.shape and cu_k.data_ptr() == cu_q.data_ptr()
    with pytest.raises(InputError, match="runs on CUDA tensors"):
        inputs.prepare_varlen(q, k, v, cu, None, None, None, None, **packed)
