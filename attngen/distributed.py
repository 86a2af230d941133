"""Context-parallel sliding-window attention over ``torch.distributed``: a halo exchange.

The sequence is split into contiguous chunks, one per rank of a process group, in group-rank
order (rank ``p`` owns positions ``start_p .. stop_p - 1``; the chunks may differ in length).
A query sees only the keys of its window, so a rank needs only the keys just before its chunk
(``left`` of them: ``W - 1`` for a causal window of ``W``) and, for a bidirectional local
window, the ``right`` keys just after it: its *halo*.  Every rank derives from the chunk
lengths (one ``all_gather``) which keys it receives from whom and which of its own keys it
sends to whom (:func:`halo_plan`), so sends and receives match without further messages.  One
``batch_isend_irecv`` moves K and V.  For a causal window, the queries that see no halo key
(all but the first ``W - 1``) run over the local keys while the halo is in flight; then the
first ``W - 1`` run over ``[left halo | their local keys]``: two chunked launches on views, no
copy of the local K/V (only of the ``W - 1`` keys joined to the halo).  A bidirectional window
(CPU only) runs once over ``[left halo | local | right halo]``.  The backward sends the halo's
dK/dV back to the ranks that own those keys, which add them into their own: the gradients are
those of attention over the whole sequence in one process.  See ``docs/distributed.md`` for the data moved, the cost model and the limits.
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


class _Pending:
    """A started ``batch_isend_irecv``: ``wait()`` makes the current stream wait for it (the
    host does not block on NCCL) and returns the received tensors."""

    def __init__(self, group, sends, recvs, like: torch.Tensor):
        world = dist.group.WORLD if group is None else group
        self.received = [torch.empty(shape, dtype=like.dtype, device=like.device) for _, shape in recvs]
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(world, p), group) for p, t in sends]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(world, p), group)
                for (p, _), t in zip(recvs, self.received)]
        self.sends = sends                      # kept alive until the exchange completes
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


def _pair_shape(t: torch.Tensor, dim: int, n: int) -> tuple[int, ...]:
    """The shape of K and V stacked, ``n`` positions long along ``dim``."""
    return (2, *t.shape[:dim], n, *t.shape[dim + 1:])


def _start_halo(k, v, plan: HaloPlan, group, dim: int) -> _Pending:
    """Send this rank's keys that others see and start receiving its halo (K and V stacked:
    one message per peer and direction)."""
    sends = [(p, torch.stack([k.narrow(dim, a - plan.start, b - a), v.narrow(dim, a - plan.start, b - a)]))
             for p, a, b in plan.send]
    recvs = [(p, _pair_shape(k, dim, b - a)) for p, a, b in plan.recv]
    return _Pending(group, sends, recvs, k)


class _Halo(torch.autograd.Function):
    """``(k, v, through)``, the exchange of ``k, v`` started -> ``(k, v)`` of the left halo and
    of the right halo (empty when there is none), and ``through`` as it is.  Backward: the
    halos' gradients go back to their owners, and what arrives for this rank's sent keys is
    its K/V gradient from here.  ``through`` (what the rank computed without the halo) makes
    the node part of every rank's output, so that every rank runs the backward exchange, also
    one whose queries see no halo but whose keys others saw."""

    @staticmethod
    def forward(ctx, k, v, through, plan: HaloPlan, group, dim: int, pending: _Pending):
        ctx.plan, ctx.group, ctx.dim, ctx.shape = plan, group, dim, k.shape
        got = pending.wait()
        halos = []
        for right, n in ((False, plan.left), (True, plan.right)):
            parts = [g for g, (p, _, _) in zip(got, plan.recv) if (p > plan.rank) == right]
            pair = torch.cat(parts, dim + 1) if parts else k.new_empty(_pair_shape(k, dim, n))
            halos += [pair[0], pair[1]]
        return (*halos, through)

    @staticmethod
    def backward(ctx, dk_left, dv_left, dk_right, dv_right, d_through):
        plan, dim = ctx.plan, ctx.dim
        # the forward's receives are the backward's sends, and the other way round
        sends = []
        for p, a, b in plan.recv:
            dk, dv, first = (dk_right, dv_right, plan.stop) if p > plan.rank else (dk_left, dv_left, plan.lo)
            sends.append((p, torch.stack([dk.narrow(dim, a - first, b - a), dv.narrow(dim, a - first, b - a)])))
        recvs = [(p, _pair_shape(dk_left, dim, b - a)) for p, a, b in plan.send]
        got = _Pending(ctx.group, sends, recvs, dk_left).wait()
        if not plan.send:
            return None, None, d_through, None, None, None, None
        dk, dv = (dk_left.new_zeros(ctx.shape) for _ in range(2))
        for g, (_, a, b) in zip(got, plan.send):
            dk.narrow(dim, a - plan.start, b - a).add_(g[0])
            dv.narrow(dim, a - plan.start, b - a).add_(g[1])
        return dk, dv, d_through, None, None, None, None


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

    On CUDA a causal window runs attngen's ``chunked`` kernel for the variant (twice: the
    queries that need no halo while it is in flight, then the first ``W - 1``); on any other
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
    pending = _start_halo(k, v, plan, group, s)
    if not mask.causal:         # (CPU) one pass over [left halo | local | right halo]
        left_k, left_v, right_k, right_v, local_k = _Halo.apply(k, v, k, plan, group, s, pending)
        return reference.attention(q, torch.cat([left_k, local_k, right_k], s), torch.cat([left_v, v, right_v], s),
                                   mask, scale=scale, layout=layout, q_offset=plan.left, softcap=softcap,
                                   sinks=sinks, dtype=q.dtype)
    run = _chunked(mask, q, k, s, h, layout, scale, softcap, sinks)
    # Only the first W - 1 queries (all of a shorter chunk) see the left halo.  The others
    # need only local keys: they run while the halo is in flight, on views (no copies).
    n = min(mask.left, q.shape[s]) if plan.left else 0
    tail = run(q.narrow(s, n, q.shape[s] - n), k, v)
    left_k, left_v, _, _, tail = _Halo.apply(k, v, tail, plan, group, s, pending)
    head = run(q.narrow(s, 0, n), torch.cat([left_k, k.narrow(s, 0, n)], s),
               torch.cat([left_v, v.narrow(s, 0, n)], s))
    return torch.cat([head, tail], s)


def _chunked(mask: Mask, q, k, s: int, h: int, layout: str, scale, softcap, sinks):
    """``run(q, k, v)``: attention of queries that are the last of the keys given — attngen's
    chunked kernel on CUDA, :func:`attngen.reference.attention` (in ``q.dtype``) elsewhere."""
    if q.device.type == "cuda":
        from .registry import get_kernel
        kernel = get_kernel(mask, gqa=q.shape[h] // k.shape[h], softcap=softcap,
                            sinks=sinks is not None, chunked=True)
        extra = {} if sinks is None else {"sinks": sinks}
        return lambda qq, kk, vv: kernel(qq, kk, vv, scale=scale, layout=layout, **extra)
    return lambda qq, kk, vv: reference.attention(
        qq, kk, vv, mask, scale=scale, layout=layout, q_offset=kk.shape[s] - qq.shape[s],
        softcap=softcap, sinks=sinks, dtype=q.dtype)


def _dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype`` that is the same in every process (for the consistency check)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(str(dtype))) % (1 << 62)
