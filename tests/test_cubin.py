"""attngen.generate.cubin: what a cubin records of its kernel, read from its ELF sections
(cubins made by hand here; tests/test_prebuilt.py reads the tile compiler's)."""
import pytest

from attngen.generate.cubin import KernelInfo, kernel_info

from conftest import fake_cubin


def test_registers_local_memory_and_threads_are_read(tmp_path):
    assert kernel_info(fake_cubin(168, 720, 256)) == KernelInfo(168, 720, 256)
    path = tmp_path / "k.sm_90.cubin"
    path.write_bytes(fake_cubin(80))
    assert kernel_info(path) == KernelInfo(80, 0, 128)


def test_what_is_not_a_cubin_is_refused_by_name():
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        kernel_info(b"x" * 80)
    with pytest.raises(ValueError, match="no register count"):
        kernel_info(fake_cubin().replace(bytes([0x04, 0x2F]), bytes([0x04, 0x2E])))
    unknown = fake_cubin().replace(bytes([0x03, 0x1B]), bytes([0x07, 0x1B]))
    with pytest.raises(ValueError, match="unknown .nv.info attribute format 0x7"):
        kernel_info(unknown)
