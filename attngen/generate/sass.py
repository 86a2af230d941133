"""Reading a built kernel's machine code (its sm_90 SASS, from ``nvdisasm``, which the
``[test]`` extra installs): where its key loop is and what that loop stores to shared memory.

A tile that a kernel changes in registers between its load and a matmul (values masked,
pieces concatenated) goes back to shared memory element by element, every KV block, with
every answer still right; the paged forward lost two thirds of its speed that way.  The
tests read the built forward kernels with :func:`key_loop` and :func:`element_store`, and
``scripts/paged_loop_variants.py --compile`` prints the same counts for its loop variants.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def nvdisasm() -> str:
    """The path of ``nvdisasm``: the pip package's (nvidia-cuda-nvdisasm), else one on PATH."""
    try:
        import nvidia
        found = [str(p) for root in nvidia.__path__ for p in Path(root).glob("cu*/bin/nvdisasm")]
    except ImportError:
        found = []
    found = found or [shutil.which("nvdisasm")]
    if not found[0]:
        raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (in attngen's [test] extra)")
    return found[0]


def disassemble(cubin) -> str:
    """The SASS of a cubin file, as ``nvdisasm -c`` prints it."""
    return subprocess.run([nvdisasm(), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def key_loop(sass: str) -> list[str]:
    """The instructions of the innermost loop of a kernel's SASS that runs a matmul (HGMMA):
    the kernel's key loop.  The blocks past the kernel's last EXIT (barrier waits' slow paths,
    which branch back into the code) are not loops."""
    instructions, labels, back_edges = [], {}, []
    for line in sass.splitlines():
        if label := re.match(r"\s*\.L_x_(\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif op := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instructions.append(op.group(1))
            if branch := re.search(r"BRA\s+`\(\.L_x_(\d+)\)", op.group(1)):
                back_edges.append((branch.group(1), len(instructions) - 1))
    exits = [i for i, op in enumerate(instructions) if op == "EXIT"]
    if not exits:
        raise ValueError("no EXIT in this SASS: not a kernel nvdisasm -c printed")
    loops = [instructions[labels[target]:i + 1] for target, i in back_edges
             if i < exits[-1] and labels.get(target, i) < i]
    loops = [body for body in loops if any("HGMMA" in op for op in body)]
    if not loops:
        raise ValueError("no loop of this kernel runs a matmul")
    return min(loops, key=len)


def opcode(instruction: str) -> str:
    """An instruction's opcode, past its predicate (``@P0 STS.U16 [R3], R5`` -> ``STS.U16``)."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def element_store(instruction: str) -> bool:
    """Whether an instruction stores registers to shared memory a few elements at a time
    (STS, STS.U16, STS.128), as a tile changed in registers goes back there; STSM, which
    stores whole 8x8 matrices, is how the compiler hands the probabilities to a matmul."""
    op = opcode(instruction)
    return op.startswith("STS") and not op.startswith("STSM")
