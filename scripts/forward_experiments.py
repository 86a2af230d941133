"""Forward-kernel experiments of issue 12, as text rewrites of the generated inference kernel.

    python scripts/forward_experiments.py write DIR            # CPU: write the rewrites
    python scripts/forward_experiments.py aot DIR              # CPU: compile each for sm_90
    python scripts/forward_experiments.py time DIR a b bp c [--seq 8192 32768] [--only pipe rev]

For the plain kernels of bench presets A, B, B' and C (tuned tiles) `write` renders the
inference kernel and writes one module per experiment to DIR/<shape>_<experiment>.py, each
holding the rewritten kernel as `kern`, its rows per program `ROWS` and `HEAD_MAJOR` (grid
order).  `time` launches every module of a shape on the same random inputs, checks its
output against the unmodified kernel's (`base`), and times all of them and FlexAttention in
interleaved rounds of `triton.testing.do_bench` (median round).  None of these is what the
generator emits; docs/performance.md records what each measured and why none was kept.

Experiments: `pipe` / `pipelate` issue block j+1's QK^T before / after block j's softmax
(software pipelining, FlashAttention-3's intra-warpgroup overlap); `dsplit` (D = 256) two
128-wide output accumulators sharing P; `multi2` / `multi4` (shape C) 2 or 4 query tiles a
program; `rev` the longest (full-window) query tiles first; `hmaj` the same with heads as
the fastest grid axis; `w8` suffix: 128x128 tiles at occupancy 1 with 8 worker warps (D = 128);
`latK_V`: latency hints K and V of the K and V loads (`None`: no hint); `notma`: allow_tma=False.
"""
import argparse
import importlib.util
import math
import pathlib
import re
import sys

PRESETS = {"a": "A", "b": "B", "bp": "B'", "c": "C"}
QK = "        s_next = ct.mma(q, kn, ct.full((BLOCK_M, BLOCK_N), 0.0, dtype=ct.float32))\n"
SOFTMAX = """        m_new = max(m_i, ct.max(s, axis=-1, keepdims=True) * qk_scale_log2)
        p = ct.exp2(s * qk_scale_log2 - m_new, flush_to_zero=True)
        alpha = ct.exp2(m_i - m_new, flush_to_zero=True)
        l_i = l_i * alpha + ct.sum(p, axis=-1, keepdims=True)
"""
PV = """        acc = ct.mma(p.astype(Q.dtype), v, acc * alpha)
        m_i = m_new
"""


def _grab(pattern, text):
    match = re.search(pattern, text, re.S)
    if not match:
        raise SystemExit(f"the generated kernel changed: no match for {pattern!r}")
    return match.group(0)


def _parts(body):
    return (_grab(r"        k = ct\.load\(K.*?\(\(HEAD_DIM, BLOCK_N\)\)\n", body),
            _grab(r"        v = ct\.load\(V.*?\(\(BLOCK_N, HEAD_DIM\)\)\n", body),
            _grab(r"        if \(j.*?MASKED\)\n", body))


def pipelined(body, early=True):
    k_load, v_load, mask = _parts(body)
    loop = _grab(r"    for j in range\(first, last\):\n.*?        m_i = m_new\n", body)
    k_next = k_load.replace("0, j)", "0, j + 1)").replace("k = ", "kn = ")
    first_k = k_load.replace("0, j)", "0, first)").replace("        ", "    ", 1)
    last = "\n".join(line[4:] if line.startswith("        ") else line
                     for line in (mask + SOFTMAX + v_load + PV).split("\n"))
    new = (first_k + "    s = ct.mma(q, k, ct.full((BLOCK_M, BLOCK_N), 0.0, dtype=ct.float32))\n"
           + "    for j in range(first, last - 1):\n" + k_next + (QK if early else "") + mask + SOFTMAX
           + ("" if early else QK) + v_load + PV + "        s = s_next\n    j = last - 1\n" + last)
    return body.replace(loop, new)


def dsplit(body):
    def halves(m):
        half = m.group(0).replace("HEAD_DIM)", "HALF_D)")
        return half.replace("v = ", "v0 = ", 1) + half.replace("v = ", "v1 = ", 1).replace("j, 0)", "j, 1)")
    body = re.sub(r"( +)v = ct\.load\(V.*?\(\(BLOCK_N, HEAD_DIM\)\)\n", halves, body, flags=re.S)
    body = re.sub(r"( +)acc = ct\.mma\(p\.astype\(Q\.dtype\), v, acc \* alpha\)\n",
                  lambda m: (f"{m.group(1)}pc = p.astype(Q.dtype)\n{m.group(1)}acc0 = ct.mma(pc, v0, acc0 * alpha)\n"
                             f"{m.group(1)}acc1 = ct.mma(pc, v1, acc1 * alpha)\n"), body)
    body = body.replace("    acc = ct.full((BLOCK_M, HEAD_DIM), 0.0, dtype=ct.float32)\n",
                        "    acc0 = ct.full((BLOCK_M, HALF_D), 0.0, dtype=ct.float32)\n"
                        "    acc1 = ct.full((BLOCK_M, HALF_D), 0.0, dtype=ct.float32)\n")
    store = _grab(r"    out = ct\.truediv.*?\n    ct\.store\(Out.*?\)\)\)\n?", body)
    new = "".join(f"    out{i} = ct.truediv(acc{i}, l_i, flush_to_zero=True, rounding_mode=ct.RoundingMode.APPROX)\n"
                  f"    ct.store(Out, index=(b, h, tile, {i}), tile=out{i}.astype(Out.dtype)"
                  f".reshape((1, 1, BLOCK_M, HALF_D)))\n" for i in (0, 1))
    return body.replace(store, new)


def multi(body, n):
    lines = body.split("\n")
    start = lines.index("    tile = ct.bid(0)")
    seq = lines.index("    seq = K.shape[2]")
    loop = [f"    for t in range({n}):", f"        tile = ct.bid(0) * {n} + t"]
    return "\n".join(lines[:start] + lines[start + 1:seq + 1] + loop
                     + ["    " + line if line else line for line in lines[seq + 1:]])


def reverse(body, head_major=False):
    tile, pair = "    tile = ct.bid(0)\n", "    batch_head = ct.bid(1) + ct.bid(2) * ct.num_blocks(1)\n"
    if tile not in body or pair not in body:
        raise SystemExit("the generated kernel changed: no tile and (batch, head) lines to rewrite")
    if head_major:
        return body.replace(tile, "    tile = ct.num_blocks(1) - 1 - ct.bid(1)\n").replace(
            pair, "    batch_head = ct.bid(0)\n")
    return body.replace(tile, "    tile = ct.num_blocks(0) - 1 - ct.bid(0)\n")


def hints(body, text):
    return re.sub(r"@ct\.kernel\([^)]*\)", f"@ct.kernel({text})", body, count=1)


def latency(body, k_hint, v_hint, tma=None):
    def extra(hint):
        return ("" if hint is None else f", latency={hint}") + ("" if tma is None else f", allow_tma={tma}")
    body = body.replace("padding_mode=ZERO, latency=2).reshape((HEAD_DIM, BLOCK_N))",
                        f"padding_mode=ZERO{extra(k_hint)}).reshape((HEAD_DIM, BLOCK_N))")
    return body.replace("padding_mode=ZERO, latency=4).reshape((BLOCK_N, HEAD_DIM))",
                        f"padding_mode=ZERO{extra(v_hint)}).reshape((BLOCK_N, HEAD_DIM))")


def _spec(shape_key):
    from attngen.bench import PRESETS as BENCH
    from attngen.variant import KernelSpec

    shape = BENCH[PRESETS[shape_key]]
    return shape, KernelSpec.tuned(shape.mask, shape.heads // shape.heads_kv, shape.head_dim, shape.dtype)


def write(out: pathlib.Path):
    from attngen.codegen import render

    out.mkdir(parents=True, exist_ok=True)
    w8 = "occupancy=1, num_ctas=1, num_worker_warps=8"
    for key in PRESETS:
        _, spec = _spec(key)
        source = render(spec)["kernel.py"]
        head, rest = source.split("@ct.kernel(", 1)
        body = "@ct.kernel(" + rest.split("\n\n\n", 1)[0]
        rows = spec.tiles.block_m
        variants = {"base": body, "pipe": pipelined(body), "pipelate": pipelined(body, early=False),
                    "rev": reverse(body), "hmaj": reverse(body, True), "notma": latency(body, 2, 4, False)}
        for k_hint, v_hint in [(1, 4), (4, 4), (8, 4), (2, 1), (2, 8), (2, 10), (4, 8), (8, 8), (None, None)]:
            variants[f"lat{k_hint}_{v_hint}"] = latency(body, k_hint, v_hint)
        if spec.head_dim == 128:
            variants |= {"basew8": hints(body, w8), "pipew8": hints(pipelined(body), w8),
                         "revw8": hints(reverse(body), w8), "hmajw8": hints(reverse(body, True), w8)}
        if spec.head_dim == 256:
            variants |= {"dsplit": dsplit(body), "pipedsplit": dsplit(pipelined(body))}
        programs = {}     # query tiles a program, where not 1
        if key == "c":
            for n in (2, 4):
                variants |= {f"multi{n}": multi(body, n), f"pipemulti{n}": multi(pipelined(body), n)}
                programs |= {f"multi{n}": n, f"pipemulti{n}": n}
        for name, text in variants.items():
            text = re.sub(r"def \w+\(", "def kern(", text, count=1)
            (out / f"{key}_{name}.py").write_text(
                f"{head}ROWS = {rows * programs.get(name, 1)}\nHALF_D = HEAD_DIM // 2\n"
                f"HEAD_MAJOR = {name.startswith('hmaj')}\n\n\n{text}\n")
    print(f"wrote {len(list(out.glob('*.py')))} kernels to {out}")


def _modules(directory: pathlib.Path, key: str, only=None):
    mods = {}
    for path in sorted(directory.glob(f"{key}_*.py")):
        name = path.stem[len(key) + 1:]
        if only is not None and name != "base" and name not in only:
            continue
        spec = importlib.util.spec_from_file_location(f"fwdexp_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


def aot(directory: pathlib.Path):
    from attngen.aot import export

    for key in PRESETS:
        _, spec = _spec(key)
        for name, mod in _modules(directory, key).items():
            try:
                export(mod.kern, spec, "sm_90", str(directory / f"{key}_{name}.cubin"))
                print(f"{key}_{name}: compiled")
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{key}_{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")


def time(directory: pathlib.Path, keys, seqs, rounds, only):
    import cuda.tile as ct
    import torch
    import triton

    from attngen.bench import _implementations
    from attngen.support import DTYPES

    for key in keys:
        shape, spec = _spec(key)
        mods = _modules(directory, key, only)
        for seq in seqs:
            torch.manual_seed(seq)
            dtype = getattr(torch, DTYPES[spec.dtype])
            q = torch.randn(1, shape.heads, seq, shape.head_dim, device="cuda", dtype=dtype)
            k = torch.randn(1, shape.heads_kv, seq, shape.head_dim, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            scale = math.log2(math.e) / math.sqrt(shape.head_dim)
            runs, outs = {}, {}
            for name, mod in mods.items():
                outs[name] = torch.empty_like(q)
                grid = ((seq + mod.ROWS - 1) // mod.ROWS, shape.heads, 1)
                if mod.HEAD_MAJOR:
                    grid = (grid[1], grid[0], 1)
                runs[name] = (lambda mod=mod, o=outs[name], grid=grid:
                              ct.launch(torch.cuda.current_stream(), grid, mod.kern, (q, k, v, o, scale)))
            runs["flex"] = _implementations(shape, seq, q, k, v, None, spec.tiles, ["flex"])["flex"]
            check = {}
            for name, run in runs.items():
                run()
                torch.cuda.synchronize()
                if name in outs:
                    same = torch.equal(outs[name], outs["base"])
                    diff = (outs[name].float() - outs["base"].float()).abs().max().item()
                    check[name] = "identical" if same else f"max |diff| {diff:.1e}"
            times = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    times[name].append(triton.testing.do_bench(run, warmup=25, rep=100) * 1e3)
            med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            for name in runs:
                print(f"{key:>2} S={seq:>6} {name:<14} {med[name]:9.1f} us  {med['base'] / med[name]:.3f}x base  "
                      f"{med['flex'] / med[name]:.2f}x flex  {check.get(name, '')}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("write", "aot", "time"))
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("shapes", nargs="*", help=f"of {' '.join(PRESETS)} (default: all)")
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", help="experiments to time beside base and flex")
    args = p.parse_args()
    if set(args.shapes) - set(PRESETS):
        p.error(f"shapes are {' '.join(PRESETS)}, got {' '.join(args.shapes)}")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    if args.command == "write":
        write(args.dir)
    elif args.command == "aot":
        aot(args.dir)
    else:
        time(args.dir, args.shapes or list(PRESETS), args.seq, args.rounds, args.only)


if __name__ == "__main__":
    main()
