"""Reading a built kernel's machine code (its sm_90 SASS, from ``nvdisasm``, which the
``[test]`` extra installs): where its key loop is and what that loop stores to shared memory.

A tile that a kernel changes in registers between its load and a matmul (values masked,
pieces concatenated) goes back to shared memory element by element, every KV block, with
every answer still right; the paged forward lost two thirds of its speed that way.  A kernel
whose tiles ask for more programs an SM than its registers allow spills them to local
memory (:func:`spills`; :mod:`attngen.generate.cubin` reads how much, and the registers, from
the cubin itself).  The tests read the built forward kernels with :func:`key_loop`,
:func:`element_store` and :func:`spills`; ``scripts/sass_report.py`` prints, for every kernel
of a build, these counts and its key loop's :func:`schedule`.
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


def instructions(sass: str) -> list[str]:
    """The instructions of nvdisasm's listing, in order."""
    return _listing(sass)[0]


def _listing(sass: str) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    """The instructions of nvdisasm's listing, where each label is, and each branch (its
    target label, its index)."""
    instructions, labels, branches = [], {}, []
    for line in sass.splitlines():
        if label := re.match(r"\s*\.L_x_(\d+):", line):
            labels[label.group(1)] = len(instructions)
        elif op := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instructions.append(op.group(1))
            if branch := re.search(r"BRA\s+`\(\.L_x_(\d+)\)", op.group(1)):
                branches.append((branch.group(1), len(instructions) - 1))
    return instructions, labels, branches


def key_loop(sass: str) -> list[str]:
    """The instructions of a kernel's key loop: of the innermost loops that run a matmul
    (:func:`matmul`), the one that runs the most.  The blocks past the kernel's last EXIT
    (barrier waits' slow paths, which branch back into the code) are not loops."""
    ops, labels, branches = _listing(sass)
    exits = [i for i, op in enumerate(ops) if op == "EXIT"]
    if not exits:
        raise ValueError("no EXIT in this SASS: not a kernel nvdisasm -c printed")
    matmuls = lambda start, end: sum(map(matmul, ops[start:end + 1]))  # noqa: E731
    loops = [(labels[target], i) for target, i in branches
             if i < exits[-1] and labels.get(target, i) < i and matmuls(labels[target], i)]
    innermost = [(start, end) for start, end in loops
                 if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in loops)]
    if not innermost:
        raise ValueError("no loop of this kernel runs a matmul")
    start, end = max(innermost, key=lambda loop: matmuls(*loop))
    return ops[start:end + 1]


def matmul(instruction: str) -> bool:
    """Whether an instruction is a tensor-core matmul step: HGMMA (a warpgroup's, 64 rows) or,
    for tiles of fewer rows, HMMA (a warp's)."""
    return opcode(instruction).startswith(("HGMMA", "HMMA"))


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


def spills(sass: str) -> int:
    """How many instructions of a kernel load or store local memory (LDL, STL): registers
    the compiler spilled.  A kernel that spills also tends to wait for each matmul step on
    its own (see :func:`schedule`)."""
    return sum(opcode(op).startswith(("LDL", "STL")) for op in instructions(sass))


#: what :func:`schedule` shows of a loop, by opcode prefix; every other instruction is left out
_SHOWN = (("HGMMA", "mma"), ("HMMA", "mma"), ("WARPGROUP.DEPBAR", "wait"),
          ("SYNCS.PHASECHK", "load"), ("MUFU", "exp"), ("FSEL", "sel"), ("LDL", "spill"), ("STL", "spill"))


def schedule(loop: list[str]) -> str:
    """A loop's order of work in a line: ``mma`` a matmul instruction (:func:`matmul`; an
    HGMMA is one 16-deep step of a warpgroup's matmul), ``wait`` the warpgroup waiting for its
    matmuls (``wait1``: until one group is left running), ``load`` a wait for a tile's load,
    ``exp`` an exponential (MUFU), ``sel`` a select (a mask), ``sts`` an element store to
    shared memory, ``spill`` a local-memory access; runs are counted (``mma x8``).  The
    forward's key loop at head dim 128 reads ``wait, load, mma x8, wait, sel x128, exp x66,
    load, mma x8, wait``: each matmul is waited for before the next work starts."""
    words = []
    for op in loop:
        code = opcode(op)
        word = next((name for prefix, name in _SHOWN if code.startswith(prefix)), None)
        if element_store(op):
            word = "sts"
        if word == "wait" and not op.endswith("0x0"):
            word = "wait" + str(int(op.split()[-1], 16))
        if word is None:
            continue
        if words and words[-1][0] == word:
            words[-1][1] += 1
        else:
            words.append([word, 1])
    return ", ".join(word if n == 1 else f"{word} x{n}" for word, n in words)
