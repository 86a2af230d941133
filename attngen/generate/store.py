"""Where built kernels live: the directories, the lock and the typed manifest.

A build directory holds ``manifest.json`` (what the registry reads) and one package per
kernel, named by its canonical name.  The manifest records, for each kernel, the name it was
built under: when attngen, cuTile or the templates change, the spec's canonical name changes
with them and the entry is *stale* (:attr:`KernelEntry.stale`), never silently used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.mask import Mask
from ..core.variant import Features, KernelSpec
from ..core.version import __version__

MANIFEST = "manifest.json"
FORMAT = 1


class StoreError(RuntimeError):
    """A build directory that cannot be read as it is."""


def cache_root() -> Path:
    if os.environ.get("ATTNGEN_CACHE_DIR"):
        return Path(os.environ["ATTNGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attngen"


def default_out() -> Path:
    """Where `attngen build` writes and the registry looks, unless told otherwise."""
    return Path(os.environ["ATTNGEN_BUILD_DIR"]) if os.environ.get("ATTNGEN_BUILD_DIR") \
        else cache_root() / "build"


def jit_dir() -> Path:
    """Where kernels generated on demand go."""
    return cache_root() / "jit"


def cubin_name(name: str, arch: str) -> str:
    """The file of kernel ``name``'s cubin for ``arch`` (``name``: variant name + suffix)."""
    return f"{name}.{arch}.cubin"


@contextlib.contextmanager
def locked(directory: Path):
    """Hold the directory's lock (threads and processes)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class KernelEntry:
    """One built kernel: its spec, the name it was built under, its cubins."""

    name: str
    spec: KernelSpec
    cubins: tuple[str, ...] = ()
    compile_seconds: dict = field(default_factory=dict)   # arch -> seconds

    @property
    def stale(self) -> bool:
        """Built by another attngen, cuTile or template version than the one running."""
        return self.name != self.spec.name

    def to_dict(self) -> dict:
        return {"spec": self.spec.as_dict(), "cubins": list(self.cubins),
                "compile_seconds": {a: self.compile_seconds[a] for a in self.cubins
                                    if a in self.compile_seconds}}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "KernelEntry":
        return cls(name, KernelSpec.from_dict(data["spec"]), tuple(data.get("cubins", ())),
                   dict(data.get("compile_seconds", {})))


@dataclass(frozen=True)
class SpecEntry:
    """One spec document that was built: its kernels and, for a model, its layer map."""

    source: str
    description: str
    kernels: tuple[str, ...]
    layers: tuple[Mask, ...] | None = None
    scale: float | None = None
    gqa: int | None = None
    head_dim: int | None = None
    dtypes: tuple[str, ...] = ()
    features: Features | None = None

    @classmethod
    def of(cls, spec) -> "SpecEntry":
        """From a :class:`attngen.generate.spec.Spec`."""
        model = spec.layers is not None
        return cls(spec.source, spec.description, tuple(k.name for k in spec.kernels), spec.layers,
                   spec.scale, spec.gqa, spec.head_dim, tuple(spec.dtypes),
                   spec.kernels[0].features if model else None)

    def to_dict(self) -> dict:
        data = {"source": self.source, "description": self.description,
                "kernels": list(self.kernels), "layers": None}
        if self.layers is not None:
            data.update(layers=[m.as_dict() for m in self.layers], scale=self.scale, gqa=self.gqa,
                        head_dim=self.head_dim, dtypes=list(self.dtypes),
                        features=self.features.as_dict())
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SpecEntry":
        if data.get("layers") is None:
            return cls(data["source"], data["description"], tuple(data["kernels"]))
        return cls(data["source"], data["description"], tuple(data["kernels"]),
                   tuple(Mask(**m) for m in data["layers"]), data["scale"], data["gqa"],
                   data["head_dim"], tuple(data["dtypes"]), Features(**data["features"]))


@dataclass(frozen=True)
class Manifest:
    kernels: dict = field(default_factory=dict)     # name -> KernelEntry
    specs: dict = field(default_factory=dict)       # spec name -> SpecEntry

    def to_dict(self) -> dict:
        return {"format": FORMAT, "attngen": __version__,
                "kernels": {n: e.to_dict() for n, e in self.kernels.items()},
                "specs": {n: e.to_dict() for n, e in self.specs.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        return cls({n: KernelEntry.from_dict(n, e) for n, e in data["kernels"].items()},
                   {n: SpecEntry.from_dict(e) for n, e in data["specs"].items()})


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return Manifest()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} cannot be read ({exc}); rebuild with `attngen build SPEC... "
                         f"--out {directory}`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StoreError(f"{path}: manifest format {found} is not {FORMAT}; "
                         f"rebuild with `attngen build`")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"{path} is not a whole manifest ({type(exc).__name__}: {exc}); rebuild "
                         f"with `attngen build SPEC... --out {directory}`") from None


def manifest_text(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n"
