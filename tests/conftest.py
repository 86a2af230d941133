from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "variants").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never read or write the user's ~/.cache/attngen from the unit tests."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNGEN_PATH", raising=False)
    monkeypatch.delenv("ATTNGEN_BUILD_DIR", raising=False)
    monkeypatch.delenv("ATTNGEN_JIT", raising=False)


@pytest.fixture
def device():
    """Where a GPU test runs attngen's kernels: the GPU, or with ATTNGEN_EMULATE=1 the CPU,
    in attngen's emulator of them (attngen.emulator)."""
    from attngen.testing import kernel_device

    with kernel_device() as where:
        yield where


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def attngen_runs(monkeypatch):
    """The variants whose generated kernels really ran (one entry per inference, forward or
    backward call of a launcher, through the ops or directly), to tell attngen from a silent
    fallback to PyTorch: every real run of the ``attngen::`` ops resolves its launcher here."""
    from attngen.runtime import ops

    runs = []
    find = ops._module

    def counted(variant, *args):
        runs.append(variant)
        return find(variant, *args)

    monkeypatch.setattr(ops, "_module", counted)
    return runs
