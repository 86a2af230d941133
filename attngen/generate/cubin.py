"""What a cubin records of its kernel: the registers a thread is given, the local memory a
thread uses (registers the compiler spilled), and the threads a program runs.  Read from the
cubin's ELF ``.nv.info`` sections, with no tool: `attngen build` reads every kernel it compiles
and says which spill.

The ``.nv.info`` sections are lists of attributes, each 4-byte aligned: a format byte, an
attribute byte, then by format nothing (``0x01``), one byte and a pad byte (``0x02``), a
16-bit value (``0x03``), or a 16-bit size and that many bytes (``0x04``).  The per-kernel
values this reads are sized ones holding (symbol index, value) pairs, or for the thread
count (x, y, z).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_REGCOUNT, _FRAME_SIZE, _REQNTID = 0x2F, 0x11, 0x10


@dataclass(frozen=True)
class KernelInfo:
    registers: int      # registers a thread is given
    local_bytes: int    # local memory a thread uses (its stack frame): registers spilled
    threads: int        # threads a program runs (0: not recorded)


def _sections(elf: bytes) -> dict[str, bytes]:
    """The named sections of a 64-bit little-endian ELF file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file (a cubin)")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx]
    strings = elf[names[4]:names[4] + names[5]]
    return {strings[h[0]:strings.index(b"\0", h[0])].decode(): elf[h[4]:h[4] + h[5]] for h in headers}


def _attributes(section: bytes) -> dict[int, bytes]:
    """An ``.nv.info`` section's attributes: id -> value bytes (the last of each id)."""
    found, at = {}, 0
    while at + 2 <= len(section):
        fmt, attr = section[at], section[at + 1]
        if fmt == 0x04:
            size, = struct.unpack_from("<H", section, at + 2)
            found[attr] = section[at + 4:at + 4 + size]
            at += 4 + size
        elif fmt in (0x01, 0x02, 0x03):
            found[attr] = section[at + 2:at + 4]
            at += 4
        else:
            raise ValueError(f"unknown .nv.info attribute format {fmt:#x} at byte {at}")
    return found


def kernel_info(cubin: Path | bytes) -> KernelInfo:
    """The attributes of the one kernel in ``cubin`` (a path or its bytes)."""
    elf = cubin if isinstance(cubin, bytes) else Path(cubin).read_bytes()
    sections = _sections(elf)
    shared = _attributes(sections.get(".nv.info", b""))
    if _REGCOUNT not in shared:
        raise ValueError("the cubin records no register count (.nv.info)")
    value = lambda attr: struct.unpack_from("<I", shared[attr], 4)[0] if attr in shared else 0  # noqa: E731
    threads = 0
    for name, section in sections.items():
        if name.startswith(".nv.info.") and _REQNTID in (own := _attributes(section)):
            x, y, z = struct.unpack_from("<III", own[_REQNTID])
            threads = x * y * z
    return KernelInfo(value(_REGCOUNT), value(_FRAME_SIZE), threads)
