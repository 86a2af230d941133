"""The paged forward's key loop, rewritten several ways (how a block's cache rows are found and
loaded), each timed against the shipped paged kernel and the contiguous varlen kernel on the
same keys, and checked against the shipped kernel's output (GPU).

    python scripts/paged_loop_variants.py            # on the GPU
    python scripts/paged_loop_variants.py --compile  # CPU: compile every variant for sm_90 only

Shape: Mistral-7B's attention (32 query heads, 8 KV heads, D = 128, bf16, W = 4096), prefill
of 4 x 8192 tokens and 64 decode steps at 8k keys, pages shuffled.  Variants:

* ``low_hints``: the shipped pieces with a contiguous block's latency hints (2 and 4);
* ``v_first``: a block's value pieces issued with its key pieces, before Q.K^T;
* ``pieces_ahead``: each piece's page read four blocks ahead of its load;
* ``one_load`` (pages a multiple of 64): one 64-key load a block; ``one_load_ahead`` with its
  page read four blocks ahead;
* ``affine_bound``: one load whose address is the loop index (wrong keys): what the kernel
  costs with no page lookup at all;
* ``gather + varlen``: the sequences' pages copied contiguous, then the varlen kernel.

docs/performance.md, "Serving from a paged cache", has a run.
"""
import argparse
import importlib.util
import tempfile
from pathlib import Path

from attngen.core.mask import Mask
from attngen.core.variant import Features, KernelSpec
from attngen.runtime.registry import default_registry

#: the shape timed: the shipped paged variant, and the contiguous (varlen) one beside it
PAGED = KernelSpec.tuned(Mask(True, 4095), 4, 128, "bf16", Features(paged=True))
CONTIGUOUS = KernelSpec.tuned(Mask(True, 4095), 4, 128, "bf16", Features(chunked=True, varlen=True))
AHEAD = 4  # blocks between a page's read and the load it addresses
LOOP = "    for j in range(first, last):\n"
PIECE_K = ("ct.load(K, index=(0, hp, {p}), shape=(HEAD_DIM, 1, PAGE_ROWS), order=(2, 1, 0), "
           "padding_mode=ZERO, latency=8).reshape((HEAD_DIM, PAGE_ROWS))")
PIECE_V = ("ct.load(V, index=({p}, hp, 0), shape=(PAGE_ROWS, 1, HEAD_DIM), padding_mode=ZERO, "
           "latency=10).reshape((PAGE_ROWS, HEAD_DIM))")
ONE_K = ("        k = ct.load(K, index=(0, hp, row // BLOCK_N), shape=(HEAD_DIM, 1, BLOCK_N), order=(2, 1, 0), "
         "padding_mode=ZERO, latency=2).reshape((HEAD_DIM, BLOCK_N))\n")
ONE_V = ("        v = ct.load(V, index=(row // BLOCK_N, hp, 0), shape=(BLOCK_N, 1, HEAD_DIM), padding_mode=ZERO, "
         "latency=4).reshape((BLOCK_N, HEAD_DIM))\n")
K_CAT = "        k = ct.cat((ct.cat((k0, k1), 1), ct.cat((k2, k3), 1)), 1)\n"
V_CAT = "        v = ct.cat((ct.cat((v0, v1), 0), ct.cat((v2, v3), 0)), 0)\n"


def page_of(block: str, piece: int = 0) -> str:
    """The page holding piece ``piece`` of KV block ``block`` (clamped to the sequence)."""
    return f"ct.gather(Pages, (b, min({block} * BLOCK_N + {16 * piece}, seq - 1) // page))"


def rewritten_loops() -> dict[str, tuple[str, str]]:
    """Each variant's key part (loop head to the block's K) and value part (its V)."""
    def pieces(head: str, address) -> tuple[str, str]:
        body = LOOP + head + "".join(f"        n{i} = j * BLOCK_N + {16 * i}\n        piece{i} = {address(i)}\n"
                                     for i in range(4))
        body += "".join(f"        k{i} = {PIECE_K.format(p=f'piece{i}')}\n" for i in range(4)) + K_CAT
        return body, "".join(f"        v{i} = {PIECE_V.format(p=f'piece{i}')}\n" for i in range(4)) + V_CAT

    out = {}
    out["one_load"] = (LOOP + f"        row = {page_of('j')} * page + (j * BLOCK_N) % page\n" + ONE_K, ONE_V)
    before = "".join(f"    w{r} = {page_of(f'(first + {r})')}\n" for r in range(AHEAD))
    shift = "".join(f"        w{r} = w{r + 1}\n" for r in range(AHEAD - 1))
    shift += f"        w{AHEAD - 1} = {page_of(f'(j + {AHEAD})')}\n"
    out["one_load_ahead"] = (before + LOOP + "        pg = w0\n" + shift
                             + "        row = pg * page + (j * BLOCK_N) % page\n" + ONE_K, ONE_V)
    before = "".join(f"    w{r}_{i} = {page_of(f'(first + {r})', i)}\n" for r in range(AHEAD) for i in range(4))
    head = "".join(f"        pg{i} = w0_{i}\n" for i in range(4))
    head += "".join(f"        w{r}_{i} = w{r + 1}_{i}\n" for r in range(AHEAD - 1) for i in range(4))
    head += "".join(f"        w{AHEAD - 1}_{i} = {page_of(f'(j + {AHEAD})', i)}\n" for i in range(4))
    k, v = pieces(head, lambda i: f"(pg{i} * page + n{i} % page) // PAGE_ROWS")
    out["pieces_ahead"] = (before + k, v)
    out["affine_bound"] = (LOOP + "        row = j * BLOCK_N\n" + ONE_K, ONE_V)
    return out


def sources(src: str):
    """(label, kernel source) of every variant of the shipped kernel source ``src``."""
    start = src.index(LOOP)
    end = src.index("        s = ct.mma(q, k,", start)
    v_start = src.index("        v0 = ct.load(V", end)
    v_end = src.index("        if (j + 1) * BLOCK_N > seq:", v_start)
    loop = src[start:v_end]
    yield "low_hints", src[:start] + loop.replace("latency=8)", "latency=2)").replace("latency=10)", "latency=4)") \
        + src[v_end:]
    v_cat, k_cat = src.index("        v = ct.cat(", v_start), src.index("        k = ct.cat(", start)
    yield "v_first", src[:k_cat] + src[v_start:v_cat] + src[k_cat:v_start] + src[v_cat:]
    for label, (k_part, v_part) in rewritten_loops().items():
        yield label, src[:start] + k_part + src[end:v_start] + v_part + src[v_end:]


def load(label: str, text: str, where: str):
    path = Path(where) / f"{label}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(label, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="only compile each variant for sm_90 (no GPU)")
    args = ap.parse_args()
    spec = PAGED
    launcher = default_registry.module(spec)
    src = Path(launcher.__file__).with_name("kernel.py").read_text()
    where = tempfile.mkdtemp(prefix="paged-loops")
    modules = {label: load(label, text, where) for label, text in sources(src)}
    if args.compile:
        from attngen.generate.aot import export
        for label, module in modules.items():
            export(getattr(module, spec.name), spec, "sm_90", f"{where}/{label}.cubin", spec.kernels[""])
            print(label, "compiled", flush=True)
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
            print(f"== {what}, page {page}: contiguous varlen {_median(flat):9.1f} us, shipped paged "
                  f"{_median(shipped):9.1f} us", flush=True)
            if what.startswith("prefill"):
                used_pages = table[:, :-(-max(lengths) // page)]     # the table's columns that hold keys
                copy = lambda: [c[used_pages].flatten(0, 2) for c in (kc, vc)]  # noqa: E731

                def gathered():
                    kg, vg = copy()
                    return contiguous.infer(q, kg, vg, cu_q, cu_k, max_seqlen_q=max(q_lens), max_seqlen_k=max(lengths))
                err = (gathered().float() - want.float()).abs().max().item()
                print(f"   {'gather + varlen':16} {_median(gathered):9.1f} us (the copy {_median(copy):6.1f})"
                      f"   max |diff| vs shipped {err:.2e}", flush=True)
            rows = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
            tiles, pairs = -(-max(q_lens) // launcher.POSITIONS), len(lengths) * q.shape[1] // launcher.PACK
            for label, module in modules.items():
                if page % 64 and "one_load" in label:
                    continue
                out = torch.empty_like(q)
                kernel = getattr(module, spec.name)
                run = lambda: ct.launch(torch.cuda.current_stream(), launch_grid(tiles, pairs), kernel,  # noqa: E731
                                        (q, rows(kc), rows(vc), out, cu_q, used, table, page, scale_arg(None, 128)))
                run()
                torch.cuda.synchronize()
                err = (out.float() - want.float()).abs().max().item()
                print(f"   {label:16} {_median(run):9.1f} us   max |diff| vs shipped {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
