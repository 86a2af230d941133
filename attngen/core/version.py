"""What, besides its spec, decides a generated kernel: attngen's version, the generator's own
code (the modules that shape what is generated and compiled), the template sources, and the
versions of cuTile and of the tile compiler (tileiras).  :func:`fingerprint` folds them into
every canonical name, so a kernel built by another version -- or by an edited checkout -- is
never mistaken for the current one."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources
from pathlib import Path

__version__ = "0.1.0"

TEMPLATES = ("kernel.py.j2", "launcher.py.j2", "test_variant.py.j2")
PACKAGE = Path(__file__).resolve().parent.parent     # attngen/
# the modules whose code shapes a generated package or its cubins (what the templates are
# given, the parameters, tiles and masks, the AOT signatures, the generated test cases)
GENERATOR = ("generate/aot", "generate/cases", "generate/codegen", "core/mask", "core/support",
             "core/tuning", "core/variant", "core/version")


def template_dir():
    """``templates/`` of the checkout; in an installed wheel, its copy ``attngen.templates``."""
    checkout = PACKAGE.parent / "templates"
    return checkout if checkout.is_dir() else resources.files("attngen.templates")


@functools.lru_cache(maxsize=1)
def template_sources() -> dict[str, str]:
    root = template_dir()
    return {name: (root / name).read_text() for name in TEMPLATES}


@functools.lru_cache(maxsize=1)
def generator_sources() -> dict[str, str]:
    return {f"{name}.py": (PACKAGE / f"{name}.py").read_text() for name in GENERATOR}


@functools.lru_cache(maxsize=1)
def tileiras_version() -> str:
    """The version banner of the tileiras cuTile compiles with (as cuTile's own cache keys
    on it), or "absent"."""
    try:
        from cuda.tile._compile import _get_compiler_version_string

        return (_get_compiler_version_string() or "absent").strip()
    except Exception:                    # noqa: BLE001 - no compiler, or cuTile changed
        return "absent"


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
    digest = hashlib.sha256(f"attngen {__version__}\ncuda-tile {cutile_version()}\n"
                            f"tileiras {tileiras_version()}\n".encode())
    for name, text in sorted({**template_sources(), **generator_sources()}.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()
