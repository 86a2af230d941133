"""Variant specs: YAML in, validated frozen dataclasses out.

A spec file holds one spec or several (YAML documents separated by ``---``, or a
top-level list).  Every list-valued field among ``causal``, ``window``, ``gqa``,
``head_dim`` and ``dtype`` expands into the cross product.  ``docs/spec.md`` is the
reference for users; this module is the only place that reads specs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import yaml

from .mask import Mask, MaskError
from .tuning import Tiles, tiles_for

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}   # spec name -> torch / cuda.tile name
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class SpecError(ValueError):
    """A spec that cannot be built; names the file, the key path and the line."""

    def __init__(self, message: str, source: str = "<spec>", path: str = "", line: int | None = None):
        self.source, self.path, self.line, self.message = source, path, line, message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {path + ': ' if path else ''}{message}")


# ---------------------------------------------------------------------------------------
# Kernel identity
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    """What, besides the spec, decides a generated kernel: attngen, cuTile, the templates."""
    from importlib import metadata

    from . import __version__
    from .codegen import template_sources

    try:
        cutile = metadata.version("cuda-tile")
    except metadata.PackageNotFoundError:
        cutile = "absent"
    digest = hashlib.sha256(f"attngen {__version__}\ncuda-tile {cutile}\n".encode())
    for name, text in sorted(template_sources().items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Features:
    """What a kernel computes beyond the masked softmax; each is generated only where used.

    softcap  scores <- softcap * tanh(scores / softcap) before masking (Gemma 2)
    sinks    one learned logit per query head joins the softmax denominator (gpt-oss)
    chunked  queries are the last S_q of S_k >= S_q keys (prefill after a cached prefix)
    varlen   packed (total_tokens, H, D) sequences described by cu_seqlens
    """

    softcap: float | None = None
    sinks: bool = False
    chunked: bool = False
    varlen: bool = False

    def __post_init__(self):
        if self.softcap is not None:
            if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) \
                    or not math.isfinite(self.softcap) or self.softcap <= 0:
                raise ValueError(f"softcap must be a positive number, got {self.softcap!r}")
            object.__setattr__(self, "softcap", float(self.softcap))
        for name in ("sinks", "chunked", "varlen"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def tag(self) -> str:
        parts = [f"sc{self.softcap:g}".replace(".", "p")] if self.softcap is not None else []
        parts += [name for name in ("sinks", "chunked", "varlen") if getattr(self, name)]
        return "".join(f"_{p}" for p in parts)

    def describe(self) -> str:
        parts = [f"softcap {self.softcap:g}"] if self.softcap is not None else []
        if self.sinks:
            parts.append("attention sinks")
        if self.chunked:
            parts.append("queries after a cached prefix (S_q <= S_k)")
        if self.varlen:
            parts.append("packed variable-length sequences")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"softcap": self.softcap, "sinks": self.sinks, "chunked": self.chunked,
                "varlen": self.varlen}


@dataclass(frozen=True)
class Family:
    """The semantics a caller selects on: mask, GQA ratio, features (head_dim/dtype dispatch later)."""

    mask: Mask
    gqa: int
    features: Features = Features()

    def describe(self) -> str:
        extra = self.features.describe()
        return f"{self.mask.describe()}; gqa {self.gqa}" + (f"; {extra}" if extra else "")


@dataclass(frozen=True)
class KernelSpec:
    """Everything one generated kernel is specialized on."""

    mask: Mask
    gqa: int
    head_dim: int
    dtype: str
    tiles: Tiles
    features: Features = Features()

    def __post_init__(self):
        if isinstance(self.gqa, bool) or not isinstance(self.gqa, int) or self.gqa <= 0:
            raise ValueError(f"gqa must be a positive integer, got {self.gqa!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {list(HEAD_DIMS)}, got {self.head_dim!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.gqa % self.tiles.pack:
            raise ValueError(f"tiles.pack ({self.tiles.pack}) must divide gqa ({self.gqa})")
        if self.features.varlen and self.tiles.pack > 1:
            raise ValueError("varlen kernels take one query head per tile (tiles.pack 1)")

    @property
    def family(self) -> Family:
        return Family(self.mask, self.gqa, self.features)

    @property
    def tile_d(self) -> int:
        """Head dimension padded to a power of two (tile extents must be powers of two)."""
        return 1 << (self.head_dim - 1).bit_length()

    def as_dict(self) -> dict:
        return {"mask": self.mask.as_dict(), "gqa": self.gqa, "head_dim": self.head_dim,
                "dtype": self.dtype, "tiles": self.tiles.as_dict(), "features": self.features.as_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelSpec":
        return cls(Mask(**data["mask"]), data["gqa"], data["head_dim"], data["dtype"],
                   Tiles(**data["tiles"]), Features(**data["features"]))

    @property
    def hash(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True) + fingerprint()
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def name(self) -> str:
        """Canonical name: file name, module name, registry key, cache key and test id."""
        return (f"{self.mask.tag}{self.features.tag}_g{self.gqa}_d{self.head_dim}_{self.dtype}"
                f"_{self.tiles.tag}_{self.hash}")

    def describe(self) -> str:
        extra = self.features.describe()
        return (f"{self.mask.describe()}{'; ' + extra if extra else ''}; gqa {self.gqa}; "
                f"head_dim {self.head_dim}; {self.dtype}; "
                f"tiles {self.tiles.block_m}x{self.tiles.block_n}, occupancy "
                f"{self.tiles.occupancy}, {self.tiles.num_ctas} CTA(s) per cluster"
                + (f", {self.tiles.pack} query heads per tile" if self.tiles.pack > 1 else ""))


@dataclass(frozen=True)
class Spec:
    """One validated spec document: the kernels it needs and, for a model, its layer map."""

    name: str
    source: str
    kernels: tuple[KernelSpec, ...]
    description: str = ""
    layers: tuple[Mask, ...] | None = None      # per layer, for model specs
    scale: float | None = None                  # softmax scale of the model (None: head_dim**-0.5)
    gqa: int | None = None                      # model specs: one GQA ratio ...
    head_dim: int | None = None                 # ... and one head dimension
    dtypes: tuple[str, ...] = field(default=())

    def layer_kernels(self, dtype: str) -> list[KernelSpec]:
        """The kernel of each layer for ``dtype`` (model specs only)."""
        by_mask = {k.mask: k for k in self.kernels if k.dtype == dtype}
        return [by_mask[m] for m in self.layers]


# ---------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------

class _Doc:
    """Plain Python data of one YAML document plus the line of every key path."""

    def __init__(self, data: Any, lines: dict[str, int], source: str):
        self.data, self.lines, self.source = data, lines, source

    def error(self, path: str, message: str) -> SpecError:
        line = self.lines.get(path)
        probe = path
        while line is None and probe:
            probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
            line = self.lines.get(probe)
        return SpecError(message, self.source, path, line)


def _to_python(node, path: str, lines: dict, loader, source: str):
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise SpecError(f"keys must be strings, got {key!r}", source, sub,
                                key_node.start_mark.line + 1)
            if key in out:
                raise SpecError("duplicate key", source, sub, key_node.start_mark.line + 1)
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, sub, lines, loader, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, f"{path}[{i}]", lines, loader, source) for i, n in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _documents(text: str, source: str) -> list[_Doc]:
    loader = yaml.SafeLoader(text)
    docs: list[_Doc] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if isinstance(node, yaml.SequenceNode):      # a top-level list of specs
                for i, item in enumerate(node.value):
                    lines: dict[str, int] = {}
                    docs.append(_Doc(_to_python(item, "", lines, loader, source), lines,
                                     f"{source}[{i}]" if len(node.value) > 1 else source))
            else:
                lines = {}
                docs.append(_Doc(_to_python(node, "", lines, loader, source), lines, source))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise SpecError(f"invalid YAML: {exc.problem or exc}", source, "",
                        mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    return docs


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

TOP_KEYS = ("name", "description", "causal", "window", "layers", "gqa", "head_dim", "dtype",
            "scale", "softcap", "sinks", "chunked", "varlen", "tiles")
EXPANDING = ("causal", "window", "gqa", "head_dim", "dtype")
TILE_KEYS = ("block_m", "block_n", "occupancy", "num_ctas", "pack")


def _options(doc: _Doc, key: str, default: Any) -> list[tuple[str, Any]]:
    value = doc.data.get(key, default)
    if isinstance(value, list):
        if not value:
            raise doc.error(key, "an empty list expands to no variant")
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [(key, value)]


def _positive_int(doc: _Doc, path: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise doc.error(path, f"{what} must be a positive integer, got {value!r}")
    if value <= 0:
        raise doc.error(path, f"{what} must be a positive integer, got {value}")
    return value


def _mask(doc: _Doc, path: str, window: Any, causal: bool) -> Mask:
    if isinstance(window, dict):
        for k in window:
            if k not in ("left", "right"):
                raise doc.error(f"{path}.{k}", f"unknown key {k!r}; a window takes left and right")
    try:
        return Mask.from_window(window, causal)
    except MaskError as exc:
        raise doc.error(path, str(exc)) from None


def _layers(doc: _Doc, causal: bool) -> tuple[Mask, ...]:
    value = doc.data["layers"]
    if isinstance(value, list):
        entries, base = value, "layers"
        count = len(value)
    elif isinstance(value, dict):
        for k in value:
            if k not in ("count", "pattern"):
                raise doc.error(f"layers.{k}", f"unknown key {k!r}; layers takes count and pattern")
        if "count" not in value or "pattern" not in value:
            raise doc.error("layers", "layers needs both count and pattern")
        count = _positive_int(doc, "layers.count", value["count"], "layers.count")
        entries, base = value["pattern"], "layers.pattern"
        if not isinstance(entries, list):
            raise doc.error(base, "pattern must be a list of windows (one per layer, repeated)")
    else:
        raise doc.error("layers", "layers is a list of per-layer windows or {count, pattern}")
    if not entries:
        raise doc.error(base, "needs at least one layer")
    masks = [_mask(doc, f"{base}[{i}]", w, causal) for i, w in enumerate(entries)]
    return tuple(masks[i % len(masks)] for i in range(count))


def _tiles_override(doc: _Doc) -> dict:
    value = doc.data.get("tiles")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error("tiles", f"tiles is a mapping with keys {list(TILE_KEYS)}")
    for k, v in value.items():
        if k not in TILE_KEYS:
            raise doc.error(f"tiles.{k}", f"unknown key {k!r}; tiles takes {list(TILE_KEYS)}")
    return dict(value)


def _features(doc: _Doc) -> Features:
    data = doc.data
    for key in ("sinks", "chunked", "varlen"):
        if not isinstance(data.get(key, False), bool):
            raise doc.error(key, f"{key} must be true or false, got {data[key]!r}")
    try:
        return Features(data.get("softcap"), data.get("sinks", False), data.get("chunked", False),
                        data.get("varlen", False))
    except ValueError as exc:
        raise doc.error("softcap", str(exc)) from None


def _kernel(doc: _Doc, mask: Mask, gqa, head_dim, dtype, paths: dict, tiles: dict,
            features: Features) -> KernelSpec:
    gqa = _positive_int(doc, paths["gqa"], gqa, "gqa")
    if head_dim not in HEAD_DIMS or isinstance(head_dim, bool):
        raise doc.error(paths["head_dim"], f"head_dim must be one of {list(HEAD_DIMS)}, got {head_dim!r}")
    if dtype not in DTYPES:
        raise doc.error(paths["dtype"], f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    base = tiles_for(head_dim, mask, gqa)
    try:
        chosen = replace(base, **tiles)
        if features.varlen and "pack" not in tiles:
            chosen = replace(chosen, pack=1)
        return KernelSpec(mask, gqa, head_dim, dtype, chosen, features)
    except (TypeError, ValueError) as exc:
        raise doc.error("tiles", str(exc)) from None


def _spec(doc: _Doc) -> Spec:
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("", f"a spec is a mapping of {list(TOP_KEYS)}, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise doc.error(key, f"unknown key {key!r}; a spec takes {list(TOP_KEYS)}")
    for key in ("name", "gqa", "head_dim", "dtype"):
        if key not in data:
            raise doc.error("", f"missing required key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise doc.error("name", f"name must match {NAME_RE.pattern}, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise doc.error("description", "description must be a string")
    tiles = _tiles_override(doc)
    features = _features(doc)

    scale = data.get("scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or scale <= 0:
            raise doc.error("scale", f"scale must be a positive number, got {scale!r}")
        scale = float(scale)

    if "layers" in data:
        if "window" in data:
            raise doc.error("window", "give either window or layers (per-layer windows), not both")
        for key in ("causal", "gqa", "head_dim"):
            if isinstance(data.get(key), list):
                raise doc.error(key, f"a model spec (with layers) has one {key}; write one spec per value")
        causal = data.get("causal", True)
        if not isinstance(causal, bool):
            raise doc.error("causal", f"causal must be true or false, got {causal!r}")
        layers = _layers(doc, causal)
        dtypes = _options(doc, "dtype", None)
        paths = {"gqa": "gqa", "head_dim": "head_dim"}
        kernels = []
        for mask in dict.fromkeys(layers):
            for dpath, dtype in dtypes:
                kernels.append(_kernel(doc, mask, data["gqa"], data["head_dim"], dtype,
                                       {**paths, "dtype": dpath}, tiles, features))
        return Spec(name, doc.source, tuple(kernels), description, layers, scale,
                    kernels[0].gqa, kernels[0].head_dim, tuple(d for _, d in dtypes))

    if scale is not None:
        raise doc.error("scale", "scale is the default of a model's layer kernels: add layers, or "
                                 "pass scale= when calling the kernel")
    kernels = []
    for combo in itertools.product(*(_options(doc, key, {"causal": True, "window": None}.get(key))
                                     for key in EXPANDING)):
        paths = {key: path for key, (path, _) in zip(EXPANDING, combo)}
        values = {key: value for key, (_, value) in zip(EXPANDING, combo)}
        if not isinstance(values["causal"], bool):
            raise doc.error(paths["causal"], f"causal must be true or false, got {values['causal']!r}")
        mask = _mask(doc, paths["window"], values["window"], values["causal"])
        kernels.append(_kernel(doc, mask, values["gqa"], values["head_dim"], values["dtype"],
                               paths, tiles, features))
    return Spec(name, doc.source, tuple(dict.fromkeys(kernels)), description)


def load_text(text: str, source: str = "<spec>") -> list[Spec]:
    return [_spec(doc) for doc in _documents(text, source)]


def load_files(paths: Iterable[str | Path]) -> list[Spec]:
    """Parse and validate every file; raise :class:`SpecError` on the first problem."""
    specs: list[Spec] = []
    seen: dict[str, str] = {}
    paths = list(paths)
    if not paths:
        raise SpecError("no spec files given", "attngen")
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError(f"cannot read: {exc.strerror}", str(path)) from None
        loaded = load_text(text, str(path))
        if not loaded:
            raise SpecError("the file holds no spec", str(path))
        for spec in loaded:
            if spec.name in seen:
                raise SpecError(f"name {spec.name!r} is already used by {seen[spec.name]}",
                                spec.source, "name")
            seen[spec.name] = spec.source
            specs.append(spec)
    return specs


def unique_kernels(specs: Iterable[Spec]) -> list[KernelSpec]:
    """Every distinct kernel the specs need, each once, in first-seen order."""
    return list(dict.fromkeys(k for s in specs for k in s.kernels))
