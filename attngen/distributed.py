"""Context-parallel sliding-window attention over ``torch.distributed``: a halo exchange.

The sequence is split into contiguous chunks, one per rank of a process group, in group-rank
order (rank ``p`` owns positions ``start_p .. stop_p - 1``; the chunks may differ in length).
A query sees only the keys of its window, so a rank needs only the keys just before its chunk
(``left`` of them: ``W - 1`` for a causal window of ``W``) and, for a bidirectional local
window, the ``right`` keys just after it: its *halo*.  Every rank derives from the chunk
lengths (one ``all_gather``) which keys it receives from whom and which of its own keys it
sends to whom (:func:`halo_plan`), so sends and receives match without further messages.  One
``batch_isend_irecv`` moves K and V; attention then runs over ``[left halo | local | right
halo]``.  The backward sends the halo's dK/dV back to the ranks that own those keys, which
add them into their own: the gradients are those of attention over the whole sequence in one
process.  See ``docs/distributed.md`` for the data moved, the cost model and the limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import reference
from .mask import Mask
from .support import check_layout

__all__ = ["HaloPlan", "attention", "halo_plan"]

_FULL_ATTENTION = (
    "window=None is full attention: every query then sees every earlier (or every) key, so "
    "each rank needs the keys of all the others, which is ring attention (or an all-gather of "
    "K/V), not a halo exchange; attngen does not provide ring attention. Context parallelism "
    "in attngen is for sliding-window layers; shard full-attention layers another way.")


@dataclass(frozen=True)
class HaloPlan:
    """What one rank receives and sends for one layer.

    ``lo .. hi - 1`` are the global positions of the keys its queries see (its own chunk
    ``start .. stop - 1`` included); ``recv`` lists ``(peer, first, stop)`` for the keys it
    gets from other ranks, in position order (those before ``start`` are the left halo,
    those from ``stop`` on the right halo); ``send`` lists ``(peer, first, stop)`` for its
    own keys that other ranks need.  Positions are global; ``peer`` is a group rank.
    """

    rank: int
    start: int
    stop: int
    lo: int
    hi: int
    recv: tuple[tuple[int, int, int], ...]
    send: tuple[tuple[int, int, int], ...]

    @property
    def left(self) -> int:
        """Keys of the left halo: the query offset within ``[left halo | local | right halo]``."""
        return self.start - self.lo

    @property
    def right(self) -> int:
        return self.hi - self.stop


def _needed(mask: Mask, start: int, stop: int, total: int) -> tuple[int, int]:
    """The keys that queries ``start .. stop - 1`` see; nothing for an empty chunk."""
    if stop <= start:
        return start, start
    return mask.key_range(start, stop, total)


def halo_plan(lengths, rank: int, mask: Mask) -> HaloPlan:
    """The exchange of group rank ``rank`` when the ranks hold ``lengths`` tokens each.

    Every rank computes every rank's needs from the same ``lengths``, so rank ``a``'s
    ``recv`` entry from ``b`` is exactly rank ``b``'s ``send`` entry to ``a``."""
    lengths = [int(n) for n in lengths]
    if mask.left is None:
        raise ValueError(_FULL_ATTENTION)
    starts = [sum(lengths[:p]) for p in range(len(lengths) + 1)]
    total = starts[-1]
    need = [_needed(mask, starts[p], starts[p + 1], total) for p in range(len(lengths))]
    start, stop = starts[rank], starts[rank + 1]
    lo, hi = need[rank]
    recv, send = [], []
    for p in range(len(lengths)):
        if p == rank:
            continue
        a, b = max(lo, starts[p]), min(hi, starts[p + 1])        # p's keys that I see
        if a < b:
            recv.append((p, a, b))
        a, b = max(need[p][0], start), min(need[p][1], stop)     # my keys that p sees
        if a < b:
            send.append((p, a, b))
    return HaloPlan(rank, start, stop, lo, hi, tuple(recv), tuple(send))


def _exchange(group, sends, recvs, like: torch.Tensor) -> list[torch.Tensor]:
    """One ``batch_isend_irecv``: send each ``(peer, tensor)`` of ``sends`` (contiguous) and
    receive, from each ``(peer, shape)`` of ``recvs``, a new contiguous tensor like ``like``."""
    world = dist.group.WORLD if group is None else group
    received = [torch.empty(shape, dtype=like.dtype, device=like.device) for _, shape in recvs]
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(world, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(world, p), group)
            for (p, _), t in zip(recvs, received)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


def _pair_shape(t: torch.Tensor, dim: int, n: int) -> tuple[int, ...]:
    """The shape of K and V stacked, ``n`` positions long along ``dim``."""
    return (2, *t.shape[:dim], n, *t.shape[dim + 1:])


class _Halo(torch.autograd.Function):
    """``(k, v)`` local chunk -> ``(k, v)`` over ``[left halo | local | right halo]``.

    K and V travel together (stacked: one message per peer and direction).  Backward: the
    halo's gradients go back to their owners, and what arrives is added into the local ones."""

    @staticmethod
    def forward(ctx, k, v, plan: HaloPlan, group, dim: int):
        ctx.plan, ctx.group, ctx.dim = plan, group, dim
        sends = [(p, torch.stack([k.narrow(dim, a - plan.start, b - a),
                                  v.narrow(dim, a - plan.start, b - a)]))
                 for p, a, b in plan.send]
        recvs = [(p, _pair_shape(k, dim, b - a)) for p, a, b in plan.recv]
        got = _exchange(group, sends, recvs, k)
        left = [g for g, (p, _, _) in zip(got, plan.recv) if p < plan.rank]
        right = [g for g, (p, _, _) in zip(got, plan.recv) if p > plan.rank]
        k_win = torch.cat([*(g[0] for g in left), k, *(g[0] for g in right)], dim)
        v_win = torch.cat([*(g[1] for g in left), v, *(g[1] for g in right)], dim)
        return k_win, v_win

    @staticmethod
    def backward(ctx, dk_win, dv_win):
        plan, dim = ctx.plan, ctx.dim
        # the forward's receives are the backward's sends, and the other way round
        sends = [(p, torch.stack([dk_win.narrow(dim, a - plan.lo, b - a),
                                  dv_win.narrow(dim, a - plan.lo, b - a)]))
                 for p, a, b in plan.recv]
        recvs = [(p, _pair_shape(dk_win, dim, b - a)) for p, a, b in plan.send]
        got = _exchange(ctx.group, sends, recvs, dk_win)
        n = plan.stop - plan.start
        dk = dk_win.narrow(dim, plan.left, n).clone()
        dv = dv_win.narrow(dim, plan.left, n).clone()
        for g, (_, a, b) in zip(got, plan.send):
            dk.narrow(dim, a - plan.start, b - a).add_(g[0])
            dv.narrow(dim, a - plan.start, b - a).add_(g[1])
        return dk, dv, None, None, None


def _mask(window, causal) -> Mask:
    mask = Mask.from_window(window, causal)
    if mask.left is None:
        raise ValueError(_FULL_ATTENTION)
    return mask


def _check_inputs(q, k, v, layout: str, sinks) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D torch.Tensor in layout {layout!r}, got "
                             f"{getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("q, k and v must share one dtype and one device, got "
                         f"{[(t.dtype, str(t.device)) for t in (q, k, v)]}")
    s = 2 if layout == "bhsd" else 1
    h = 3 - s
    if (q.shape[0], q.shape[s], q.shape[3]) != (k.shape[0], k.shape[s], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} ({layout}) must agree in batch, "
                         f"local sequence length (each rank owns the same positions of q, k and v) "
                         f"and head_dim")
    if q.shape[h] % k.shape[h]:
        raise ValueError(f"query heads {q.shape[h]} are not a multiple of KV heads {k.shape[h]}")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.shape != (q.shape[h],)):
        raise ValueError(f"sinks must be a tensor of one logit per query head, ({q.shape[h]},), "
                         f"got {getattr(sinks, 'shape', type(sinks))}")


def _cuda_unsupported(mask: Mask, device: torch.device) -> str | None:
    """Why the CUDA path cannot run this mask, or None."""
    if device.type == "cuda" and not mask.causal:
        return ("context-parallel bidirectional windows on CUDA need a kernel whose queries sit "
                "between a left and a right halo of keys; attngen's chunked kernels take queries "
                "that are the last S_q of the keys (no right halo). Only causal windows run on "
                "CUDA; the CPU path (the float64-capable reference) takes both.")
    return None


def attention(q, k, v, *, window, causal: bool = True, group=None, layout: str = "bhsd",
              scale: float | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's output of sliding-window attention over the whole sequence.

    ``q, k, v`` are this rank's contiguous chunk, ``(B, H, S_local, D)`` / ``(B, HKV,
    S_local, D)`` (``layout="bshd"``: ``(B, S_local, H, D)``); the chunks of the group's ranks,
    in group-rank order, make the sequence, and may differ in length.  ``window`` and
    ``causal`` are :func:`attngen.get_kernel`'s (a causal ``W``, or ``{"left": L, "right": R}``
    with ``causal=False``); ``window=None`` (full attention) raises
    ``ValueError``.  GQA is ``H // HKV``.  ``scale``, ``softcap`` and ``sinks`` (one logit per
    query head) are as in the kernels.  Every rank of ``group`` must call this together, with
    the same window, scale, softcap and sinks (window, shapes and dtype are checked; the
    floats are not), and, when K or V needs a gradient, must run the backward too: it is a
    collective.  The sinks' gradient is this rank's share; sum it over the ranks (as for any
    replicated parameter) to get the single-process one.

    On CUDA a causal window runs attngen's ``chunked`` kernel for the variant; on any other
    device :func:`attngen.reference.attention` computes in ``q.dtype``, with autograd.
    """
    mask = _mask(window, causal)
    check_layout(layout)
    _check_inputs(q, k, v, layout, sinks)
    why = _cuda_unsupported(mask, q.device)
    if why:
        raise NotImplementedError(why)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attngen.distributed.attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    s, h = (2, 1) if layout == "bhsd" else (1, 2)
    needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    right = -1 if mask.right is None else mask.right
    mine = [k.shape[s], q.shape[0], q.shape[h], k.shape[h], q.shape[3], int(mask.causal),
            mask.left, right, int(needs_grad), _dtype_code(q.dtype)]
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    gathered = [torch.empty(len(mine), dtype=torch.int64, device=q.device) for _ in range(size)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=q.device), group=group)
    rows = [g.tolist() for g in gathered]
    names = ["batch", "query heads", "KV heads", "head_dim", "causal", "window left", "window right",
             "K/V requiring grad", "dtype"]
    for i, name in enumerate(names, start=1):
        values = [r[i] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(f"every rank must call attngen.distributed.attention with the same "
                             f"{name}; the ranks have {values}")
    plan = halo_plan([r[0] for r in rows], rank, mask)
    k_win, v_win = _Halo.apply(k, v, plan, group, s)
    if q.device.type == "cuda":
        from .registry import get_kernel
        kernel = get_kernel(mask, gqa=q.shape[h] // k.shape[h], softcap=softcap,
                            sinks=sinks is not None, chunked=True)
        extra = {} if sinks is None else {"sinks": sinks}
        return kernel(q, k_win, v_win, scale=scale, layout=layout, **extra)
    return reference.attention(q, k_win, v_win, mask, scale=scale, layout=layout, q_offset=plan.left,
                               softcap=softcap, sinks=sinks, dtype=q.dtype)


def _dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype`` that is the same in every process (for the consistency check)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(str(dtype))) % (1 << 62)
