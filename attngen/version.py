"""What, besides its spec, decides a generated kernel: attngen's version, cuTile's version
and the template sources.  :func:`fingerprint` folds them into every canonical name, so a
kernel built by another version is never mistaken for the current one."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources
from pathlib import Path

__version__ = "0.1.0"

TEMPLATES = ("kernel.py.j2", "launcher.py.j2", "test_variant.py.j2")


def template_dir():
    """``templates/`` of the checkout; in an installed wheel, its copy ``attngen.templates``."""
    checkout = Path(__file__).resolve().parent.parent / "templates"
    return checkout if checkout.is_dir() else resources.files("attngen.templates")


@functools.lru_cache(maxsize=1)
def template_sources() -> dict[str, str]:
    root = template_dir()
    return {name: (root / name).read_text() for name in TEMPLATES}


def cutile_version() -> str:
    try:
        return metadata.version("cuda-tile")
    except metadata.PackageNotFoundError:
        return "absent"


def environment(device="cuda") -> dict:
    """What a measurement ran on: the device (a GPU's name, else the CPU's) and the versions
    of torch, CUDA, cuTile, attngen and Python."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_tile": cutile_version(), "attngen": __version__, "python": platform.python_version()}


@functools.lru_cache(maxsize=1)
def fingerprint() -> str:
    digest = hashlib.sha256(f"attngen {__version__}\ncuda-tile {cutile_version()}\n".encode())
    for name, text in sorted(template_sources().items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()
