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
    """The launchers whose generated kernels really ran (one entry, the launcher's name, per
    inference, forward or backward call, through the ops or directly), to tell attngen from a
    silent fallback to PyTorch: every such call assembles its launcher's arguments here."""
    from attngen.runtime import ops

    runs = []
    assemble = ops._arguments

    def counted(module, *args):
        runs.append(module.NAME)
        return assemble(module, *args)

    monkeypatch.setattr(ops, "_arguments", counted)
    return runs


def fake_cubin(registers=64, local_bytes=0, threads=128, name="k") -> bytes:
    """A minimal cubin: an ELF file whose .nv.info sections record what a compiled kernel's do
    (a register count and a frame size, each as a (symbol, value) pair; a thread count)."""
    import struct

    def sized(attr, payload):
        return struct.pack("<BBH", 0x04, attr, len(payload)) + payload

    shared = (struct.pack("<BBH", 0x01, 0x2A, 0)                             # a valueless attribute
              + sized(0x2F, struct.pack("<II", 7, registers)) + sized(0x11, struct.pack("<II", 7, local_bytes))
              + struct.pack("<BBH", 0x03, 0x1B, 255))                        # a 16-bit one (max registers)
    own = struct.pack("<BBBB", 0x02, 0x50, 1, 0) + sized(0x10, struct.pack("<III", threads, 1, 1))
    names = [b"", b".shstrtab", b".nv.info", f".nv.info.{name}".encode()]
    strtab = b"\0".join(names) + b"\0"
    offsets = [strtab.index(n + b"\0", 1) if n else 0 for n in names]
    bodies = [b"", strtab, shared, own]
    data, positions = b"", []
    for body in bodies:
        positions.append(64 + len(data))
        data += body + b"\0" * (-len(body) % 8)
    shoff = 64 + len(data)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, 190, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(bodies), 1))
    sections = b"".join(struct.pack("<IIQQQQIIQQ", offsets[i], 0 if i == 0 else 3 if i == 1 else 0x70000000,
                                    0, 0, positions[i] if i else 0, len(bodies[i]), 0, 0, 1, 0)
                        for i in range(len(bodies)))
    return header + data + sections
