"""The paged forward's ways of reading a KV block, timed against each other and against the
contiguous varlen kernel on the same keys, each output checked against the shipped kernel's
(GPU); or, without a GPU, compiled for sm_90 with a count of what each kernel's key loop
stores to shared memory (a loop that stores there has routed a tile through registers).

    python scripts/paged_loop_variants.py            # on the GPU
    python scripts/paged_loop_variants.py --compile  # CPU: compile, count the key loops' stores

Shape: Mistral-7B's attention (32 query heads, 8 KV heads, D = 128, bf16, W = 4096), prefill
of 4 x 8192 tokens and 64 decode steps at 8k keys, pages shuffled.  Kernels:

* ``whole`` (shipped, pages a multiple of 64 keys): one load each for a block's K and V;
* ``pieces`` (shipped, any page size): the block read as four 16-key pieces, each with its
  own Q.K^T and P.V matmul (16 keys wide), one softmax step over the block;
* ``whole_ahead``: ``whole`` with each block's page read four blocks before its loads;
* ``pieces_low_hints``: ``pieces`` with a whole block's latency hints (2 and 4).

docs/performance.md, "Serving from a paged cache", has a run.
"""
import argparse
import importlib.util
import re
import tempfile
from pathlib import Path

from attngen.core.mask import Mask
from attngen.core.variant import Features, KernelSpec
from attngen.runtime.registry import default_registry

#: the shape timed: the shipped paged variant, and the contiguous (varlen) one beside it
PAGED = KernelSpec.tuned(Mask(True, 4095), 4, 128, "bf16", Features(paged=True))
CONTIGUOUS = KernelSpec.tuned(Mask(True, 4095), 4, 128, "bf16", Features(chunked=True, varlen=True))
AHEAD = 4  # blocks between a page's read and the loads it addresses
LOOP = "    for j in range(first, stop):\n"
TAIL = "    if stop < last:\n"


def kernel_source(src: str, suffix: str) -> tuple[int, int]:
    """Where (start, end) the kernel of ``suffix`` ("" or "_pieces") is in the module ``src``."""
    start = src.index(f"def {PAGED.name}{suffix}(")
    end = src.find("\n@ct.kernel", start)
    return start, len(src) if end < 0 else end


def main_loop(src: str, suffix: str) -> tuple[int, int]:
    """Where the main key loop of kernel ``suffix`` is (its ``for`` line to the tail block)."""
    start, end = kernel_source(src, suffix)
    loop = src.index(LOOP, start, end)
    return loop, src.index(TAIL, loop, end)


def whole_ahead(loop: str) -> str:
    """The whole-block kernel's loop with each block's page read AHEAD blocks before its loads
    (a block past the loop reads the last whole block's page, unused)."""
    page_of = lambda block: f"ct.gather(Pages, (b, min({block}, max(seq // BLOCK_N - 1, 0)) * BLOCK_N // page))"  # noqa: E731,E501
    before = "".join(f"    w{r} = {page_of(f'first + {r}')}\n" for r in range(AHEAD))
    shift = "        pg = w0\n" + "".join(f"        w{r} = w{r + 1}\n" for r in range(AHEAD - 1))
    shift += f"        w{AHEAD - 1} = {page_of(f'j + {AHEAD}')}\n"
    row = re.search(r"        row = ct\.gather\(Pages, \(b, j \* BLOCK_N // page\)\)", loop)
    return before + loop[:row.start()] + shift + "        row = pg" + loop[row.end():]


def sources(src: str):
    """(label, kernel suffix, module source) of each variant of the shipped module ``src``."""
    yield "whole", "", src
    yield "pieces", "_pieces", src
    a, b = main_loop(src, "")
    yield "whole_ahead", "", src[:a] + whole_ahead(src[a:b]) + src[b:]
    a, b = main_loop(src, "_pieces")
    loop = src[a:b].replace("latency=8)", "latency=2)").replace("latency=10)", "latency=4)")
    yield "pieces_low_hints", "_pieces", src[:a] + loop + src[b:]


def load(label: str, text: str, where: str):
    path = Path(where) / f"{label}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(label, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def key_loop_stores(cubin: str) -> tuple[int, int]:
    """(instructions, element stores to shared memory) of ``cubin``'s key loop
    (:mod:`attngen.generate.sass`; tests/test_prebuilt.py asserts the shipped whole-block
    kernels' store nothing)."""
    from attngen.generate.sass import disassemble, element_store, key_loop
    body = key_loop(disassemble(cubin))
    return len(body), sum(map(element_store, body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="only compile each variant for sm_90 (no GPU)")
    args = ap.parse_args()
    spec = PAGED
    launcher = default_registry.module(spec)
    src = Path(launcher.__file__).with_name("kernel.py").read_text()
    where = tempfile.mkdtemp(prefix="paged-loops")
    variants = {label: (suffix, load(label, text, where)) for label, suffix, text in sources(src)}
    if args.compile:
        from attngen.generate.aot import export
        for label, (suffix, module) in variants.items():
            cubin = f"{where}/{label}.cubin"
            export(getattr(module, spec.name + suffix), spec, "sm_90", cubin, spec.kernels[suffix])
            size, stores = key_loop_stores(cubin)
            print(f"{label:18} compiled; key loop {size} instructions, {stores} element stores to shared memory",
                  flush=True)
        return

    import cuda.tile as ct
    import torch

    from attngen.bench.paged import _median, paged_inputs
    from attngen.runtime.inputs import launch_grid, scale_arg
    print(torch.cuda.get_device_name(), spec.name, flush=True)
    contiguous = default_registry.module(CONTIGUOUS)
    for what, lengths, q_lens, page_sizes in (("prefill 4 x 8192", [8192] * 4, [8192] * 4, (256, 64, 16)),
                                              ("decode 64 x 8k", [8192] * 64, [1] * 64, (64, 16))):
        for page in page_sizes:
            q, kc, vc, cu_q, used, table, k, v, cu_k = paged_inputs(lengths, q_lens, page, torch.bfloat16)
            shipped = lambda: launcher.infer(q, kc, vc, cu_q, used, table, max_seqlen_q=max(q_lens),  # noqa: E731
                                             check=False, splits=1)
            want = shipped()
            flat = lambda: contiguous.infer(q, k, v, cu_q, cu_k, max_seqlen_q=max(q_lens),  # noqa: E731
                                            max_seqlen_k=max(lengths))
            err = (flat().float() - want.float()).abs().max().item()
            print(f"== {what}, page {page}: contiguous varlen {_median(flat):9.1f} us (max |diff| vs shipped "
                  f"{err:.2e}), shipped paged {_median(shipped):9.1f} us", flush=True)
            rows = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
            tiles, pairs = -(-max(q_lens) // launcher.POSITIONS), len(lengths) * q.shape[1] // launcher.PACK
            for label, (suffix, module) in variants.items():
                if page % launcher.BLOCK_N and not suffix:
                    continue                      # a whole-block kernel takes pages of whole blocks only
                out = torch.empty_like(q)
                kernel = getattr(module, spec.name + suffix)
                run = lambda: ct.launch(torch.cuda.current_stream(), launch_grid(tiles, pairs), kernel,  # noqa: E731
                                        (q, rows(kc), rows(vc), out, cu_q, used, table, page, scale_arg(None, 128)))
                run()
                torch.cuda.synchronize()
                err = (out.float() - want.float()).abs().max().item()
                print(f"   {label:18} {_median(run):9.1f} us   max |diff| vs shipped {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
