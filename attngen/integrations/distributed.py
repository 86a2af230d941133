"""Context-parallel sliding-window attention over ``torch.distributed``: a halo exchange.

The sequence is split into contiguous chunks, one per rank of a process group, in group-rank
order (rank ``p`` owns positions ``start_p .. stop_p - 1``; the chunks may differ in length).
A query sees only the keys of its window, so a rank needs only the keys just before its chunk
(``left`` of them: ``W - 1`` for a causal window of ``W``) and, for a bidirectional local
window, the ``right`` keys just after it: its *halo*.  Every rank derives from the chunk
lengths (one ``all_gather``) which keys it receives from whom and which of its own keys it
sends to whom (:func:`halo_plan`), so sends and receives match without further messages
(``lengths=`` given, not even that one).  One ``batch_isend_irecv`` moves K and V.  While
the halo is in flight, every local query attends to the local keys: one launch of the
layer's own kernel on the tensors as given (no copies).  Then the first ``L`` queries
attend to the left halo alone and, bidirectional, the last ``R`` to the right halo, each
part a launch of a ``chunked`` kernel (queries the last of its keys) with the window
shifted to where the part's keys lie; each part is merged into its rows' output through
the log-sum-exp.  The backward runs each part's backward kernels with the merged output and
log-sum-exp (which gives each part's share of the gradients), the halo parts first, so the
halo keys' dK/dV leave for their owners while the local part's backward runs; what comes
back is added last.  The gradients are those of attention over the whole sequence in one
process.  See ``docs/distributed.md`` for the data moved, the cost model and the limits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.mask import Mask
from ..core.reference import logits, resolve_scale, with_sink_column
from ..core.support import LOG2E, at_least_fp32, bhsd, check_layout, seq_axis
from ..runtime.ops import sink_grad

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


def _shape_at(t: torch.Tensor, dim: int, n: int) -> tuple[int, ...]:
    """``t``'s shape, ``n`` positions long along ``dim``."""
    return (*t.shape[:dim], n, *t.shape[dim + 1:])


def _pair_shape(t: torch.Tensor, dim: int, n: int) -> tuple[int, ...]:
    """The shape of K and V stacked, ``n`` positions long along ``dim``."""
    return (2, *_shape_at(t, dim, n))


def _start_halo(k, v, plan: HaloPlan, group, dim: int) -> _Pending:
    """Send this rank's keys that others see and start receiving its halo (K and V stacked:
    one message per peer and direction)."""
    sends = [(p, torch.stack([k.narrow(dim, a - plan.start, b - a), v.narrow(dim, a - plan.start, b - a)]))
             for p, a, b in plan.send]
    recvs = [(p, _pair_shape(k, dim, b - a)) for p, a, b in plan.recv]
    return _Pending(group, sends, recvs, k)


def _received_halos(got, plan: HaloPlan, like: torch.Tensor, dim: int):
    """The received K/V pairs joined into the left and the right halo (each stacked K and V,
    empty when there is none)."""
    halos = []
    for right, n in ((False, plan.left), (True, plan.right)):
        parts = [g for g, (p, _, _) in zip(got, plan.recv) if (p > plan.rank) == right]
        halos.append(torch.cat(parts, dim + 1) if parts else like.new_empty(_pair_shape(like, dim, n)))
    return halos


@dataclass
class _Job:
    """One call's fixed parts: the exchange, the kernels' runner, the layout."""

    plan: HaloPlan
    mask: Mask
    group: object
    layout: str
    run: object             # _KernelRunner or _ReferenceRunner
    sinks: bool             # whether the layer has sinks (only the local part runs them)


@dataclass
class _HaloPart:
    """Local query rows ``rows`` over the halo keys at global positions ``[first, stop)``."""

    right: bool             # the right halo (else the left)
    rows: tuple[int, int]
    first: int
    stop: int
    mask: Mask              # the window as the chunked launch sees it (_shifted)
    k: torch.Tensor | None = None       # views of its halo keys and values
    v: torch.Tensor | None = None
    out: torch.Tensor | None = None     # its output and log-sum-exp, for the sinks' gradient
    lse: torch.Tensor | None = None


class _ContextParallel(torch.autograd.Function):
    """One rank's attention over the whole sequence: the exchange, the parts, their merge and
    their backward.

    Forward: start the halo exchange; every local query attends to the local keys (one
    launch, on the tensors as given) while the halo is in flight; then the queries that see
    the halo attend to the halo keys alone, and each such part is merged into the rows'
    output through the log-sum-exp.  Backward: each part's backward kernels run with the
    merged output and log-sum-exp, which gives each part's share of the gradients; the halo
    parts first, so that their keys' dK/dV leave for their owners at once, then the local
    part while they travel; the dK/dV returned for this rank's keys are added last."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, job: _Job):
        plan, s = job.plan, seq_axis(job.layout)
        pending = _start_halo(k, v, plan, job.group, s)
        out, lse, res = job.run.forward(q, k, v, job.mask, job.sinks)
        parts = _halo_parts(job.mask, plan)
        if parts:
            halos = _received_halos(pending.wait(), plan, k, s)
            o4, r4 = bhsd(out, job.layout), res if res.numel() else None
            for part in parts:
                pair, at = (halos[1], plan.stop) if part.right else (halos[0], plan.lo)
                part.k, part.v = (t.narrow(s, part.first - at, part.stop - part.first) for t in pair)
                oh, lh, _ = job.run.forward(_rows(q, s, part.rows), part.k, part.v, part.mask, False)
                part.out, part.lse = oh, lh
                rows = part.rows
                o, l = _rows(o4, 2, rows), _rows(lse, 2, rows)
                merged = torch.logaddexp2(l, lh)
                exact = at_least_fp32(o) if r4 is None else at_least_fp32(o) + at_least_fp32(_rows(r4, 2, rows))
                exact = (exact * torch.exp2(l - merged)[..., None]
                         + at_least_fp32(bhsd(oh, job.layout)) * torch.exp2(lh - merged)[..., None])
                o.copy_(exact)
                if r4 is not None:      # what rounding the merged output lost (see the kernels)
                    _rows(r4, 2, rows).copy_(exact - at_least_fp32(o))
                l.copy_(merged)
        else:
            pending.wait()
        ctx.job, ctx.parts = job, parts
        ctx.save_for_backward(q, k, v, sinks, out, lse, res)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse, res = ctx.saved_tensors
        job, parts = ctx.job, ctx.parts
        plan, s = job.plan, seq_axis(job.layout)
        halo_grads, dq_parts, dsinks_parts = {}, [], []
        for part in parts:          # the halo parts first: their keys' gradients leave early
            rows = part.rows
            gq, gk, gv, _ = job.run.backward(_rows(q, s, rows), part.k, part.v, _rows(out, s, rows),
                                             _rows(lse, 2, rows), q.new_empty(0), _rows(dout, s, rows),
                                             part.mask, False)
            dq_parts.append((rows, gq))
            at, end = (plan.stop, plan.hi) if part.right else (plan.lo, plan.start)
            acc = halo_grads.setdefault(part.right, [g.new_zeros(_shape_at(k, s, end - at)) for g in (gk, gv)])
            for a_, g in zip(acc, (gk, gv)):
                a_.narrow(s, part.first - at, part.stop - part.first).add_(g)
            if job.sinks:
                dsinks_parts.append(_halo_sink_grad(sinks, part, _rows(lse, 2, rows),
                                                    _rows(dout, s, rows), job.layout))
        pending = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:      # the same on every rank
            sends = []
            for p, a, b in plan.recv:
                right = p > plan.rank
                at = plan.stop if right else plan.lo
                sends.append((p, torch.stack([g.narrow(s, a - at, b - a) for g in halo_grads[right]])))
            pending = _Pending(job.group, sends, [(p, _pair_shape(k, s, b - a)) for p, a, b in plan.send], k)
        dq, dk, dv, dsinks = job.run.backward(q, k, v, out, lse, res, dout, job.mask, job.sinks)
        for rows, gq in dq_parts:
            _rows(dq, s, rows).add_(gq)
        for extra in dsinks_parts:
            dsinks = dsinks + extra
        if pending is not None:
            for g, (_, a, b) in zip(pending.wait(), plan.send):
                dk.narrow(s, a - plan.start, b - a).add_(g[0])
                dv.narrow(s, a - plan.start, b - a).add_(g[1])
        return dq, dk, dv, dsinks, None


def _rows(t: torch.Tensor, dim: int, rows) -> torch.Tensor:
    return t.narrow(dim, rows[0], rows[1] - rows[0])


def _halo_parts(mask: Mask, plan: HaloPlan) -> list[_HaloPart]:
    """The launches that attend this rank's queries to its halo keys.  The first ``L`` local
    queries see the left halo and the last ``R`` the right one.  A chunked launch needs
    S_q <= S_k, so where a halo is shorter than the queries that see it (a chunk near the
    sequence's start or end) the queries go in several launches, each over the halo keys its
    queries see."""
    parts, n = [], plan.stop - plan.start
    if plan.left:
        qa, end = plan.start, plan.start + min(mask.left, n)
        while qa < end:
            first = max(plan.lo, qa - mask.left)
            if first >= plan.start:
                break
            qb = min(end, qa + plan.start - first)
            parts.append(_HaloPart(False, (qa - plan.start, qb - plan.start), first, plan.start,
                                   _shifted(mask, plan.start - qb)))
            qa = qb
    if plan.right:
        qb, begin = plan.stop, plan.stop - min(mask.right, n)
        while qb > begin:
            stop = min(plan.hi, qb + mask.right)
            if stop <= plan.stop:
                break
            qa = max(begin, qb - (stop - plan.stop))
            parts.append(_HaloPart(True, (qa - plan.start, qb - plan.start), plan.stop, stop,
                                   _shifted(mask, stop - qb)))
            qb = qa
    return parts


def _halo_sink_grad(sinks, part: _HaloPart, lse, dout, layout: str):
    """The halo keys' share of the sinks' gradient for ``part``'s rows: -p_sink times the
    sum over the halo keys of P dP, which is rowsum(dO * the part's output) rescaled from the
    part's normalisation to the row's (the local part's kernels add the local keys' share)."""
    share = (at_least_fp32(bhsd(dout, layout)) * at_least_fp32(bhsd(part.out, layout))).sum(-1)
    return sink_grad(sinks, lse, share * torch.exp2(part.lse - lse), head_axis=1)


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
    s = seq_axis(layout)
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


def attention(q, k, v, *, window, causal: bool = True, group=None, layout: str = "bhsd",
              scale: float | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None, lengths=None) -> torch.Tensor:
    """This rank's output of sliding-window attention over the whole sequence.

    ``q, k, v`` are this rank's contiguous chunk, ``(B, H, S_local, D)`` / ``(B, HKV,
    S_local, D)`` (``layout="bshd"``: ``(B, S_local, H, D)``); the chunks of the group's ranks,
    in group-rank order, make the sequence, and may differ in length.  ``window`` and
    ``causal`` are :func:`attngen.get_kernel`'s (a causal ``W``, or ``{"left": L, "right": R}``
    with ``causal=False``); ``window=None`` (full attention) raises
    ``ValueError``.  GQA is ``H // HKV``.  ``scale``, ``softcap`` and ``sinks`` (one logit per
    query head) are as in the kernels.  Every rank of ``group`` must call this together, with
    the same window, scale, softcap and sinks, and, when K or V needs a gradient, must run the
    backward too: it is a collective.  The sinks' gradient is this rank's share; sum it over
    the ranks (as for any replicated parameter) to get the single-process one.

    ``lengths``, the chunk length of every rank of the group in group-rank order, spares the
    call its one ``all_gather`` and the host's wait for its result (capture in a CUDA graph
    was not tried); without it the ranks gather their lengths and check that they agree on
    the window, the shapes, the dtype and whether K/V need gradients.  Given, nothing but
    this rank's own length is checked.

    On CUDA it runs attngen's ``chunked`` kernels of the variant; on any other device
    :func:`attngen.core.reference.attention` computes in ``q.dtype``, with autograd.
    """
    mask = _mask(window, causal)
    check_layout(layout)
    _check_inputs(q, k, v, layout, sinks)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attngen.distributed.attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    s = seq_axis(layout)
    h = 3 - s
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if lengths is None:
        needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        lengths = _gathered_lengths(q, k, mask, needs_grad, s, h, group, size)
    else:
        lengths = [int(n) for n in lengths]
        if len(lengths) != size or lengths[rank] != k.shape[s]:
            raise ValueError(f"lengths must give the chunk length of each of the group's {size} "
                             f"ranks, this rank's ({rank}) being {k.shape[s]}; got {lengths}")
    plan = halo_plan(lengths, rank, mask)
    job = _Job(plan, mask, group, layout, _runner(q, k, h, layout, scale, softcap, sinks), sinks is not None)
    return _ContextParallel.apply(q, k, v, sinks, job)


def _shifted(mask: Mask, shift: int) -> Mask:
    """The window as a chunked launch sees it when its last key lies ``shift`` positions past
    its last query (negative: before it).  The kernels put query ``t`` of ``S_q`` at key
    position ``S_k - S_q + t``, ``shift`` past its true position; there the query sees
    ``left + shift`` keys back and ``right - shift`` ahead (a causal window's right is 0;
    the parts never ask for a key past the query, so ``shift < 0`` keeps it causal)."""
    if shift == 0:
        return mask
    return Mask(False, mask.left + shift, (mask.right or 0) - shift)


def _gathered_lengths(q, k, mask: Mask, needs_grad: bool, s: int, h: int, group,
                      size: int) -> list[int]:
    """Every rank's chunk length, from one ``all_gather`` that also checks that the ranks
    agree on what must be the same."""
    right = -1 if mask.right is None else mask.right
    mine = [k.shape[s], q.shape[0], q.shape[h], k.shape[h], q.shape[3], int(mask.causal),
            mask.left, right, int(needs_grad), _dtype_code(q.dtype)]
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
    return [r[0] for r in rows]


def _runner(q, k, h: int, layout: str, scale, softcap, sinks):
    """How one part runs: attngen's kernels on CUDA, their float64-capable emulation elsewhere."""
    gqa = q.shape[h] // k.shape[h]
    if q.device.type == "cuda":
        return _KernelRunner(gqa, layout, scale, softcap, sinks)
    return _ReferenceRunner(gqa, layout, scale, softcap, sinks)


@functools.lru_cache(maxsize=None)
def _variant_key(mask: Mask, gqa: int, softcap, sinks: bool, chunked: bool) -> str:
    """The ``attngen::`` ops' variant key of a part's kernel, looked up once per kind of part
    (not on every launch of every layer)."""
    from ..runtime.registry import get_kernel
    return get_kernel(mask, gqa=gqa, softcap=softcap, sinks=sinks, chunked=chunked).key


class _KernelRunner:
    """A part is one launch of a generated kernel through attngen's training ops (queries
    the last of the keys: the ``chunked`` variant where there are fewer queries than keys):
    ``forward`` -> (out, log-sum-exp, rounding residual), ``backward`` -> (dq, dk, dv, dsinks)
    given the (merged) output and log-sum-exp."""

    def __init__(self, gqa: int, layout: str, scale, softcap, sinks):
        self.gqa, self.layout, self.scale, self.softcap, self.sinks = gqa, layout, scale, softcap, sinks
        self.s = seq_axis(layout)

    def _args(self, mask: Mask, q, k, v, sinks: bool):
        key = _variant_key(mask, self.gqa, self.softcap, sinks, k.shape[self.s] != q.shape[self.s])
        return key, q, k, v, (self.sinks if sinks else None)

    def forward(self, q, k, v, mask: Mask, sinks: bool):
        return torch.ops.attngen.attention_fwd(*self._args(mask, q, k, v, sinks), None, None, None, None,
                                               self.scale, self.layout)

    def backward(self, q, k, v, out, lse, res, dout, mask: Mask, sinks: bool):
        key, q, k, v, sink = self._args(mask, q, k, v, sinks)
        dq, dk, dv, dsinks = torch.ops.attngen.attention_bwd(key, q, k, v, out, lse, res, dout, sink,
                                                             None, None, None, None, self.scale, self.layout,
                                                             torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, dsinks if sinks else None


class _ReferenceRunner:
    """The kernels' interface computed by PyTorch in ``q.dtype`` (float64 in the CPU tests),
    by the same formulas: the forward returns the output and the log-sum-exp (log2 units,
    sinks included), the backward recomputes P from them (P = 2^(S log2 e - lse)), and
    dS = P (dP - delta) with delta = rowsum(dO * O).  Dense scores per part: for checking
    the exchange, the parts and their merge, not for speed."""

    def __init__(self, gqa: int, layout: str, scale, softcap, sinks):
        self.gqa, self.layout, self.scale, self.softcap, self.sinks = gqa, layout, scale, softcap, sinks

    def _scores(self, q, k, mask: Mask):
        """The capped, masked logits (:func:`attngen.core.reference.logits`), and the scale."""
        q4, k4 = bhsd(q, self.layout), bhsd(k, self.layout).repeat_interleave(self.gqa, dim=1)
        scale = resolve_scale(self.scale, q4.shape[-1])
        rows = (k4.shape[2] - q4.shape[2]) + torch.arange(q4.shape[2], device=q4.device)[:, None]
        visible = mask.visible(rows, torch.arange(k4.shape[2], device=q4.device)[None, :])
        return logits(q4 @ k4.transpose(-1, -2) * scale, visible, self.softcap), scale

    def forward(self, q, k, v, mask: Mask, sinks: bool):
        z, _ = self._scores(q, k, mask)
        sink = (self.sinks.to(z.dtype) * LOG2E).reshape(1, -1, 1, 1) if sinks else None
        s2 = with_sink_column(z * LOG2E, sink)     # log2 units, as the kernels compute
        lse = torch.logsumexp(s2 * math.log(2), -1) * LOG2E
        p = torch.exp2(s2 - lse[..., None])[..., :bhsd(k, self.layout).shape[2]]
        out = p @ bhsd(v, self.layout).repeat_interleave(self.gqa, dim=1)
        return bhsd(out.to(q.dtype), self.layout), lse, q.new_empty(0)

    def backward(self, q, k, v, out, lse, res, dout, mask: Mask, sinks: bool):
        z, scale = self._scores(q, k, mask)
        q4, k4, v4 = (bhsd(x, self.layout) for x in (q, k, v))
        do4, o4 = bhsd(dout, self.layout), bhsd(out, self.layout)
        p = torch.exp2(z * LOG2E - lse[..., None])
        dp = do4 @ v4.repeat_interleave(self.gqa, dim=1).transpose(-1, -2)
        ds = p * (dp - (do4 * o4).sum(-1, keepdim=True))
        if self.softcap is not None:    # through the cap: d(cap tanh(x / cap)) = 1 - (capped / cap)^2
            t = torch.where(z.isfinite(), z / self.softcap, 0.0)
            ds = ds * (1 - t * t)
        dq = ds @ k4.repeat_interleave(self.gqa, dim=1) * scale

        def per_kv_head(x):     # the query heads of a GQA group summed onto their KV head
            return x.reshape(x.shape[0], x.shape[1] // self.gqa, self.gqa, *x.shape[2:]).sum(2)
        dk = per_kv_head(ds.transpose(-1, -2) @ q4) * scale
        dv = per_kv_head(p.transpose(-1, -2) @ do4)
        grads = [bhsd(g.to(q.dtype), self.layout) for g in (dq, dk, dv)]
        dsinks = sink_grad(self.sinks, lse, (p * dp).sum(-1), head_axis=1) if sinks else None
        return (*grads, dsinks)


def _dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype`` that is the same in every process (for the consistency check)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(str(dtype))) % (1 << 62)
