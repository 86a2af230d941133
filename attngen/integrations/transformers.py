"""attngen as a HuggingFace transformers attention implementation.

    import attngen.integrations.transformers as ag
    ag.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attngen")

Each layer's call carries what the registry needs: ``sliding_window`` (per layer), the GQA
ratio (from the tensors), head_dim and dtype (from the tensors), ``scaling`` and causality
(``is_causal`` or the module's ``is_causal``).  Window conventions, as transformers has them
(:meth:`attngen.Mask.from_transformers`):

* causal: ``sliding_window=W`` keeps ``kv_idx > q_idx - W``: the ``W`` most recent keys,
  the query's own included — attngen's ``window=W``;
* bidirectional (ModernBERT): the attention module passes ``sliding_window = config.sliding_window
  + 1`` and means a reach of ``W - 1`` keys on each side (``abs(q_idx - kv_idx) <= W - 1``) —
  attngen's ``{left: W - 1, right: W - 1}``.

Prefill runs on attngen kernels, with the layer's logit softcap (Gemma 2) and attention
sinks (gpt-oss, ``s_aux``) where it has them, and so does a chunk of several queries after
cached keys (chunked kernels).  A padded batch (left or right padding) is packed to its valid
tokens, runs on the packed-sequence (varlen) kernels and is scattered back: no S x S mask.
So does a padding-free batch, several sequences along each row (FlashAttention's
``cu_seq_lens_q/k``, or restarting ``position_ids``: :func:`_packed_rows`), kept apart.
All of it in inference and in training (the kernels are differentiable: generated backward
kernels, gradients for q, k, v and the sinks), mixed-precision training too: under
``torch.autocast`` the layer's fp32 queries and keys (rotary embeddings promote them) run in
the autocast dtype, as transformers' SDPA path does; outside it, fp32 queries of a layer whose
weights are fp16/bf16 (PEFT's upcast layers) run in the weights' dtype, as its FlashAttention
path does.  A decode step (one query) runs :func:`decode`: PyTorch over only the keys the
window reaches.  Everything else — padding that splits a row's tokens in several runs,
dropout while training, tensors that are not fp16/bf16 (nor cast to them, above) on CUDA,
unsupported head dims — falls back to PyTorch with the same window (and softcap and sinks,
as transformers' eager code has them), and a causal mask widened by an overlay no kernel
computes (Gemma 3's image tokens: :func:`_sees_later_keys`) falls back with transformers' own
mask; each reason is said once in the ``attngen`` logger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..core.mask import Mask
from ..core.reference import attend, probabilities, resolve_scale
from ..core.support import HEAD_DIMS, dtype_name
from ..runtime import inputs
from ..runtime.inputs import autocast
from ..runtime.ops import attention
from ..runtime.registry import get_kernel

NAME = "attngen"
log = logging.getLogger("attngen")
_said: set[str] = set()
_kernels: dict[tuple, str] = {}


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` available to every transformers model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function=None, attention_mask=None, **kwargs):
    """The mask transformers hands attngen's layers: like FlashAttention's, no 4-D mask —
    None without padding, else the 2-D padding mask — and, for a static cache, cut to the
    slots that hold tokens.  A static cache gives a layer all its ``kv_length`` slots, and
    those past the last query (``q_offset + q_length``) are still empty.  For a prefill or a
    chunk the mask then covers only the filled ones, and :func:`attention_forward` drops the
    rest (as transformers' FlashAttention path slices keys longer than the mask); for a decode
    step it covers every slot with the empty ones False, which keeps a compiled decode's
    shapes fixed and free of host synchronization."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if q_length > 1 and _sees_later_keys(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                         kwargs):
        # an overlay (e.g. image tokens that see each other) no kernel computes: transformers'
        # own mask, with which the layers fall back to PyTorch
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False),
                         device=kwargs.get("device", "cpu"))
    mask = flash_attention_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                attention_mask=attention_mask, **kwargs)
    if kv_offset:
        return mask
    if q_length == 1 and isinstance(q_offset, torch.Tensor):
        # a static layer's decode step (transformers passes its offset as a tensor): every slot,
        # the empty ones masked, so that shapes stay fixed and nothing syncs (compiled decode)
        filled = (torch.arange(kv_length, device=q_offset.device) <= q_offset)[None].expand(batch_size, -1)
        if mask is None:
            return filled
        if mask.shape[-1] < kv_length:
            mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=True)
        return filled & mask
    filled = int(q_offset) + q_length
    if filled < kv_length:                             # a static cache's empty slots
        if mask is None:
            return torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))
        return mask[:, :filled]
    return mask


def _sees_later_keys(batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset: int, mask_function,
                     kwargs) -> bool:
    """Whether a causal mask transformers builds lets a query see a later key: an overlay a
    model adds to its mask (Gemma 3's image tokens see each other both ways; a model's
    bidirectional option), which attngen's causal kernels do not compute.  transformers marks
    the causal masks that may carry one (``use_vmap``: mask functions a model adds;
    ``allow_is_causal_skip`` False: blocks of tokens, and also packed sequences and compiled
    decode); only those are looked at, each query against the key after it, with one host
    read per mask.  Bidirectional masks (built with ``allow_is_bidirectional_skip``) are left
    as they are.  Under torch.compile, which cannot read it, a model's added mask functions
    count as such an overlay; blocks of tokens are not looked for."""
    marked = kwargs.get("use_vmap") or kwargs.get("allow_is_causal_skip") is False
    if not marked or mask_function is None or "allow_is_bidirectional_skip" in kwargs:
        return False
    if torch.compiler.is_compiling():
        return bool(kwargs.get("use_vmap"))
    device = kwargs.get("device", "cpu")
    first = int(q_offset)
    count = min(q_length - 1, kv_offset + kv_length - 1 - first)     # queries with a later key
    if count <= 0:
        return False
    positions = torch.arange(first, first + count, device=device)[None, :]
    rows = torch.arange(batch_size, device=device)[:, None]
    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        seen = mask_function(rows, zero, positions, positions + 1)
    except Exception:       # a mask function written for vmap only: take transformers' mask
        return True
    return bool(torch.as_tensor(seen).any())


def _weights_dtype(module, *tensors):
    """fp32 tensors outside autocast, in the dtype of the layer's weights where that is fp16
    or bf16 (its config's dtype for a quantized model), as transformers' FlashAttention path
    runs them: PEFT keeps some layers in fp32, and they hand attention fp32 queries."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_is_quantized"):
        dtype = getattr(config, "dtype", None)
    else:
        dtype = next((m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
    if dtype not in (torch.float16, torch.bfloat16):
        return tensors
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)


def _fallback_reason(module, query, unpackable: bool, dropout) -> str | None:
    if query.device.type not in inputs.KERNEL_DEVICES:
        return f"tensors on {query.device.type}"
    if dtype_name(query.dtype) is None:
        return f"dtype {query.dtype}"
    if query.shape[-1] not in HEAD_DIMS:
        return f"head_dim {query.shape[-1]}"
    if unpackable:
        return "padding that leaves a row's tokens in more than one run (attention mask)"
    if dropout and module.training:
        return "dropout while training"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      sliding_window: int | None = None, **kwargs):
    """transformers' attention-function signature; returns ((B, S, H, D), None).

    torch.compile(fullgraph=True) traces it without graph breaks for unpadded calls (the
    kernels are ``attngen::`` custom ops; the kernel is chosen once per layer shape at trace
    time); a padded batch is unpadded with data-dependent shapes, which needs eager mode.
    """
    # mixed precision (fp32 weights under torch.autocast): rotary embeddings hand over fp32
    # queries and keys; attention runs in the autocast dtype, as transformers' SDPA path does
    query, key, value = autocast(query, key, value)
    if query.dtype == torch.float32:
        query, key, value = _weights_dtype(module, query, key, value)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] < key.shape[2]:
        # a static cache: the slots past the mask hold no token yet (see padding_mask)
        key, value = key[:, :, :attention_mask.shape[-1]], value[:, :, :attention_mask.shape[-1]]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask = Mask.from_transformers(sliding_window, causal)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if attention_mask is not None and attention_mask.dim() == 4:
        # transformers' own mask (padding_mask found an overlay no kernel computes)
        _say_once("a mask with an overlay the kernels do not compute (e.g. image tokens that see each other)")
        return fallback(module, query, key, value, attention_mask, mask, dropout, scaling,
                        softcap=softcap, sinks=sinks), None
    if query.shape[2] == 1 and key.shape[2] > 1 and causal:
        return decode(query, key, value, attention_mask, mask, scaling, softcap, sinks), None
    if attention_mask is not None:
        packing = _packing(attention_mask, query.shape[2], key.shape[2], query.device)
    else:
        packing = _packed_rows(query, key, kwargs)
    reason = _fallback_reason(module, query, attention_mask is not None and packing is None, dropout)
    if reason is not None:
        _say_once(reason)
        sequences = None if attention_mask is not None or packing is None else _sequence_ids(packing, query)
        return fallback(module, query, key, value, attention_mask, mask, dropout, scaling,
                        softcap=softcap, sinks=sinks, sequences=sequences), None
    gqa = query.shape[1] // key.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))          # (B, S, H, D) views
    if packing is None:
        variant = _variant(sliding_window, causal, gqa, softcap, sinks is not None,
                           query.shape[2] != key.shape[2], False)
        return attention(variant, q, k, v, sinks=sinks, scale=scaling, layout="bshd"), None
    p = packing
    variant = _variant(sliding_window, causal, gqa, softcap, sinks is not None, p.chunked, True)
    varlen = dict(sinks=sinks, cu_seqlens_q=p.cu_q, cu_seqlens_k=p.cu_k if p.chunked else None,
                  max_seqlen_q=p.longest_q, max_seqlen_k=p.longest_k if p.chunked else None, scale=scaling)
    if p.queries is None:
        # several sequences along each row, no padding: every token, in order, is the packed input
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
        return attention(variant, flat(q), flat(k), flat(v), **varlen).view(q.shape), None
    # a padded batch: pack the valid tokens, run the packed-sequence kernel, scatter back
    packed = attention(variant, q[p.queries], k[p.keys], v[p.keys], **varlen)
    out = q.new_zeros(q.shape)
    out[p.queries] = packed
    return out, None


def _say_once(reason: str) -> None:
    if reason not in _said and not torch.compiler.is_compiling():
        _said.add(reason)
        log.warning("attngen: falling back to PyTorch attention (same window) for %s", reason)


@torch.compiler.assume_constant_result
def _variant(sliding_window: int | None, causal: bool, gqa: int, softcap: float | None, sinks: bool,
             chunked: bool, varlen: bool) -> str:
    """The ``attngen::`` ops' variant key for a layer call; its kernel made once per variant.
    A constant to torch.compile: the registry is consulted at trace time, never in the graph."""
    variant = (sliding_window, causal, gqa, softcap, sinks, chunked, varlen)
    if variant not in _kernels:
        _kernels[variant] = get_kernel(Mask.from_transformers(sliding_window, causal), gqa=gqa,
                                       softcap=softcap, sinks=sinks, chunked=chunked, varlen=varlen).key
    return _kernels[variant]


@dataclass(frozen=True)
class _Packing:
    """How a batch packs into sequences for the packed kernels: the (row, position) of each
    valid query and key in packed order (None: every token, rows in order — several sequences
    along each row, no padding), the packed sequences' offsets and longest lengths, and
    whether any has more keys than queries (cached keys before its queries: the chunked
    kernels)."""

    queries: tuple[torch.Tensor, torch.Tensor] | None
    keys: tuple[torch.Tensor, torch.Tensor] | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    longest_q: int
    longest_k: int
    chunked: bool


_packings = WeakIdKeyDictionary()      # attention mask -> {(q_len, kv_len, device, version): packing}


def _packing(attention_mask, q_len: int, kv_len: int, device) -> _Packing | None:
    """The packing of a padded batch when the packed kernels can take it — each row's valid
    keys one run, its valid queries the last of them (left or right padding) — else None.
    Worked out (with the host reads it needs) once per mask, which every layer shares."""
    per_mask = _packings.setdefault(attention_mask, {})
    key = (q_len, kv_len, str(device), attention_mask._version)
    if key not in per_mask:
        per_mask[key] = _pack(attention_mask, q_len, kv_len, device)
    return per_mask[key]


def _pack(attention_mask, q_len: int, kv_len: int, device) -> _Packing | None:
    keys_valid = attention_mask[:, -kv_len:].to(device=device, dtype=torch.bool)
    positions = torch.arange(kv_len, device=device)
    n_k = keys_valid.sum(1)
    first = torch.where(keys_valid, positions, kv_len).amin(1)
    last = torch.where(keys_valid, positions, -1).amax(1)
    one_run = (n_k == 0) | (last - first + 1 == n_k)
    queries_end_the_run = (n_k == 0) | (last == kv_len - 1) | (q_len == kv_len)
    queries_valid = keys_valid[:, -q_len:]
    n_q = queries_valid.sum(1)
    fits, longest_q, longest_k, chunked = torch.stack(
        [(one_run & queries_end_the_run).all(), n_q.max(), n_k.max(), (n_q != n_k).any()]).tolist()
    if not fits:
        return None
    cu_q, cu_k = (torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (n_q, n_k))
    return _Packing(queries_valid.nonzero(as_tuple=True), keys_valid.nonzero(as_tuple=True), cu_q, cu_k,
                    int(longest_q), int(longest_k), bool(chunked))


_rows = WeakIdKeyDictionary()           # position_ids -> {(batch, length, device, version): packing}


def _packed_rows(query, key, kwargs) -> _Packing | None:
    """Several sequences along each row with no padding (a padding-free batch, e.g.
    transformers' DataCollatorWithFlattening), which must not see each other:

    * given as FlashAttention's ``cu_seq_lens_q/k`` and ``max_length_q/k`` (offsets over the
      rows' tokens taken in order), taken as they are — no host read, so torch.compile and
      CUDA graphs take them;
    * else found in ``position_ids`` (eagerly only: it reads them on the host, once per
      tensor, which every layer shares): a new sequence starts wherever a position is not its
      predecessor's + 1, as transformers' masking utilities find them for eager and SDPA
      attention.

    None when there is no such batch (a cached prefix, a decode step, one sequence a row)."""
    batch, length = query.shape[0], query.shape[2]
    if key.shape[2] != length or length == 1:
        return None
    cu_q, cu_k, max_q, max_k = (kwargs.get(name) for name in
                                ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"))
    if cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        same = cu_k is cu_q or (not torch.compiler.is_compiling() and torch.equal(cu_q, cu_k))
        return _Packing(None, None, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                        chunked=not same)
    position_ids = kwargs.get("position_ids")
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 \
            or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        return None
    if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
        if batch == 1:      # the padding-free layout
            _say_position_ids_unread()
        return None
    per_tensor = _rows.setdefault(position_ids, {})
    cache_key = (batch, length, str(query.device), position_ids._version)
    if cache_key not in per_tensor:
        per_tensor[cache_key] = _split_rows(position_ids, batch, length, query.device)
    return per_tensor[cache_key]


@torch.compiler.assume_constant_result
def _say_position_ids_unread() -> bool:
    """Said once (under torch.compile while it traces: a constant to it, so the graph keeps no
    logging)."""
    if "position_ids unread" not in _said:
        _said.add("position_ids unread")
        log.warning("attngen: under torch.compile or CUDA-graph capture, sequences packed along a row in "
                    "position_ids are not looked for (that reads them on the host); pass FlashAttention's "
                    "cu_seq_lens_q/k and max_length_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs="
                    "True)), or run the model eagerly")
    return True


def _split_rows(position_ids, batch: int, length: int, device) -> _Packing | None:
    positions = position_ids.to(device).expand(batch, length)   # (1, S) stands for every row
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()
    if first.numel() == batch:
        return None                                             # one sequence a row
    cu = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return _Packing(None, None, cu, cu, longest, longest, chunked=False)


def _sequence_ids(packing: _Packing, query) -> torch.Tensor:
    """(B, S): which packed sequence each token of a padding-free batch belongs to."""
    batch, length = query.shape[0], query.shape[2]
    tokens = torch.arange(batch * length, device=packing.cu_q.device, dtype=torch.int32)
    return torch.bucketize(tokens, packing.cu_q[1:], right=True).view(batch, length).to(query.device)


def decode(query, key, value, attention_mask, mask: Mask, scaling: float | None,
           softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step: one query per row, the last of ``kv_len`` keys, causal.  Reads only the
    keys its window reaches (the last ``W``; all of them for a full layer), the query heads of
    a GQA group sharing each K/V head (nothing repeated), no S-long mask; padding (a 2-D
    mask) applied to those keys.  PyTorch only, no host synchronization: CUDA graphs capture
    it.  Returns (B, 1, H, D)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attngen expects transformers' 2-D padding mask, got {attention_mask.dim()}-D")
    if mask.left is not None and key.shape[2] > mask.left + 1:
        key, value = key[:, :, -(mask.left + 1):], value[:, :, -(mask.left + 1):]
    batch, heads, _, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    scale = resolve_scale(scaling, head_dim)
    valid = None if attention_mask is None else attention_mask[:, -keys:].to(torch.bool)
    allowed = None if valid is None else valid[:, None, None, :]
    if softcap is None and sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scale, enable_gqa=kv_heads != heads)
        return out.transpose(1, 2)
    q = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)     # a group's heads share K, V
    sink = None if sinks is None else sinks.reshape(1, kv_heads, heads // kv_heads, 1)
    out = attend(q, key, value, allowed, scale=scale, softcap=softcap, sinks=sink,
                 dtype=torch.promote_types(query.dtype, torch.float32))   # (B, HKV, group, D), fp32 softmax
    return out.reshape(batch, 1, heads, head_dim)


def fallback_mask(mask: Mask, q_len: int, kv_len: int, padding: torch.Tensor | None,
                  device, sequences: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B or 1, 1, q_len, kv_len) mask; queries are the last ``q_len`` of the keys.
    ``sequences`` (B, S), for rows that pack several sequences: each token's sequence, which
    only its own sequence's tokens see."""
    offset = kv_len - q_len
    rows = torch.arange(offset, offset + q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    allowed = mask.visible(rows, cols)[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, -kv_len:].to(device=device, dtype=torch.bool)
    if sequences is not None:
        allowed = allowed & (sequences[:, None, :, None] == sequences[:, None, None, :])
    return allowed


def fallback(module, query, key, value, attention_mask, mask: Mask, dropout: float,
             scaling: float | None, softcap: float | None = None, sinks: torch.Tensor | None = None,
             sequences: torch.Tensor | None = None):
    """PyTorch attention with attngen's mask (or transformers' own 4-D one, when padding_mask
    handed it over); softcap and sinks as transformers' eager code."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask.to(device=query.device, dtype=torch.bool)
    elif attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attngen expects transformers' 2-D padding mask, got {attention_mask.dim()}-D")
    else:
        allowed = fallback_mask(mask, q_len, kv_len, attention_mask, query.device, sequences)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scale = resolve_scale(scaling, query.shape[-1])
    p = dropout if module.training else 0.0
    if softcap is None and sinks is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, dropout_p=p, scale=scale)
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        probs = probabilities(scores, allowed, softcap=softcap,
                              sinks=None if sinks is None else sinks.reshape(1, -1, 1, 1),
                              fill=torch.finfo(scores.dtype).min, dtype=torch.float32).to(value.dtype)
        probs = torch.nn.functional.dropout(probs, p=p, training=module.training)
        out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous()
