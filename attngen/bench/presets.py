"""The shapes `attngen bench` times (presets A, B, B', C, ... from the models attngen
targets) and the implementations it times them with: attngen, PyTorch SDPA (flash, cuDNN,
band mask) and FlexAttention, each a zero-argument callable over the same inputs, checked
against the float64 reference before it is timed."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..core.mask import Mask
from ..core.support import DTYPES
from ..core.tuning import Tiles
from ..core.variant import Features, KernelSpec

CHECK_ROWS = 256        # query rows checked at each end of the sequence
PEERS = ("attngen", "attngen-det", "sdpa-flash", "sdpa-cudnn", "flex", "sdpa-band")
#: attngen-det is attngen with the deterministic backward: timed only when asked for
DEFAULT_PEERS = tuple(p for p in PEERS if p != "attngen-det")


@dataclass(frozen=True)
class Shape:
    label: str
    heads: int
    heads_kv: int
    head_dim: int
    window: int | None
    dtype: str
    seqs: tuple[int, ...]
    batch: int = 1
    softcap: float | None = None
    sinks: bool = False
    prefix: int = 0          # cached keys before the queries (chunked prefill)

    @property
    def mask(self) -> Mask:
        return Mask.from_window(self.window, causal=True)

    def spec(self, tiles: Tiles | None = None) -> KernelSpec:
        """The attngen kernel for the shape: every tile from the tuned tables, or ``tiles``
        for the forward's."""
        return KernelSpec.tuned(self.mask, self.heads // self.heads_kv, self.head_dim, self.dtype,
                                Features(self.softcap, self.sinks, chunked=self.prefix > 0), tiles)

    @property
    def plain(self) -> bool:
        """Computes what full-causal SDPA and FlexAttention compute (up to the window)."""
        return self.softcap is None and not self.sinks and not self.prefix


PRESETS = {
    "A": Shape("A mistral-7b", 32, 8, 128, 4096, "fp16", (4096, 8192, 16384, 32768)),
    "B": Shape("B gemma3-4b local", 8, 4, 256, 1024, "bf16", (4096, 8192, 16384, 32768)),
    "B'": Shape("B' gemma3-27b local", 32, 16, 128, 1024, "bf16", (4096, 8192, 16384, 32768)),
    "C": Shape("C gpt-oss local", 64, 8, 64, 128, "bf16", (4096, 8192, 16384, 32768)),
    "C16": Shape("C gpt-oss local fp16", 64, 8, 64, 128, "fp16", (4096, 8192, 16384, 32768)),
    # features: what each costs over the plain kernel of the same shape
    "C-sinks": Shape("C gpt-oss local + sinks", 64, 8, 64, 128, "bf16", (8192, 32768), sinks=True),
    "G2": Shape("gemma2-9b local", 16, 8, 256, 4096, "bf16", (8192, 32768)),
    "G2-softcap": Shape("gemma2-9b local + softcap", 16, 8, 256, 4096, "bf16", (8192, 32768), softcap=50.0),
    "A-chunk": Shape("A mistral-7b, chunk after 28k prefix", 32, 8, 128, 4096, "fp16", (1024, 4096),
                     prefix=28672),
}


DEFAULT_PRESETS = ("A", "B", "B'", "C", "C16")


def parse_window(text: str) -> int | str:
    """``--window``: a positive number of keys, or ``full``."""
    if text == "full":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"a window is a positive integer or 'full', got {text!r}")
    return int(text)


def parse_tiles(text: str) -> Tiles:
    """The inverse of ``Tiles.tag``: ``128x64o2c1p8`` -> Tiles(128, 64, 2, 1, pack=8)."""
    import re

    match = re.fullmatch(r"(\d+)x(\d+)o(\d+)c(\d+)(?:p(\d+))?(?:w(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"tiles look like 128x64o2c1, 128x64o2c1p8 or 128x128o1c1w8 (BMxBN, o occupancy, c CTAs "
            f"per cluster, p query heads per tile, w worker warps), got {text!r}")
    bm, bn, occ, ctas, pack, warps = match.groups()
    try:
        return Tiles(int(bm), int(bn), int(occ), int(ctas), int(pack or 1),
                     int(warps) if warps else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def make_inputs(shape: Shape, seq: int):
    import torch

    dtype = getattr(torch, DTYPES[shape.dtype])
    make = lambda h, s: torch.randn(shape.batch, h, s, shape.head_dim, device="cuda",  # noqa: E731
                                    dtype=torch.float32).to(dtype)
    q = make(shape.heads, seq)
    if shape.softcap is not None:
        q = q * (shape.softcap / 4)          # scores large enough for the cap to matter
    sinks = torch.randn(shape.heads, device="cuda") if shape.sinks else None
    return q, make(shape.heads_kv, seq + shape.prefix), make(shape.heads_kv, seq + shape.prefix), sinks


def implementations(shape: Shape, seq: int, q, k, v, sinks, spec: KernelSpec, names):
    """name -> zero-argument callable returning the output, for the requested peers."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    group = shape.heads // shape.heads_kv
    if {"attngen", "attngen-det"} & set(names):
        from ..runtime.registry import default_registry

        extra = {"sinks": sinks} if shape.sinks else {}
        attn = default_registry.ensure(spec)
        if "attngen" in names:
            impls["attngen"] = lambda: attn(q, k, v, deterministic=False, **extra)
        if "attngen-det" in names:
            impls["attngen-det"] = lambda: attn(q, k, v, deterministic=True, **extra)
    if not shape.plain:
        names = [n for n in names if n == "flex"] if not shape.sinks else []
    needs_expanded = {"sdpa-flash", "sdpa-cudnn", "sdpa-band"} & set(names)
    if needs_expanded:
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if name in names:
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
            impls[name] = run
    if "sdpa-band" in names and seq <= 16384:
        i = torch.arange(seq, device="cuda")
        band = shape.mask.visible(i[:, None], i[None, :])
        impls["sdpa-band"] = lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=band)
    if "flex" in names:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from ..core.reference import softcapped

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        flex = torch.compile(flex_attention, dynamic=False)
        mask, prefix, cap = shape.mask, shape.prefix, shape.softcap

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.visible(q_idx + prefix, kv_idx)

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcapped(score, cap)
        block_mask = create_block_mask(mask_mod, None, None, seq, seq + prefix, device="cuda")
        mods = {"score_mod": score_mod} if cap is not None else {}
        impls["flex"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True, **mods)
    return impls


def output_error(out, q, k, v, sinks, shape: Shape) -> float:
    """Relative error of ``out`` against the float64 reference on the first and last rows."""
    from ..core.reference import attention

    seq = q.shape[2]
    errs = []
    for start in sorted({0, max(0, seq - CHECK_ROWS)}):
        stop = min(seq, start + CHECK_ROWS)
        ref = attention(q[:, :, start:stop], k, v, shape.mask, q_offset=shape.prefix + start,
                        softcap=shape.softcap, sinks=sinks)
        got = out[:, :, start:stop].double()
        errs.append(((got - ref).norm() / ref.norm()).item())
    return max(errs) if all(math.isfinite(e) for e in errs) else float("nan")
