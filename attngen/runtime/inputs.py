"""Input checks shared by every generated launcher: it only validates and converts what the
caller passed (tensors, sinks, cu_seqlens, scale); it launches nothing."""

from __future__ import annotations

import torch

from ..core.reference import resolve_scale
from ..core.support import LOG2E, PAGE_ROWS, STRIDE_BYTES, bhsd, check_layout, check_positive_number


#: the device types the kernels run on (the CPU instead while attngen.emulator runs them there)
KERNEL_DEVICES = ("cuda",)


class InputError(ValueError):
    """Tensors a kernel cannot take; the message names the kernel and the problem."""


def wants_grad(*tensors) -> bool:
    """Whether autograd records this call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def autocast(*tensors):
    """The tensors as ``torch.autocast`` hands them to SDPA: inside an autocast region of the
    first tensor's device whose dtype the kernels take (fp16, bf16), every floating tensor of
    another dtype cast to it (autograd sees the cast); otherwise, and for None or integer
    tensors, as they are.  Mixed-precision training (fp32 weights under autocast) hands
    attention fp32 queries and keys: rotary embeddings promote them."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    if dtype not in (torch.float16, torch.bfloat16):
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                 else t for t in tensors)


def no_out_with_grad(out, name: str) -> None:
    if out is not None:
        raise InputError(f"{name}: out= cannot be used while autograd records the call (an input "
                         f"requires grad): the output must be a new tensor autograd owns; drop "
                         f"out=, or call under torch.no_grad()")


INT32_MAX = 2**31 - 1


def wide_index(*tensors: torch.Tensor) -> bool:
    """Whether the kernels need 64-bit indexing for these tensors: a shape, a stride or the
    offset of the last element past int32 (cuTile's default index type)."""
    for t in tensors:
        numel = t.numel()
        if numel == 0 or (numel <= INT32_MAX and t.is_contiguous()):
            continue    # nothing is launched over an empty tensor; a contiguous one's offsets < numel
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if last > INT32_MAX or max(t.stride(), default=0) > INT32_MAX or max(t.shape, default=0) > INT32_MAX:
            return True
    return False


def row_stats(shape, device) -> torch.Tensor:
    """A new fp32 array of per-row statistics (log-sum-exp, delta, a split's log-sum-exp)
    of ``shape``, its last axis padded in memory so that every other stride is a multiple of
    STRIDE_BYTES, as the built kernels assume (:func:`attngen.generate.aot.signature`): a view
    of the first ``shape[-1]`` of each padded row."""
    *lead, n = shape
    align = STRIDE_BYTES // 4
    if type(n) is int and n % align == 0:     # no padding (an int: a traced size always slices)
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty((*lead, (n + align - 1) // align * align), dtype=torch.float32, device=device)[..., :n]


GRID_YZ_MAX = 65535     # programs a CUDA grid's y or z axis holds


def launch_grid(tiles: int, pairs: int) -> tuple[int, int, int]:
    """The grid of a kernel over ``tiles`` tiles (axis x) of ``pairs`` (batch, head) pairs,
    the pairs folded over axes y and z (``y * z >= pairs``; a kernel skips the programs past
    the last pair), so that more than 65535 pairs (1100 sequences x 64 heads) fit."""
    z = max(1, -(-pairs // GRID_YZ_MAX))
    return tiles, -(-pairs // z), z


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale itself (default ``head_dim ** -0.5``: :func:`attngen.core.reference.resolve_scale`),
    checked, for the backward kernels."""
    try:
        return check_positive_number(resolve_scale(scale, head_dim), "scale")
    except ValueError as exc:
        raise InputError(str(exc)) from None


def grad_output(dout, out, name: str):
    """The output's gradient as the backward kernels read it: out's shape and dtype, a unit
    last stride."""
    if tuple(dout.shape) != tuple(out.shape) or dout.dtype != out.dtype:
        raise InputError(f"{name}: the output's gradient has shape {tuple(dout.shape)}, {dout.dtype}; "
                         f"the output is {tuple(out.shape)}, {out.dtype}")
    return dout if dout.stride(-1) == 1 else dout.contiguous()


def scale_arg(scale: float | None, head_dim: int, softcap: float | None = None) -> float:
    """The kernel's scale argument: softmax scale (default ``head_dim ** -0.5``) times
    log2(e) for ``exp2``, or divided by the softcap for kernels that cap their scores."""
    scale = softmax_scale(scale, head_dim)
    return scale / softcap if softcap is not None else scale * LOG2E


def prepare_sinks(sinks, heads: int, device, name: str) -> torch.Tensor:
    """One fp32 sink logit per query head, as the kernel reads them."""
    if not isinstance(sinks, torch.Tensor):
        raise InputError(f"{name}: this kernel needs sinks=, a tensor of {heads} logits (one per "
                         f"query head), got {type(sinks).__name__}")
    if tuple(sinks.shape) != (heads,):
        raise InputError(f"{name}: sinks must have shape ({heads},), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise InputError(f"{name}: sinks are on {sinks.device}, q on {device}")
    return sinks.to(torch.float32).contiguous()


def _check_tensors(tensors: dict, ndim: int, dims: str, dtype: torch.dtype, fail) -> None:
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            fail(f"{label} must be {ndim}-D ({dims}), got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            fail(f"{label} has dtype {t.dtype}; this kernel takes {dtype}")
        if t.stride(-1) != 1:
            fail(f"{label} must have a unit stride in its last (head) dimension, "
                 f"got strides {t.stride()}")


def _check_devices(tensors: dict, fail) -> None:
    for label, t in tensors.items():
        if t.device.type not in KERNEL_DEVICES:
            fail(f"{label} is on {t.device}; this kernel runs on CUDA tensors")
    if len({t.device for t in tensors.values()}) != 1:
        fail("q, k, v must be on one device, got " + ", ".join(str(t.device) for t in tensors.values()))


def _check_heads(heads: int, kv_heads: int, group: int, fail) -> None:
    if heads % group:
        fail(f"this kernel has {group} query heads per KV head; q has {heads} heads, "
             f"not a multiple of {group}")
    if kv_heads * group != heads:
        fail(f"this kernel has {group} query head(s) per KV head: q has {heads} heads, "
             f"so k and v need {heads // group}, got {kv_heads}")


def _output(out, q, dtype: torch.dtype, fail) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor):
        fail(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device:
        fail(f"out must match q: shape {tuple(q.shape)}, {dtype}, {q.device}; got "
             f"{tuple(out.shape)}, {out.dtype}, {out.device}")
    if out.stride(-1) != 1:
        fail(f"out must have a unit stride in its last dimension, got strides {out.stride()}")
    return out


def prepare(q, k, v, out, *, layout: str, head_dim: int, dtype: torch.dtype, group: int, name: str,
            chunked: bool = False, check: bool = True):
    """Validate ``q, k, v`` (and ``out``) and return (B, H, S, D) views of all four plus ``out``.

    Nothing is copied: a (B, S, H, D) tensor becomes a transposed view.  ``chunked``
    kernels take fewer queries than keys (the queries are the last ones).  ``check=False``
    trusts tensors a call validated before (a backward's, given its forward's own).
    """
    def fail(message):
        raise InputError(f"{name}: {message}")

    if not check:
        if out is None:
            out = _output(out, q, dtype, fail)
        return bhsd(q, layout), bhsd(k, layout), bhsd(v, layout), bhsd(out, layout), out
    try:
        check_layout(layout)
    except ValueError as exc:
        fail(str(exc))
    tensors = {"q": q, "k": k, "v": v}
    _check_tensors(tensors, 4, "B, H, S, D" if layout == "bhsd" else "B, S, H, D", dtype, fail)
    views = {label: bhsd(t, layout) for label, t in tensors.items()}
    q4, k4, v4 = views["q"], views["k"], views["v"]
    (batch, heads, seq, d), (kb, kv_heads, seq_k, kd) = q4.shape, k4.shape
    if tuple(k4.shape) != tuple(v4.shape):
        fail(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if d != head_dim or kd != head_dim:
        fail(f"head_dim must be {head_dim}, got q {d} and k {kd}")
    if kb != batch:
        fail(f"batch sizes differ: q {batch}, k {kb}")
    if chunked and seq_k < seq:
        fail(f"the queries are the last of the keys, so S_q <= S_k; got {seq} queries, {seq_k} keys")
    if not chunked and seq_k != seq:
        fail(f"prefill takes as many keys as queries, got {seq} queries and {seq_k} keys "
             f"(a variant with chunked: true takes queries after a cached prefix)")
    _check_heads(heads, kv_heads, group, fail)
    _check_devices(tensors, fail)
    out = _output(out, q, dtype, fail)
    return q4, k4, v4, bhsd(out, layout), out


def prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out, *,
                   head_dim: int, dtype: torch.dtype, group: int, name: str, chunked: bool,
                   need_longest_k: bool = False, check: bool = True):
    """Validate packed ``q (total_q, H, D)``, ``k, v (total_k, HKV, D)`` and their cu_seqlens.

    Returns int32 ``cu_q``, ``cu_k``, the longest sequence's queries and keys and ``out``.
    Without ``max_seqlen_q`` the offsets are read on the host once (to check them and size the
    grid); with it they are trusted and nothing synchronizes.  The longest keys are needed
    only when ``need_longest_k`` (the backward's grid): equal to the queries' unless
    ``chunked``, where they come from ``max_seqlen_k`` or, without it, from the host.
    ``check=False`` trusts tensors and offsets a call validated before (a backward's, given its
    forward's own); the longest sequences are still read on the host when not given.
    """
    def fail(message):
        raise InputError(f"{name}: {message}")

    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    if check:
        _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_dim=head_dim,
                      dtype=dtype, group=group, chunked=chunked, fail=fail)
    longest, longest_k = max_seqlen_q, max_seqlen_q if not chunked else max_seqlen_k
    if longest is None or (need_longest_k and longest_k is None):
        longest, longest_k = _read_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                           max_seqlen_q, chunked, fail)
    if check or out is None:
        out = _output(out, q, dtype, fail)
    return (cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k.to(torch.int32).contiguous(),
            longest, longest_k, out)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, head_dim: int,
                  dtype: torch.dtype, group: int, chunked: bool, fail) -> None:
    """What :func:`prepare_varlen` checks of its tensors, offsets and longest sequences."""
    tensors = {"q": q, "k": k, "v": v}
    _check_tensors(tensors, 3, "total_tokens, H, D", dtype, fail)
    if tuple(k.shape) != tuple(v.shape):
        fail(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != head_dim or k.shape[-1] != head_dim:
        fail(f"head_dim must be {head_dim}, got q {q.shape[-1]} and k {k.shape[-1]}")
    _check_heads(q.shape[1], k.shape[1], group, fail)
    _check_devices(tensors, fail)
    for label, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 \
                or cu.dtype not in (torch.int32, torch.int64):
            fail(f"{label} must be a 1-D int32 tensor of B+1 offsets, got {cu!r}")
        if cu.device != q.device:
            fail(f"{label} is on {cu.device}, q on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        fail(f"cu_seqlens_q and cu_seqlens_k describe {cu_seqlens_q.numel() - 1} and "
             f"{cu_seqlens_k.numel() - 1} sequences")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, fail)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, fail)
    if not chunked and max_seqlen_k is not None and max_seqlen_k != max_seqlen_q:
        fail(f"each sequence takes as many keys as queries, so max_seqlen_k ({max_seqlen_k}) must "
             f"equal max_seqlen_q ({max_seqlen_q})")


def _read_offsets(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q, chunked: bool,
                  fail) -> tuple[int, int]:
    """Check the offsets on the host (one synchronization); the longest queries and keys."""
    len_q = _lengths("cu_seqlens_q", cu_seqlens_q.tolist(), total_q, max_seqlen_q, fail)
    len_k = _lengths("cu_seqlens_k", cu_seqlens_k.tolist(), total_k, None, fail)
    if chunked and any(a > b for a, b in zip(len_q, len_k)):
        fail(f"each sequence's queries are the last of its keys (S_q <= S_k), got {len_q} and {len_k}")
    if not chunked and len_q != len_k:
        fail(f"each sequence takes as many keys as queries, got {len_q} and {len_k} "
             f"(a variant with chunked: true takes queries after a cached prefix)")
    return (max(len_q) if max_seqlen_q is None else max_seqlen_q), max(len_k)


def _check_max_seqlen(label: str, value, fail) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        fail(f"{label} must be a non-negative int, got {value!r}")


def _lengths(label: str, host: list[int], total: int, max_seqlen_q, fail) -> list[int]:
    """The sequence lengths of B + 1 offsets read on the host (``label``), checked to rise
    from 0 to ``total``, the packed length, and, for the queries' offsets, to fit a given
    ``max_seqlen_q``."""
    if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
        fail(f"{label} must rise from 0 to {total} (the packed length), got {host}")
    lengths = [b - a for a, b in zip(host, host[1:])]
    if max_seqlen_q is not None and max_seqlen_q < max(lengths):
        fail(f"max_seqlen_q is {max_seqlen_q} but a sequence has {max(lengths)} queries")
    return lengths


def prepare_paged(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, out, *,
                  head_dim: int, dtype: torch.dtype, group: int, name: str, check: bool | None = None):
    """Validate packed ``q (total_q, H, D)``, a paged cache ``k_cache, v_cache (pages, page,
    HKV, D)``, ``cu_seqlens_q`` (B + 1 offsets), ``seqused_k`` (B: sequence b's keys are its
    first ``seqused_k[b]`` cache positions) and ``block_table`` (B, max pages: position p of
    sequence b is slot ``p % page`` of page ``block_table[b, p // page]``).

    Returns int32 ``cu_q``, the longest sequence's queries, the caches as rows
    (pages * page, HKV, D) views, the page size, int32 ``seqused_k`` and ``block_table``, and
    ``out``.  Shapes, dtypes, devices and layouts are always checked (nothing synchronizes).
    The values -- offsets, lengths past the block table, pages outside the cache -- are read
    on the host (one synchronization) when ``check`` is true; None checks them unless a CUDA
    graph is being captured or torch.compile traces, where a host read cannot run: such
    callers vouch for them, and a page outside the cache is undefined behaviour.
    ``max_seqlen_q``, when given, is trusted; without it the offsets are read on the host.
    """
    def fail(message):
        raise InputError(f"{name}: {message}")

    _check_tensors({"q": q}, 3, "total_tokens, H, D", dtype, fail)
    _check_tensors({"k_cache": k_cache, "v_cache": v_cache}, 4, "pages, page_size, H_kv, D", dtype, fail)
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        fail(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    pages, page, kv_heads, kd = k_cache.shape
    if q.shape[-1] != head_dim or kd != head_dim:
        fail(f"head_dim must be {head_dim}, got q {q.shape[-1]} and the cache {kd}")
    if page == 0 or pages == 0:
        fail(f"the cache holds no key: shape {tuple(k_cache.shape)}")
    if page % PAGE_ROWS:
        fail(f"the page size must be a multiple of {PAGE_ROWS} keys, got {page} "
             f"(k_cache is (pages, page_size, H_kv, D): {tuple(k_cache.shape)})")
    _check_heads(q.shape[1], kv_heads, group, fail)
    _check_devices({"q": q, "k_cache": k_cache, "v_cache": v_cache}, fail)
    rows = []
    for label, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(0) != page * cache.stride(1):
            fail(f"{label}'s pages must follow each other in memory (stride(0) == page_size * "
                 f"stride(1), the layout (pages, page_size, H_kv, D)), got strides {cache.stride()}")
        rows.append(cache.as_strided((pages * page, kv_heads, kd), cache.stride()[1:]))
    tables = {"cu_seqlens_q": (cu_seqlens_q, 1), "seqused_k": (seqused_k, 1), "block_table": (block_table, 2)}
    for label, (t, ndim) in tables.items():
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != torch.int32:
            fail(f"{label} must be a {ndim}-D int32 tensor, got "
                 f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device:
            fail(f"{label} is on {t.device}, q on {q.device}")
    batch = cu_seqlens_q.numel() - 1
    if batch < 1 or seqused_k.numel() != batch or block_table.shape[0] != batch:
        fail(f"cu_seqlens_q ({cu_seqlens_q.numel()} offsets), seqused_k ({seqused_k.numel()}) and "
             f"block_table ({block_table.shape[0]} rows) must describe the same B >= 1 sequences")
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, fail)
    if check is None:
        check = not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling())
    if check or max_seqlen_q is None:
        longest = _read_paged(cu_seqlens_q, seqused_k, block_table, q.shape[0], pages, page,
                              max_seqlen_q, check, fail)
    else:
        longest = max_seqlen_q
    out = _output(out, q, dtype, fail)
    return (cu_seqlens_q.contiguous(), longest, rows[0], rows[1], page, seqused_k.contiguous(),
            block_table, out)


def _read_paged(cu_seqlens_q, seqused_k, block_table, total_q: int, pages: int, page: int,
                max_seqlen_q, check: bool, fail) -> int:
    """The longest sequence's queries, from the offsets read on the host; with ``check``, the
    lengths and the pages they use checked too, read with the offsets in one synchronization
    (a bad page's place is looked up only to name it)."""
    batch = seqused_k.numel()
    read = [cu_seqlens_q.to(torch.int64)]
    if check:
        need = torch.arange(block_table.shape[1], device=block_table.device) * page \
            < seqused_k.to(torch.int64)[:, None]
        outside = need & ((block_table < 0) | (block_table >= pages))
        read += [seqused_k.to(torch.int64), outside.any().reshape(1).to(torch.int64)]
    values = torch.cat(read).tolist()
    longest = max(_lengths("cu_seqlens_q", values[:batch + 1], total_q, max_seqlen_q, fail))
    if check:
        used, any_outside = values[batch + 1:2 * batch + 1], values[-1]
        capacity = block_table.shape[1] * page
        bad = [(b, n) for b, n in enumerate(used) if not 0 <= n <= capacity]
        if bad:
            fail(f"seqused_k must lie in 0..{capacity} (block_table's {block_table.shape[1]} pages "
                 f"of {page}); sequence {bad[0][0]} has {bad[0][1]}")
        if any_outside:
            b, i = (int(x) for x in outside.nonzero()[0])
            fail(f"block_table[{b}, {i}] is {int(block_table[b, i])}, a page the cache ({pages} pages) "
                 f"does not have, and sequence {b} uses it")
    return longest if max_seqlen_q is None else max_seqlen_q


def key_splits(programs: int, key_blocks: int, device: torch.device, asked: int | None = None,
               name: str = "attngen", per_sm: int = 2, min_blocks: int = 4, most: int = 32) -> int:
    """How many programs share each query tile's key range in a paged call (the ``_split``
    kernel, merged by ``_combine``): ``asked`` if given (checked).  Else 1 (the one-pass
    kernel) when ``programs`` (query tiles x head groups) fill the GPU's program slots
    (``per_sm``, the kernel's occupancy, an SM), and otherwise the count that should finish
    soonest: the waves of programs the slots run, times what each program reads, its
    ``key_blocks / splits`` KV blocks and about two blocks' worth for its fp32 partial output,
    written and merged.  Each slice takes ``min_blocks`` blocks at least, and the fewest
    slices win a tie.  So 128 programs on 264 slots take 2 slices (one wave), not 3 (a second
    wave for a third of the work).  Host-side arithmetic on shapes only, so a captured graph
    replays the same choice."""
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise InputError(f"{name}: splits must be a positive int, got {asked!r}")
        return asked
    slots = per_sm * _multiprocessors(device)
    if programs >= slots or key_blocks < 2 * min_blocks:
        return 1

    def cost(splits: int) -> int:
        waves = -(-programs * splits // slots)
        return waves * (-(-key_blocks // splits) + (2 if splits > 1 else 0))

    return min(range(1, min(key_blocks // min_blocks, most) + 1), key=lambda splits: (cost(splits), splits))


def natural_lse(lse: torch.Tensor) -> torch.Tensor:
    """A log-sum-exp as the kernels write it (log2 units: they work in exp2) in the natural-log
    units callers take."""
    return lse / LOG2E


def merged_lse(part_lse: torch.Tensor, sinks: torch.Tensor | None, empty: float) -> torch.Tensor:
    """Each query row's log-sum-exp, natural log, from a split paged call's slices: ``part_lse``
    (slices, total_q, H) in log2 units, ``empty`` (the kernels' M_START, -1e30) where the row
    sees no key of the slice.  The sink's logit is one more term; a row that sees no key and
    has no sink gets +inf, as FlashAttention writes.  Device work only (a captured graph takes
    it)."""
    lse = torch.logsumexp(natural_lse(part_lse), dim=0)
    if sinks is not None:
        return torch.logaddexp(lse, sinks.to(torch.float32))
    return lse.masked_fill(part_lse.amax(dim=0) < empty / 2, float("inf"))   # no real sum is near -1e30


_sms: dict = {}


def _multiprocessors(device: torch.device) -> int:
    if device not in _sms:
        _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sms[device]
