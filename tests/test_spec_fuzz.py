"""Property-based tests of the YAML spec reader (``attngen.generate.spec.load_text``).

* Random valid specs (plain and model specs, one or several per file) are built as Python
  dicts, dumped with ``yaml.safe_dump`` and read back; what the reader returns must mean
  what the dict says.  Every expectation is derived from the dict and ``docs/spec.md``
  (plus ``Mask.from_window`` for masks), never from the reader itself.
* Random invalid specs (a valid dict plus exactly one mutation) and random garbage text
  must raise ``SpecError`` (never another exception type) that starts with the file name
  and, for a mutated key, names that key in ``.path``.

The reader bugs these properties found (recursive aliases, PyYAML conversion errors, unhashable
or float values, huge integers, a name with a trailing newline, repeated dtypes) are fixed;
the tests at the end keep one example of each.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import re
import shutil
import signal
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from attngen.core.mask import Mask
from attngen.generate.spec import Spec, SpecError, load_text

# What docs/spec.md promises (restated here on purpose: the test checks the reader against
# the reference, not against the constants the reader uses).
HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = ("fp16", "bf16")
TOP_KEYS = ("name", "description", "causal", "window", "layers", "gqa", "head_dim", "dtype",
            "scale", "softcap", "sinks", "chunked", "varlen", "tiles")
REQUIRED = ("name", "gqa", "head_dim", "dtype")
EXPANDING = ("causal", "window", "gqa", "head_dim", "dtype")
FLAGS = ("sinks", "chunked", "varlen")
TILE_KEYS = ("block_m", "block_n", "occupancy", "num_ctas", "pack", "worker_warps")
NAME_RE = r"[a-z0-9][a-z0-9._-]*"
SOURCE = "fuzz.yaml"

# No example database, and Hypothesis' caches in a temporary directory, not the checkout.
_HOME = tempfile.mkdtemp(prefix="attngen-spec-fuzz-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
set_hypothesis_home_dir(_HOME)
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextlib.contextmanager
def _time_limit(seconds: float = 20.0):
    """Turn a hang of the reader into a test failure (a load takes milliseconds; the limit is
    generous for a loaded 2-core CI machine).  ``_Doc.error`` once looped forever on a path
    that had no line and no parent."""
    def _alarm(signum, frame):
        raise TimeoutError(f"load_text took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load(text: str) -> list[Spec]:
    with _time_limit():
        return load_text(text, SOURCE)


def dump(doc, flow, many: bool = False) -> str:
    dumper = yaml.safe_dump_all if many else yaml.safe_dump
    return dumper(doc, default_flow_style=flow, sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------
# Valid specs
# ---------------------------------------------------------------------------------------

names = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,23}\Z", fullmatch=True)
def _round_trips(text: str) -> bool:
    """PyYAML writes a lone NEL, U+2028 or U+2029 raw inside quotes and reads it back as a
    folded space: a dumper quirk, not the reader's, so such strings are left out."""
    return yaml.safe_load(yaml.safe_dump({"k": text}, allow_unicode=True)) == {"k": text} and \
        yaml.safe_load(yaml.safe_dump({text: 1}, allow_unicode=True)) == {text: 1}


descriptions = st.text(max_size=40).filter(_round_trips)
positive_numbers = st.one_of(st.integers(1, 10**6),
                             st.floats(min_value=0, exclude_min=True, allow_infinity=False))
causal_windows = st.one_of(st.none(), st.integers(1, 10**6))
bidir_windows = st.one_of(st.none(), st.fixed_dictionaries(
    {"left": st.integers(0, 10**5), "right": st.integers(0, 10**5)}))


def windows_for(causals: set[bool]):
    """Window values valid for every causality in ``causals`` (see the table in docs/spec.md)."""
    if causals == {True}:
        return causal_windows
    if causals == {False}:
        return bidir_windows
    return st.none()


def one_or_list(draw, values, max_size=3):
    """A single value or a non-empty list of values; returns (yaml value, options)."""
    if draw(st.booleans()):
        value = draw(values)
        return value, [value]
    options = draw(st.lists(values, min_size=1, max_size=max_size))
    return options, options


def power_of_two(lo, hi):
    return st.sampled_from([1 << i for i in range(lo.bit_length() - 1, hi.bit_length())])


@st.composite
def features(draw):
    """Optional softcap / sinks / chunked / varlen keys; returns (keys, expected tuple)."""
    keys = {}
    if draw(st.booleans()):
        keys["softcap"] = draw(positive_numbers)
    for flag in FLAGS:
        if draw(st.booleans()):
            keys[flag] = draw(st.booleans())
    softcap = keys.get("softcap")
    expected = (None if softcap is None else float(softcap),
                *(keys.get(flag, False) for flag in FLAGS))
    return keys, expected


@st.composite
def tiles_override(draw, gqas: list[int], varlen: bool):
    """A valid partial ``tiles`` mapping for every GQA ratio in ``gqas``."""
    keys = draw(st.lists(st.sampled_from(TILE_KEYS), unique=True, max_size=len(TILE_KEYS)))
    tiles = {}
    for key in keys:
        if key in ("block_m", "block_n"):
            tiles[key] = draw(power_of_two(16, 256))
        elif key == "occupancy":
            tiles[key] = draw(st.integers(1, 32))
        elif key == "num_ctas":
            tiles[key] = draw(st.sampled_from([1, 2, 4, 8, 16]))
        elif key == "worker_warps":
            tiles[key] = draw(st.sampled_from([None, 1, 2, 4, 8, 16, 32]))
    if "pack" in keys:
        # pack: a power of two that divides every gqa, no larger than block_m (the tuned
        # block_m is at least 64), and 1 for varlen kernels.
        limit = 1 if varlen else tiles.get("block_m", 64)
        gcd = math.gcd(*gqas)
        tiles["pack"] = draw(st.sampled_from(
            [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= limit and gcd % p == 0]))
    return tiles


def add_optional_common(draw, d, gqas):
    """description, features and tiles, shared by plain and model specs."""
    if draw(st.booleans()):
        d["description"] = draw(descriptions)
    feat_keys, feat = draw(features())
    d.update(feat_keys)
    if draw(st.booleans()):
        d["tiles"] = draw(tiles_override(gqas, feat_keys.get("varlen", False)))
    return feat


@st.composite
def plain_specs(draw):
    """(dict, expectation) of a valid spec without ``layers``."""
    d = {"name": draw(names)}
    mode = draw(st.sampled_from(["omit", "one", "list"]))
    if mode == "omit":
        causals = [True]
    elif mode == "one":
        d["causal"] = draw(st.booleans())
        causals = [d["causal"]]
    else:
        d["causal"] = causals = draw(st.lists(st.booleans(), min_size=1, max_size=3))
    if draw(st.booleans()):
        d["window"], windows = one_or_list(draw, windows_for(set(causals)))
    else:
        windows = [None]
    d["gqa"], gqas = one_or_list(draw, st.integers(1, 64))
    d["head_dim"], head_dims = one_or_list(draw, st.sampled_from(HEAD_DIMS))
    d["dtype"], dtypes = one_or_list(draw, st.sampled_from(DTYPES), max_size=2)
    feat = add_optional_common(draw, d, gqas)
    kernels = {(Mask.from_window(w, c), g, h, t, feat)
               for c, w, g, h, t in itertools.product(causals, windows, gqas, head_dims, dtypes)}
    return d, {"kernels": kernels, "layers": None, "scale": None}


@st.composite
def model_specs(draw):
    """(dict, expectation) of a valid model spec (with ``layers``)."""
    d = {"name": draw(names)}
    causal = draw(st.booleans())
    if not causal or draw(st.booleans()):
        d["causal"] = causal
    pattern = draw(st.lists(causal_windows if causal else bidir_windows, min_size=1, max_size=6))
    masks = [Mask.from_window(w, causal) for w in pattern]
    if draw(st.booleans()):
        d["layers"] = pattern
        layers = tuple(masks)
    else:
        count = draw(st.integers(1, 80))
        d["layers"] = {"count": count, "pattern": pattern}
        layers = tuple(masks[i % len(masks)] for i in range(count))    # repeated from layer 0
    d["gqa"] = gqa = draw(st.integers(1, 64))
    d["head_dim"] = head_dim = draw(st.sampled_from(HEAD_DIMS))
    d["dtype"], dtypes = one_or_list(draw, st.sampled_from(DTYPES), max_size=2)
    dtypes = list(dict.fromkeys(dtypes))        # a repeated dtype names its kernels once
    scale = None
    if draw(st.booleans()):
        d["scale"] = draw(positive_numbers)
        scale = float(d["scale"])
    feat = add_optional_common(draw, d, [gqa])
    # Kernels for the masks of the layers there are (a count below the pattern's length
    # leaves the tail of the pattern unused).
    kernels = {(m, gqa, head_dim, t, feat) for m in layers for t in dtypes}
    return d, {"kernels": kernels, "layers": layers, "scale": scale, "gqa": gqa,
               "head_dim": head_dim, "dtypes": tuple(dtypes)}


valid_specs = st.one_of(plain_specs(), model_specs())


@st.composite
def shuffled(draw, d: dict) -> dict:
    """The same mapping with its keys in a random order."""
    return dict(draw(st.permutations(list(d.items()))))


def kernel_key(k):
    f = k.features
    return (k.mask, k.gqa, k.head_dim, k.dtype, (f.softcap, f.sinks, f.chunked, f.varlen))


def check_spec(spec, d: dict, want: dict):
    note(f"spec: {spec!r}")
    assert isinstance(spec, Spec)
    assert spec.name == d["name"]
    assert spec.source.startswith(SOURCE)
    assert spec.description == d.get("description", "")
    got = [kernel_key(k) for k in spec.kernels]
    assert set(got) == want["kernels"]
    assert len(got) == len(set(got)), "each distinct kernel once"
    for k in spec.kernels:
        assert type(k.gqa) is int and type(k.head_dim) is int and k.dtype in DTYPES
        for key, value in d.get("tiles", {}).items():
            assert getattr(k.tiles, key) == value, key
        assert k.gqa % k.tiles.pack == 0
        if k.features.varlen:
            assert k.tiles.pack == 1
    assert spec.layers == want["layers"]
    assert spec.scale == want["scale"]
    if want["layers"] is not None:
        assert (spec.gqa, spec.head_dim, spec.dtypes) == (want["gqa"], want["head_dim"],
                                                          want["dtypes"])


@SETTINGS
@given(st.data())
def test_valid_specs_round_trip(data):
    specs = data.draw(st.lists(valid_specs, min_size=1, max_size=3), label="specs")
    dicts = [data.draw(shuffled(d)) for d, _ in specs]
    flow = data.draw(st.sampled_from([False, True, None]), label="flow")
    layout = data.draw(st.sampled_from(["documents", "list"] if len(dicts) > 1
                                       else ["single", "documents", "list"]), label="layout")
    if layout == "single":
        text = dump(dicts[0], flow)
    elif layout == "documents":
        text = dump(dicts, flow, many=True)
    else:
        text = dump(dicts, flow)
    note(text)
    assert (list(yaml.safe_load_all(text)) if layout == "documents"
            else [yaml.safe_load(text)] if layout == "single" else yaml.safe_load(text)) == dicts
    loaded = load(text)
    assert len(loaded) == len(dicts)
    for spec, d, (_, want) in zip(loaded, dicts, specs):
        check_spec(spec, d, want)


# ---------------------------------------------------------------------------------------
# Invalid specs: a valid dict plus one mutation
# ---------------------------------------------------------------------------------------

small_text = st.text(max_size=8)
any_float = st.floats()
some_ints = st.integers(-10**6, 10**6)
some_lists = st.lists(st.integers(-3, 3), max_size=3)
some_dicts = st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
junk = st.one_of(small_text, any_float, st.booleans(), st.none(), some_ints, some_lists, some_dicts)
non_positive = st.integers(-10**6, 0)
not_bool = st.one_of(small_text, any_float, st.none(), some_ints, some_lists, some_dicts)
not_str = st.one_of(any_float, st.booleans(), st.none(), some_ints, some_lists, some_dicts)
# Window values that are wrong whatever the causality (None and lists left out: None is
# valid, a list expands).
bad_windows = st.one_of(
    small_text, any_float, st.booleans(), non_positive,
    st.dictionaries(st.sampled_from(["left", "right"]),
                    st.one_of(st.integers(-100, -1), small_text, any_float, st.none()), max_size=2))
bad_gqa = st.one_of(non_positive, small_text, any_float, st.booleans(), st.none(),
                    st.dictionaries(small_text, st.integers(), max_size=2))
bad_head_dim = st.one_of(st.integers(-1000, 1000).filter(lambda v: v not in HEAD_DIMS), small_text,
                         any_float, st.booleans(), st.none(),
                         st.dictionaries(small_text, st.integers(), max_size=2))
bad_dtype = st.one_of(small_text.filter(lambda v: v not in DTYPES), st.integers(), any_float,
                      st.booleans(), st.none(), st.dictionaries(small_text, st.integers(), max_size=2),
                      st.sampled_from(["FP16", "float16", "bfloat16", "fp32", "fp8", "bf16 "]))
bad_positive_number = st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf),
                                st.integers(-10**6, 0), small_text, st.booleans(),
                                st.lists(st.integers(1, 3), max_size=2),
                                st.dictionaries(small_text, st.integers(), max_size=1))
bad_count = st.one_of(non_positive, small_text, any_float, st.booleans(), st.none(),
                      st.lists(st.integers(1, 3), max_size=2))
bad_names = st.one_of(
    st.text(max_size=12).filter(lambda s: not re.fullmatch(NAME_RE, s)),
    st.sampled_from(["", "Upper", "has space", "-lead", ".lead", "_lead", "a/b", "a:b", "é"]),
    not_str)
unknown_keys = st.text(max_size=10).filter(_round_trips)
non_str_keys = st.one_of(st.integers(), st.booleans(), st.none(),
                         st.floats(allow_nan=False))


def bad_tile_value(key: str):
    base = [small_text, st.booleans(), st.none(), st.lists(st.integers(1, 64), max_size=2)]
    if key in ("block_m", "block_n"):
        return st.one_of(*base, any_float,
                         st.integers(-300, 600).filter(lambda v: v not in (16, 32, 64, 128, 256)))
    if key == "occupancy":
        return st.one_of(*base, any_float, st.integers(-100, 100).filter(lambda v: not 1 <= v <= 32))
    if key == "num_ctas":
        return st.one_of(*base, any_float,
                         st.integers(-100, 100).filter(lambda v: v not in (1, 2, 4, 8, 16)))
    if key == "worker_warps":                       # None is valid here: the compiler's choice
        return st.one_of(small_text, st.booleans(), st.lists(st.integers(1, 64), max_size=2), any_float,
                         st.integers(-100, 100).filter(lambda v: v not in (1, 2, 4, 8, 16, 32)))
    return st.one_of(*base, any_float, st.integers(-100, 0),
                     st.integers(3, 100).filter(lambda v: v & (v - 1)))     # pack


def insert_at(draw, d: dict, key, value) -> dict:
    """``d`` with ``key: value`` added at a random position."""
    items = list(d.items())
    items.insert(draw(st.integers(0, len(items))), (key, value))
    return dict(items)


def wrap_in_list(draw, d: dict, key: str, bad, default):
    """Replace ``d[key]`` by ``bad``, or (plain specs, expanding keys) put ``bad`` into a list
    of the key's valid values; returns the path the error must name."""
    if key in EXPANDING and "layers" not in d and draw(st.booleans()):
        current = d.get(key, default)
        options = list(current) if isinstance(current, list) else [current]
        i = draw(st.integers(0, len(options)))
        options.insert(i, bad)
        d[key] = options
        return f"{key}[{i}]"
    d[key] = bad
    return key


def layer_entries(d):
    """(base path, list) of the per-layer windows of a model spec."""
    layers = d["layers"]
    return ("layers", layers) if isinstance(layers, list) else ("layers.pattern", layers["pattern"])


COMMON_KINDS = ["unknown_top", "non_str_key", "duplicate", "missing", "name", "description",
                "causal", "gqa", "head_dim", "dtype", "softcap", "flag", "scale", "tiles_type",
                "tiles_unknown", "tiles_non_str_key", "tiles_value", "empty_list"]
PLAIN_KINDS = ["window", "window_unknown"]
MODEL_KINDS = ["layers_type", "layers_unknown", "layers_missing", "count", "pattern_type",
               "layer_entry", "layer_window_unknown", "window_with_layers", "model_list"]


@st.composite
def mutated_specs(draw, kind: str):
    """(dict, extra text, expected path, message fragment or None) of an invalid spec: a
    valid spec with the one mutation ``kind``."""
    d, _ = draw(plain_specs() if kind in PLAIN_KINDS else model_specs() if kind in MODEL_KINDS
                else valid_specs)
    d = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
         for k, v in d.items()}
    model = "layers" in d
    if model and isinstance(d["layers"], dict):
        d["layers"]["pattern"] = list(d["layers"]["pattern"])
    extra, message = "", None

    if kind == "unknown_top":
        key = draw(unknown_keys.filter(lambda k: k not in TOP_KEYS))
        d = insert_at(draw, d, key, draw(junk))
        path, message = key, "unknown key"
    elif kind == "non_str_key":
        key = draw(non_str_keys)
        d = insert_at(draw, d, key, draw(junk))
        path, message = str(key), "keys must be strings"
    elif kind == "duplicate":
        key = draw(st.sampled_from(list(d)))
        extra = yaml.safe_dump({key: d[key]}, default_flow_style=False, sort_keys=False)
        path, message = key, "duplicate key"
    elif kind == "missing":
        key = draw(st.sampled_from(REQUIRED))
        del d[key]
        # The reader reports a missing key at the document (path ""), naming it in the message.
        path, message = "", f"missing required key {key!r}"
    elif kind == "name":
        d["name"] = draw(bad_names)
        path = "name"
    elif kind == "description":
        d["description"] = draw(not_str)
        path = "description"
    elif kind == "causal":
        bad = draw(st.one_of(small_text, any_float, st.none(), some_ints, some_dicts))
        path = wrap_in_list(draw, d, "causal", bad, True)
    elif kind == "gqa":
        path = wrap_in_list(draw, d, "gqa", draw(bad_gqa), None)
    elif kind == "head_dim":
        path = wrap_in_list(draw, d, "head_dim", draw(bad_head_dim), None)
    elif kind == "dtype":
        path = wrap_in_list(draw, d, "dtype", draw(bad_dtype), None)
    elif kind == "window":
        path = wrap_in_list(draw, d, "window", draw(bad_windows), None)
    elif kind == "window_unknown":
        key = draw(unknown_keys.filter(lambda k: k not in ("left", "right")))
        window = insert_at(draw, {"left": 1, "right": 1}, key, draw(junk))
        path = wrap_in_list(draw, d, "window", window, None) + f".{key}"
        message = "unknown key"
    elif kind == "softcap":
        d["softcap"] = draw(bad_positive_number)
        path = "softcap"
    elif kind == "flag":
        path = draw(st.sampled_from(FLAGS))
        d[path] = draw(not_bool)
    elif kind == "scale":
        # Any scale is an error without layers; with layers, a non-positive or non-number one.
        d["scale"] = draw(bad_positive_number if model else positive_numbers)
        path = "scale"
    elif kind == "tiles_type":
        d["tiles"] = draw(st.one_of(small_text, any_float, st.booleans(), some_ints, some_lists))
        path = "tiles"
    elif kind in ("tiles_unknown", "tiles_non_str_key"):
        key = draw(unknown_keys.filter(lambda k: k not in TILE_KEYS) if kind == "tiles_unknown"
                   else non_str_keys)
        d["tiles"] = insert_at(draw, d.get("tiles", {}), key, draw(junk))
        path, message = f"tiles.{key}", ("unknown key" if kind == "tiles_unknown"
                                         else "keys must be strings")
    elif kind == "tiles_value":
        key = draw(st.sampled_from(TILE_KEYS))
        d["tiles"] = {**d.get("tiles", {}), key: draw(bad_tile_value(key))}
        path = "tiles"
    elif kind == "empty_list":
        path = draw(st.sampled_from(["dtype", "layers"] if model else EXPANDING))
        if path == "layers" and isinstance(d["layers"], dict) and draw(st.booleans()):
            d["layers"]["pattern"], path = [], "layers.pattern"
        else:
            d[path] = []
    elif kind == "layers_type":
        d["layers"] = draw(st.one_of(small_text, any_float, st.booleans(), st.none(), some_ints))
        path = "layers"
    elif kind == "layers_unknown":
        key = draw(unknown_keys.filter(lambda k: k not in ("count", "pattern")))
        base, entries = layer_entries(d)
        layers = d["layers"] if base == "layers.pattern" else {"count": len(entries), "pattern": entries}
        d["layers"] = insert_at(draw, layers, key, draw(junk))
        path, message = f"layers.{key}", "unknown key"
    elif kind == "layers_missing":
        base, entries = layer_entries(d)
        d["layers"] = draw(st.sampled_from([{"count": len(entries)}, {"pattern": entries}, {}]))
        path = "layers"
    elif kind == "count":
        base, entries = layer_entries(d)
        d["layers"] = {"count": draw(bad_count), "pattern": entries}
        path = "layers.count"
    elif kind == "pattern_type":
        d["layers"] = {"count": 4, "pattern": draw(st.one_of(small_text, any_float, st.booleans(),
                                                             st.none(), some_ints, some_dicts))}
        path = "layers.pattern"
    elif kind == "layer_entry":
        base, entries = layer_entries(d)
        i = draw(st.integers(0, len(entries) - 1))
        entries[i] = draw(bad_windows)
        path = f"{base}[{i}]"
    elif kind == "layer_window_unknown":
        base, entries = layer_entries(d)
        i = draw(st.integers(0, len(entries) - 1))
        key = draw(unknown_keys.filter(lambda k: k not in ("left", "right")))
        entries[i] = insert_at(draw, {"left": 2, "right": 2}, key, draw(junk))
        path, message = f"{base}[{i}].{key}", "unknown key"
    elif kind == "window_with_layers":
        d = insert_at(draw, d, "window", draw(st.one_of(st.none(), causal_windows, bidir_windows)))
        path, message = "window", "not both"
    elif kind == "model_list":
        path = draw(st.sampled_from(["causal", "gqa", "head_dim"]))
        valid = {"causal": st.booleans(), "gqa": st.integers(1, 8),
                 "head_dim": st.sampled_from(HEAD_DIMS)}[path]
        d[path] = draw(st.lists(valid, max_size=3))
        message = None if not d[path] else f"one {path}"
    else:                                                               # pragma: no cover
        raise AssertionError(kind)
    return d, extra, path, message


def check_error(err: SpecError, text: str):
    assert isinstance(err, SpecError)
    assert err.source.startswith(SOURCE)
    assert str(err).startswith(SOURCE)
    if err.line is not None:                            # YAML breaks lines at all of these
        assert 1 <= err.line <= sum(map(text.count, "\n\r\x85\u2028\u2029")) + 1


@pytest.mark.parametrize("kind", COMMON_KINDS + PLAIN_KINDS + MODEL_KINDS)
@settings(SETTINGS, max_examples=40)
@given(data=st.data())
def test_invalid_specs_raise_spec_error_naming_the_key(kind, data):
    d, extra, path, message = data.draw(mutated_specs(kind), label="mutated spec")
    # extra lines (a duplicated key) follow a block mapping: after a one-line flow mapping
    # ({name: ..., gqa: 1}, what PyYAML writes for all-scalar values) they would be a second
    # document, a YAML error that names no key
    flow = False if extra else data.draw(st.sampled_from([False, None]), label="flow")
    text = dump(d, flow) + extra
    note(text)
    with pytest.raises(SpecError) as info:
        load(text)
    err = info.value
    note(f"{kind}: got path {err.path!r}, line {err.line}: {err}")
    check_error(err, text)
    assert err.path == path, f"{kind}: expected path {path!r}, got {err.path!r} ({err})"
    if path:
        assert err.line is not None
    if message:
        assert message in err.message


# ---------------------------------------------------------------------------------------
# Garbage text
# ---------------------------------------------------------------------------------------

YAMLISH = ["name: x", "name: t", "gqa: ", "4", "0", "-3", "head_dim: 64", "dtype: fp16",
           "dtype: ", "causal: ", "window: ", "layers: ", "count: ", "pattern: ", "tiles: ",
           "block_m: ", "pack: ", "softcap: ", "scale: ", "varlen: ", "left: ", "right: ",
           "\n", "\n  ", "  ", "- ", "---\n", "...\n", "{", "}", "[", "]", ", ", ": ", "? ",
           "&a ", "*a", "!!str ", "!!int ", "!!float ", "!!null ", "!!seq ", "!!map ",
           "!!python/object:os.system ", "!local ", "<<: ", "null", "true", "false", "~",
           "'", '"', "# c", "%YAML 1.1\n", "%TAG ! tag:x.org,2000:\n", "1.5", ".inf", ".nan",
           "0x10", "1_000", "12:30", "\t", "|\n", ">-\n", "\ufeff", "é", "\x00", "\\"]


def check_garbage(text: str):
    note(repr(text))
    try:
        result = load(text)
    except SpecError as err:
        check_error(err, text)
        event("SpecError")
        return
    assert isinstance(result, list) and all(isinstance(s, Spec) for s in result)
    event("loaded" if result else "loaded: no spec")


@SETTINGS
@given(st.text(max_size=200))
def test_garbage_text_loads_or_raises_spec_error(text):
    check_garbage(text)


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(YAMLISH), st.text(max_size=3)), max_size=40))
def test_yamlish_text_loads_or_raises_spec_error(tokens):
    check_garbage("".join(tokens))


@SETTINGS
@given(st.data())
def test_damaged_valid_text_loads_or_raises_spec_error(data):
    d, _ = data.draw(valid_specs)
    text = dump(d, data.draw(st.sampled_from([False, True, None])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        text = text[:i] + data.draw(st.one_of(st.sampled_from(YAMLISH), st.text(max_size=4))) + text[j:]
    check_garbage(text)


# ---------------------------------------------------------------------------------------
# Reader bugs the properties above found, each fixed and kept here as an example.
# ---------------------------------------------------------------------------------------

BASE = "name: t\ngqa: 4\nhead_dim: 128\ndtype: fp16\n"


def _raises_spec_error(text: str):
    with pytest.raises(SpecError) as info:
        load(text)
    assert str(info.value).startswith(SOURCE)
    return info.value


@pytest.mark.parametrize("text", ["&a [*a]\n", "&a {name: *a}\n", BASE + "window: &w [*w]\n"])
def test_recursive_alias_raises_spec_error(text):
    _raises_spec_error(text)


@pytest.mark.parametrize("text", [BASE + "window: 2001-13-45\n",          # ValueError
                                  BASE + "sinks: !!bool maybe\n",          # KeyError
                                  BASE + "softcap: !!float abc\n",         # ValueError
                                  BASE + "window: !!int ''\n",             # IndexError
                                  "!!int\n",                               # IndexError
                                  BASE + "window: !!timestamp foo\n"])     # AttributeError
def test_yaml_constructor_errors_raise_spec_error(text):
    _raises_spec_error(text)


@pytest.mark.parametrize("text", ["\x00", "\x1f" + BASE, BASE + "description: a\x07b\n"])
def test_non_printable_character_raises_spec_error(text):
    # Found by test_damaged_valid_text_...: PyYAML's ReaderError used to escape.
    _raises_spec_error(text)


@pytest.mark.parametrize("value", ["{a: 1}", "[[fp16]]", "[fp16, {a: 1}]"])
def test_unhashable_dtype_raises_spec_error(value):
    err = _raises_spec_error(BASE.replace("dtype: fp16", f"dtype: {value}"))
    assert err.path.startswith("dtype")


@pytest.mark.parametrize("extra", ["softcap: 1" + "0" * 400 + "\n",
                                   "scale: 1" + "0" * 400 + "\nlayers: [null]\n"])
def test_huge_integer_softcap_or_scale(extra):
    # Either answer is fine (accept as a huge number, or refuse with a SpecError); an
    # OverflowError is not.
    try:
        load(BASE + extra)
    except SpecError:
        pass


def test_float_head_dim_is_refused():
    err = _raises_spec_error(BASE.replace("head_dim: 128", "head_dim: 128.0"))
    assert err.path == "head_dim"


def test_float_num_ctas_is_refused():
    err = _raises_spec_error(BASE + "tiles: {num_ctas: 2.0}\n")
    assert err.path == "tiles"


def test_name_with_trailing_newline_is_refused():
    err = _raises_spec_error(BASE.replace("name: t", 'name: "t\\n"'))
    assert err.path == "name"


def test_model_spec_repeated_dtype_lists_each_kernel_once():
    (spec,) = load("name: m\ngqa: 1\nhead_dim: 64\ndtype: [bf16, bf16]\nlayers: [null]\n")
    assert len(spec.kernels) == len(set(spec.kernels)) == 1
