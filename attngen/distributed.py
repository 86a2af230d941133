"""Context-parallel sliding-window attention over ``torch.distributed``: a halo exchange.

The sequence is split into contiguous chunks, one per rank of a process group, in group-rank
order (rank ``p`` owns positions ``start_p .. stop_p - 1``; the chunks may differ in length).
A query sees only the keys of its window, so a rank needs only the keys just before its chunk
(``left`` of them: ``W - 1`` for a causal window of ``W``) and, for a bidirectional local
window, the ``right`` keys just after it: its *halo*.  Every rank derives from the chunk
lengths (one ``all_gather``) which keys it receives from whom and which of its own keys it
sends to whom (:func:`halo_plan`), so sends and receives match without further messages
(``lengths=`` given, not even that one).  One ``batch_isend_irecv`` moves K and V.  The
queries that see no halo key (all but the first ``L`` and, bidirectional, the last ``R``) run
over the local keys while the halo is in flight; then the edge queries run over ``[left halo
| their local keys]`` and ``[their local keys | right halo]``.  Every piece is one launch of
the variant's ``chunked`` kernel, whose queries are the last of its keys: a bidirectional
piece, whose last ``r`` keys follow its last query, runs the window shifted by ``r``
(``left + r`` back, ``right - r`` ahead).  Only the halo and the ``L`` (``R``) local keys
joined to it are copied.  The backward sends the halo's dK/dV back to the ranks that own
those keys without waiting, runs the local part's backward while they travel, and adds what
it received into its own at the end: the gradients are those of attention over the whole
sequence in one process.  See ``docs/distributed.md`` for the data moved, the cost model
and the limits.
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
    """One call's fixed parts: the exchange, the pieces' runner, the layout."""

    plan: HaloPlan
    mask: Mask
    group: object
    dim: int                # the sequence axis
    run: object             # _KernelPieces or _ReferencePieces
    train: bool             # whether autograd records the call (the pieces keep their LSE)


@dataclass
class _Piece:
    rows: tuple[int, int]   # local query rows [a, b)
    first: int              # global positions [first, stop) of its keys
    stop: int
    mask: Mask              # the (shifted) mask its chunked launch runs
    k: torch.Tensor | None = None   # its keys and values when they include a halo (else: local)
    v: torch.Tensor | None = None
    saved: object = None    # what its forward keeps for the backward (the log-sum-exp, ...)


class _ContextParallel(torch.autograd.Function):
    """One rank's attention over the whole sequence: exchange, pieces, and their backward.

    Forward: start the halo exchange; run the middle piece (the queries that see only local
    keys, on views) while it is in flight; then the edge pieces over keys joined to the halo.
    Backward: the edges first, whose halo-key gradients go back to their owners at once
    (without waiting); the middle while they travel; then the gradients returned for this
    rank's keys are added.  dQ, dK and dV are assembled here, once (no zero-filled full-size
    gradient per piece)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, job: _Job):
        plan, mask, s = job.plan, job.mask, job.dim
        pending = _start_halo(k, v, plan, job.group, s)
        middle, edges = _split(mask, plan)
        pieces, outs = [], {}
        if middle[1] > middle[0]:       # its keys are exactly the local chunk
            first, stop, shift = _key_span(mask, plan, middle)    # (plan.start, plan.stop, ...)
            piece = _Piece(middle, first, stop, _shifted(mask, shift))
            outs[middle], piece.saved = job.run.forward(_rows(q, s, middle), k, v, piece.mask, job.train)
            pieces.append(piece)
        left, right = _received_halos(pending.wait(), plan, k, s)
        for rows in edges:
            first, stop, shift = _key_span(mask, plan, rows)
            parts = []
            for pair, at, end in ((left, plan.lo, plan.start), (None, plan.start, plan.stop),
                                  (right, plan.stop, plan.hi)):
                a, b = max(first, at), min(stop, end)
                if a < b:
                    parts.append(pair.narrow(s + 1, a - at, b - a) if pair is not None else
                                 torch.stack([k.narrow(s, a - at, b - a), v.narrow(s, a - at, b - a)]))
            pair = torch.cat(parts, s + 1)
            piece = _Piece(rows, first, stop, _shifted(mask, shift), pair[0], pair[1])
            outs[rows], piece.saved = job.run.forward(_rows(q, s, rows), piece.k, piece.v, piece.mask,
                                                      job.train)
            pieces.append(piece)
        ordered = [outs[r] for r in sorted(outs)]
        out = ordered[0] if len(ordered) == 1 else torch.cat(ordered, s) if ordered else torch.empty_like(q)
        ctx.job, ctx.pieces = job, pieces
        ctx.save_for_backward(q, k, v, sinks, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out = ctx.saved_tensors
        job, pieces = ctx.job, ctx.pieces
        plan, s = job.plan, job.dim
        dq = torch.empty_like(q) if len(pieces) != 1 else None
        dsinks = None

        def run(piece):
            """The piece's backward: its dQ rows go into dq; returns its keys' (dK, dV)."""
            nonlocal dq, dsinks
            kk, vv = (k, v) if piece.k is None else (piece.k, piece.v)
            gq, gk, gv, gs = job.run.backward(_rows(q, s, piece.rows), kk, vv, _rows(out, s, piece.rows),
                                              piece.saved, _rows(dout, s, piece.rows), piece.mask)
            if dq is None:
                dq = gq
            else:
                _rows(dq, s, piece.rows).copy_(gq)
            if gs is not None:
                dsinks = gs if dsinks is None else dsinks + gs
            return gk, gv

        # The edges first: their halo keys' gradients leave while the middle runs.
        halos = {}                  # False / True: (dK, dV) of the left / right halo
        local = []                  # ((a, b), dK, dV) of local keys an edge saw
        for piece in (p for p in pieces if p.k is not None):
            grads = run(piece)
            for right, at, end in ((False, plan.lo, plan.start), (True, plan.stop, plan.hi)):
                a, b = max(piece.first, at), min(piece.stop, end)
                if a < b:
                    halo = halos.setdefault(right, [g.new_zeros(_pair_shape(k, s, end - at)[1:]) for g in grads])
                    for h, g in zip(halo, grads):
                        h.narrow(s, a - at, b - a).add_(g.narrow(s, a - piece.first, b - a))
            a, b = max(piece.first, plan.start), min(piece.stop, plan.stop)
            if a < b:
                local.append(((a, b), *(g.narrow(s, a - piece.first, b - a) for g in grads)))
        pending = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:      # the same on every rank
            sends = []
            for p, a, b in plan.recv:
                right = p > plan.rank
                at = plan.stop if right else plan.lo
                sends.append((p, torch.stack([g.narrow(s, a - at, b - a) for g in halos[right]])))
            pending = _Pending(job.group, sends, [(p, _pair_shape(k, s, b - a)) for p, a, b in plan.send], k)
        # The middle piece's keys are this rank's: its dK, dV are the start of the rank's own.
        middle = [p for p in pieces if p.k is None]
        dk, dv = run(middle[0]) if middle else (torch.zeros_like(k), torch.zeros_like(v))
        returned = [((a, b), g[0], g[1]) for g, (_, a, b) in zip(pending.wait(), plan.send)] if pending else []
        for (a, b), gk, gv in local + returned:
            dk.narrow(s, a - plan.start, b - a).add_(gk)
            dv.narrow(s, a - plan.start, b - a).add_(gv)
        if dq is None:
            dq = torch.zeros_like(q)      # no query on this rank
        return dq, dk, dv, dsinks, None


def _rows(t: torch.Tensor, dim: int, rows) -> torch.Tensor:
    return t.narrow(dim, rows[0], rows[1] - rows[0])


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
    :func:`attngen.reference.attention` computes in ``q.dtype``, with autograd.
    """
    mask = _mask(window, causal)
    check_layout(layout)
    _check_inputs(q, k, v, layout, sinks)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attngen.distributed.attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    s, h = (2, 1) if layout == "bhsd" else (1, 2)
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
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    job = _Job(plan, mask, group, s, _pieces(q, k, h, layout, scale, softcap, sinks), train)
    return _ContextParallel.apply(q, k, v, sinks, job)


def _split(mask: Mask, plan: HaloPlan):
    """This rank's queries (local rows ``[a, b)``) as the middle that sees only local keys,
    and the edges that see the left or the right halo (one edge when both halos reach the
    same queries)."""
    n = plan.stop - plan.start
    a = min(mask.left, n) if plan.left else 0
    b = max(n - (mask.right or 0), 0) if plan.right else n
    if a >= b:                      # every query sees a halo
        return (0, 0), [(0, n)] if n else []
    return (a, b), [e for e in ((0, a), (b, n)) if e[1] > e[0]]


def _key_span(mask: Mask, plan: HaloPlan, rows):
    """The global positions ``[first, stop)`` of the keys local query rows ``rows`` see, and
    how far the last key lies past the last query (``stop - 1`` minus its position)."""
    first = max(plan.lo, plan.start + rows[0] - mask.left)
    stop = min(plan.hi, plan.start + rows[1] + (mask.right or 0))
    return first, stop, stop - (plan.start + rows[1])


def _shifted(mask: Mask, shift: int) -> Mask:
    """The mask of a chunked launch whose queries are the last of its keys but ``shift``: the
    kernels put query ``t`` of ``S_q`` at key position ``S_k - S_q + t``, which is ``shift``
    past its true position when ``shift`` keys follow the last query (a bidirectional
    window's right reach, cut at the sequence end).  In the kernel's positions the query
    sees ``left + shift`` keys back and ``right - shift`` ahead."""
    if mask.causal:
        return mask                 # keys never follow a causal query: shift is 0
    return Mask(False, mask.left + shift, mask.right - shift)


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


def _pieces(q, k, h: int, layout: str, scale, softcap, sinks):
    """How a piece runs: attngen's chunked kernels on CUDA, the reference elsewhere."""
    if q.device.type == "cuda":
        return _KernelPieces(q.shape[h] // k.shape[h], layout, scale, softcap, sinks)
    return _ReferencePieces(layout, scale, softcap, sinks)


class _KernelPieces:
    """A piece is one launch of the variant's ``chunked`` kernel (queries the last of the
    keys), through attngen's training ops: ``forward`` -> (out, saved), ``backward`` -> (dq,
    dk, dv, dsinks)."""

    def __init__(self, gqa: int, layout: str, scale, softcap, sinks):
        self.gqa, self.layout, self.scale, self.softcap, self.sinks = gqa, layout, scale, softcap, sinks

    def _key(self, mask: Mask) -> str:
        from .registry import get_kernel
        return get_kernel(mask, gqa=self.gqa, softcap=self.softcap, sinks=self.sinks is not None,
                          chunked=True).key

    def forward(self, q, k, v, mask, train: bool):
        """(out, what the backward needs: the LSE and the rounding residual); the inference
        kernel, saving nothing, when nothing needs a gradient."""
        args = (self._key(mask), q, k, v, self.sinks, None, None, None, None, self.scale, self.layout)
        if train:
            out, lse, res = torch.ops.attngen.attention_fwd(*args)
            return out, (lse, res)
        return torch.ops.attngen.attention(*args), None

    def backward(self, q, k, v, out, saved, dout, mask):
        lse, res = saved
        dq, dk, dv, dsinks = torch.ops.attngen.attention_bwd(
            self._key(mask), q, k, v, out, lse, res, dout, self.sinks, None, None, None, None,
            self.scale, self.layout)
        return dq, dk, dv, dsinks if self.sinks is not None else None


class _ReferencePieces:
    """A piece is :func:`attngen.reference.attention` in ``q.dtype``, queries the last of the
    keys; its backward recomputes the piece under autograd."""

    def __init__(self, layout: str, scale, softcap, sinks):
        self.layout, self.scale, self.softcap, self.sinks = layout, scale, softcap, sinks

    def _run(self, q, k, v, sinks, mask):
        s = 2 if self.layout == "bhsd" else 1
        return reference.attention(q, k, v, mask, scale=self.scale, layout=self.layout,
                                   q_offset=k.shape[s] - q.shape[s], softcap=self.softcap,
                                   sinks=sinks, dtype=q.dtype)

    def forward(self, q, k, v, mask, train: bool):
        return self._run(q, k, v, self.sinks, mask), None

    def backward(self, q, k, v, out, saved, dout, mask):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            sinks = None if self.sinks is None else self.sinks.detach().requires_grad_()
            got = self._run(*leaves, sinks, mask)
            grads = torch.autograd.grad(got, leaves + ([sinks] if sinks is not None else []), dout)
        return (*grads[:3], grads[3] if sinks is not None else None)


def _dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype`` that is the same in every process (for the consistency check)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(str(dtype))) % (1 << 62)
