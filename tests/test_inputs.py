import pytest
import torch

from attngen.inputs import GradientNotSupported, InputError, prepare, prepare_sinks, scale_arg

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


@pytest.mark.parametrize("grad", ["q", "k", "v"])
def test_inputs_that_require_grad_are_refused(grad):
    """No backward kernels yet: an output without grad_fn would silently lose the gradients."""
    q, k, v = tensors()
    named = {"q": q, "k": k, "v": v}
    named[grad].requires_grad_(True)
    with pytest.raises(GradientNotSupported, match=rf"^k: {grad} requires grad.*no backward"):
        prepare(named["q"], named["k"], named["v"], None, **ARGS)
    with torch.no_grad():         # inference: the usual checks run (and stop at the CPU device)
        with pytest.raises(InputError, match="runs on CUDA tensors"):
            prepare(named["q"], named["k"], named["v"], None, **ARGS)


def test_sinks_that_require_grad_are_refused():
    sinks = torch.zeros(8, requires_grad=True)
    with pytest.raises(GradientNotSupported, match="sinks requires grad"):
        prepare_sinks(sinks, 8, sinks.device, "k")
    with torch.inference_mode():
        assert prepare_sinks(sinks, 8, sinks.device, "k").dtype == torch.float32
