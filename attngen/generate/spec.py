"""The YAML reader: spec files in, validated :class:`Spec` documents of
:class:`~attngen.core.variant.KernelSpec` values out.

A spec file holds one spec or several (YAML documents separated by ``---``, or a
top-level list).  Every list-valued field among ``causal``, ``window``, ``gqa``,
``head_dim`` and ``dtype`` expands into the cross product.  ``docs/spec.md`` is the
reference for users; this module is the only place that reads specs.  What is supported is
asked of :mod:`attngen.core.support`, never restated here.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..core.mask import Mask, MaskError
from ..core.support import check_dtype, check_gqa, check_head_dim, check_positive_number
from ..core.variant import Features, KernelSpec

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")    # the whole name (fullmatch)


class SpecError(ValueError):
    """A spec that cannot be built; names the file, the key path and the line."""

    def __init__(self, message: str, source: str = "<spec>", path: str = "", line: int | None = None):
        self.source, self.path, self.line, self.message = source, path, line, message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {path + ': ' if path else ''}{message}")


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


# ---------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------

class _Doc:
    """Plain Python data of one YAML document plus the line of every key path."""

    def __init__(self, data: Any, lines: dict[str, int], source: str):
        self.data, self.lines, self.source = data, lines, source

    def error(self, path: str, message: str) -> SpecError:
        """An error at ``path``, on the line of the nearest enclosing key that has one."""
        probe = path
        line = self.lines.get(probe)
        while line is None and probe:
            parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe)
            probe = parent if parent != probe else ""       # a top-level key: the document
            line = self.lines.get(probe)
        return SpecError(message, self.source, path, line)


def _scalar(node, path: str, loader, source: str):
    """A scalar's value; PyYAML's own conversion errors (a bad date, ``!!bool maybe``, a
    malformed tag) become SpecErrors at the scalar's line."""
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {exc}",
                        source, path, node.start_mark.line + 1) from None


def _to_python(node, path: str, lines: dict, loader, source: str, parents: tuple = ()):
    lines.setdefault(path, node.start_mark.line + 1)
    if any(node is p for p in parents):
        raise SpecError("a YAML alias refers to a node that contains it (recursive data)",
                        source, path, node.start_mark.line + 1)
    parents = (*parents, node)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError("keys must be strings, got a mapping or list", source, path,
                                key_node.start_mark.line + 1)
            key = _scalar(key_node, path, loader, source)
            sub = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                raise SpecError(f"keys must be strings, got {key!r}", source, sub,
                                key_node.start_mark.line + 1)
            if key in out:
                raise SpecError("duplicate key", source, sub, key_node.start_mark.line + 1)
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, sub, lines, loader, source, parents)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, f"{path}[{i}]", lines, loader, source, parents)
                for i, n in enumerate(node.value)]
    return _scalar(node, path, loader, source)


def _documents(text: str, source: str) -> list[_Doc]:
    docs: list[_Doc] = []
    loader = None
    try:
        loader = yaml.SafeLoader(text)          # reading starts here: it can fail already
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
    except yaml.YAMLError as exc:              # syntax, unreadable characters, unknown tags
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        raise SpecError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", source, "",
                        mark.line + 1 if mark else None) from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

TOP_KEYS = ("name", "description", "causal", "window", "layers", "gqa", "head_dim", "dtype",
            "scale", "softcap", "sinks", "chunked", "varlen", "paged", "tiles", "transformers")
EXPANDING = ("causal", "window", "gqa", "head_dim", "dtype")
TILE_KEYS = ("block_m", "block_n", "occupancy", "num_ctas", "pack", "worker_warps")


WINDOW_KEYS = ("left", "right")
LAYER_KEYS = ("count", "pattern")


def _keys(doc: _Doc, path: str, value: dict, allowed: tuple[str, ...], what: str) -> None:
    """The one check of every mapping in a spec: it holds only the keys it takes."""
    for key in value:
        if key not in allowed:
            raise doc.error(f"{path}.{key}" if path else str(key),
                            f"unknown key {key!r}; {what} takes {list(allowed)}")


def _rule(doc: _Doc, path: str, check, value):
    """Apply a rule of :mod:`attngen.core.support` (or a value type's own checks) at ``path``."""
    try:
        return check(value)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from None


def _options(doc: _Doc, key: str, default: Any) -> list[tuple[str, Any]]:
    value = doc.data.get(key, default)
    if isinstance(value, list):
        if not value:
            raise doc.error(key, "an empty list expands to no variant")
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [(key, value)]


def _mask(doc: _Doc, path: str, window: Any, causal: bool) -> Mask:
    if isinstance(window, dict):
        _keys(doc, path, window, WINDOW_KEYS, "a window")
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
        _keys(doc, "layers", value, LAYER_KEYS, "layers")
        if "count" not in value or "pattern" not in value:
            raise doc.error("layers", "layers needs both count and pattern")
        count = value["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise doc.error("layers.count", f"layers.count must be a positive integer, got {count!r}")
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
    _keys(doc, "tiles", value, TILE_KEYS, "tiles")
    return dict(value)


def _features(doc: _Doc) -> Features:
    data = doc.data
    for key in Features.FLAGS:
        if not isinstance(data.get(key, False), bool):
            raise doc.error(key, f"{key} must be true or false, got {data[key]!r}")
    return _rule(doc, "softcap", lambda cap: Features(cap, *(data.get(k, False) for k in Features.FLAGS)),
                 data.get("softcap"))


def _integration_features(doc: _Doc, features: Features, causal: bool) -> list[Features]:
    """The features of a model spec's kernels: its own (first: what ``get_layer_kernels``
    runs), and with ``transformers: true`` also every kind the transformers integration calls
    -- packed sequences (padded and padding-free batches) and, for a causal model, queries after
    cached keys (chunked prefill), alone and together.  Decode steps run in PyTorch: no kernel."""
    wanted = doc.data.get("transformers", False)
    if not isinstance(wanted, bool):
        raise doc.error("transformers", f"transformers must be true or false, got {wanted!r}")
    if not wanted:
        return [features]
    kinds = [{}, {"varlen": True}] + ([{"chunked": True}, {"chunked": True, "varlen": True}]
                                      if causal else [])
    return list(dict.fromkeys(replace(features, **kind) for kind in kinds))


def _kernel(doc: _Doc, mask: Mask, gqa, head_dim, dtype, paths: dict, tiles: dict,
            features: Features) -> KernelSpec:
    gqa = _rule(doc, paths["gqa"], check_gqa, gqa)
    head_dim = _rule(doc, paths["head_dim"], check_head_dim, head_dim)
    dtype = _rule(doc, paths["dtype"], check_dtype, dtype)

    def chosen(override):
        spec = KernelSpec.tuned(mask, gqa, head_dim, dtype, features)
        return replace(spec, tiles=replace(spec.tiles, **override))
    try:
        return _rule(doc, "tiles", chosen, tiles)
    except TypeError as exc:
        raise doc.error("tiles", str(exc)) from None


def _spec(doc: _Doc) -> Spec:
    data = doc.data
    if not isinstance(data, dict):
        raise doc.error("", f"a spec is a mapping of {list(TOP_KEYS)}, got {type(data).__name__}")
    _keys(doc, "", data, TOP_KEYS, "a spec")
    for key in ("name", "gqa", "head_dim", "dtype"):
        if key not in data:
            raise doc.error("", f"missing required key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise doc.error("name", f"name must match {NAME_RE.pattern}, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise doc.error("description", "description must be a string")
    tiles = _tiles_override(doc)
    features = _features(doc)

    scale = data.get("scale")
    if scale is not None:
        scale = _rule(doc, "scale", lambda s: check_positive_number(s, "scale"), scale)

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
        for extra in _integration_features(doc, features, causal):
            for mask in dict.fromkeys(layers):
                for dpath, dtype in dtypes:
                    kernels.append(_kernel(doc, mask, data["gqa"], data["head_dim"], dtype,
                                           {**paths, "dtype": dpath}, tiles, extra))
        return Spec(name, doc.source, tuple(dict.fromkeys(kernels)), description, layers, scale,
                    kernels[0].gqa, kernels[0].head_dim, tuple(dict.fromkeys(d for _, d in dtypes)))

    if "transformers" in data:
        raise doc.error("transformers", "transformers: true is for a model spec (with layers)")
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
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read: {exc.strerror}", str(path)) from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); a spec is YAML in UTF-8", str(path)) from None
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
