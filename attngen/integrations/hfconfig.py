"""A model spec from a HuggingFace transformers config: ``attngen spec --from-hf-config``.

    attngen spec --from-hf-config path/to/config.json -o variants/my-model.yaml
    attngen spec --from-hf-config mistralai/Mistral-7B-v0.1     # a model in the local HF cache

The config is read by transformers itself (``AutoConfig``), so per-layer attention types come
out exactly as the model will use them: ``config.layer_types`` where the config has one (Gemma
2/3, gpt-oss, Qwen2 with ``use_sliding_window``/``max_window_layers``, ModernBERT), else
``sliding_window`` on every layer (Mistral) or no window (Mixtral, Llama).  Windows are
translated with the convention of :mod:`attngen.integrations.transformers`:

* causal ``sliding_window=W`` -> ``window: W`` (the W most recent keys, the query included);
* bidirectional (ModernBERT, ``config.sliding_window = local_attention // 2 = R``) -> ``{left: R,
  right: R}`` (transformers' mask keeps ``abs(q - k) <= R``).

Scale (Gemma's ``query_pre_attn_scalar``), logit softcap (``attn_logit_softcapping``) and
attention sinks (gpt-oss) come along.  The YAML written is loaded back before it is returned,
so what this module emits always builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.mask import Mask
from ..core.support import check_head_dim, dtype_name
from ..generate.spec import NAME_RE, SpecError, load_text

ENCODERS = {"modernbert"}          # bidirectional attention: no causal mask
SINKS = {"gpt_oss"}                # a learned sink logit per query head
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}


@dataclass(frozen=True)
class ModelAttention:
    """What attngen needs to know about a model's attention layers."""
    model_type: str
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    layers: tuple[Mask, ...]
    scale: float | None = None          # None: head_dim ** -0.5
    softcap: float | None = None
    sinks: bool = False
    dtype: str | None = None            # the config's fp16/bf16, if it names one
    notes: tuple[str, ...] = field(default_factory=tuple)   # provenance, written as comments

    @property
    def gqa(self) -> int:
        return self.heads // self.kv_heads


def _field(config, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def attention_of(config, source: str = "<config>") -> ModelAttention:
    """Read a transformers ``PretrainedConfig`` (the text part of a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or getattr(config, "model_type", "")
    err = lambda key, msg: SpecError(msg, source, key)  # noqa: E731

    heads = _field(text, "num_attention_heads")
    layers = _field(text, "num_hidden_layers")
    if not isinstance(heads, int) or not isinstance(layers, int):
        raise err("num_attention_heads", f"not an attention model config (model_type {model_type!r}): "
                                         "it needs num_attention_heads and num_hidden_layers")
    kv_heads = _field(text, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise err("num_key_value_heads", f"{heads} query heads do not split into {kv_heads} KV heads")
    head_dim = _field(text, "head_dim") or _field(text, "hidden_size", 0) // heads
    try:
        check_head_dim(head_dim)
    except ValueError as exc:
        raise err("head_dim", f"head_dim {head_dim} is not supported: {exc}") from None

    causal = model_type not in ENCODERS
    window = _field(text, "sliding_window")
    notes = [f"{layers} layers, {heads} query heads / {kv_heads} KV heads, head_dim {head_dim}"]
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise err("layer_types", f"layer type(s) {unknown} are not supported "
                                     f"(attngen covers {sorted(LAYER_TYPES)})")
        if len(layer_types) != layers:
            raise err("layer_types", f"{len(layer_types)} layer types for {layers} layers")
        sliding = [LAYER_TYPES[t] for t in layer_types]
        if any(sliding) and not window:
            raise err("sliding_window", "layer_types has sliding_attention layers but no sliding_window")
        notes.append(f"layer_types: {sum(sliding)} sliding_attention, "
                     f"{len(sliding) - sum(sliding)} full_attention")
    else:
        sliding = [bool(window)] * layers
        notes.append("no layer_types: sliding_window applies to every layer" if window
                     else "no sliding_window: every layer attends to every key")
    if any(sliding):
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise err("sliding_window", f"sliding_window must be a positive integer, got {window!r}")
        # what each layer's attention module will pass as sliding_window (encoders pass
        # config.sliding_window + 1), read with the integration's own convention
        local = Mask.from_transformers(window if causal else window + 1, causal)
        notes.append(f"sliding_window {window}: {local.describe()}")
    full = Mask(causal)
    masks = tuple(local if s else full for s in sliding)

    scale = None
    scalar = _field(text, "query_pre_attn_scalar")
    if scalar is not None:
        scale = float(scalar) ** -0.5
        notes.append(f"scale = query_pre_attn_scalar {scalar} ** -0.5")
    softcap = _field(text, "attn_logit_softcapping")
    sinks = model_type in SINKS
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = dtype_name(dtype)
    return ModelAttention(model_type, causal, heads, kv_heads, head_dim, masks, scale,
                          None if softcap is None else float(softcap), sinks, dtype, tuple(notes))


def load_config(source: str):
    """A config from a config.json file, a model directory, or a model id in the local HF cache."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise SpecError("reading a HF config needs transformers: pip install 'attngen[transformers]'",
                        source) from None
    path = Path(source)
    try:
        if path.is_file() or path.is_dir():
            return AutoConfig.from_pretrained(str(path))
        if path.suffix == ".json" or len(path.parts) > 2:
            raise SpecError("no such file or model directory", source)
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except SpecError:
        raise
    except Exception as exc:                  # transformers raises many kinds here
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise SpecError(f"cannot read a transformers config ({why}); give a config.json, a model "
                        "directory, or the id of a model already in the local HF cache", source) from None


def _period(items: tuple) -> int:
    """Smallest p with items[i] == items[i % p] for every i."""
    return next(p for p in range(1, len(items) + 1)
                if all(items[i] == items[i % p] for i in range(len(items))))


def _window_words(mask: Mask) -> str:
    if mask.left is None:
        return "full"
    return f"W={mask.window}" if mask.causal else f"-{mask.left}..+{mask.right}"


def _window_yaml(mask: Mask) -> str:
    window = mask.window
    if window is None:
        return "null"
    if isinstance(window, dict):
        return "{left: %d, right: %d}" % (window["left"], window["right"])
    return str(window)


def default_name(source: str, model: ModelAttention) -> str:
    """``google/gemma-3-4b-it`` -> ``gemma-3-4b-it``; a config.json takes its folder's name."""
    path = Path(source)
    stem = path.parent.name if path.name == "config.json" else path.stem if path.suffix == ".json" \
        else path.name
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name if name and NAME_RE.fullmatch(name) else model.model_type.replace("_", "-")


def to_yaml(model: ModelAttention, name: str, dtypes: list[str] | None = None,
            source: str = "<config>") -> str:
    """The YAML model spec, with comments saying where each value came from."""
    if not NAME_RE.fullmatch(name):
        raise SpecError(f"name must match {NAME_RE.pattern}, got {name!r}", source, "name")
    notes = list(model.notes)
    if not dtypes and not model.dtype:
        notes.append("the config names no fp16/bf16 dtype: bf16 (pass --dtype to change)")
    dtypes = dtypes or [model.dtype or "bf16"]
    period = _period(model.layers)
    pattern = ", ".join(_window_yaml(m) for m in model.layers[:period])
    windows = ", ".join(dict.fromkeys(_window_words(m) for m in model.layers))
    lines = [f"# From the transformers config {source} (model_type {model.model_type}):"]
    lines += [f"#   {note}" for note in notes]
    lines += [
        f"name: {name}",
        f'description: "{model.model_type}, {len(model.layers)} layers: {windows}'
        f'{", softcap %g" % model.softcap if model.softcap else ""}{", sinks" if model.sinks else ""}"',
        f"causal: {'true' if model.causal else 'false'}",
        f"gqa: {model.gqa:<19}# {model.heads} query heads / {model.kv_heads} KV heads",
        f"head_dim: {model.head_dim}",
        f"dtype: {dtypes[0] if len(dtypes) == 1 else '[' + ', '.join(dtypes) + ']'}",
    ]
    if model.scale is not None:
        lines.append(f"scale: {model.scale!r}")
    if model.softcap is not None:
        lines.append(f"softcap: {model.softcap!r}             # attn_logit_softcapping")
    if model.sinks:
        lines.append("sinks: true             # pass the layer's sink logits as sinks= at call time")
    lines += ["transformers: true      # also the kernels attn_implementation=\"attngen\" calls: "
              "padded batches, prefill after cached keys",
              "layers:", f"  count: {len(model.layers)}", f"  pattern: [{pattern}]", ""]
    text = "\n".join(lines)
    (spec,) = load_text(text, source)           # what we emit must load, and mean the same
    if spec.layers != model.layers:
        raise AssertionError(f"spec for {source} does not round-trip: {spec.layers} != {model.layers}")
    return text


def spec_from_hf_config(source: str, name: str | None = None, dtypes: list[str] | None = None) -> str:
    """``attngen spec --from-hf-config SOURCE``: the YAML text of the model spec."""
    model = attention_of(load_config(source), source)
    return to_yaml(model, name or default_name(source, model), dtypes, source)
