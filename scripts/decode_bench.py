"""Per-layer decode attention under CUDA graphs (GPU): attngen's decode step against
transformers' SDPA attention on the same cache.

    python scripts/decode_bench.py [--context 8192 32768] [--batch 1 16] [--json PATH]

One query per row after ``context`` cached keys, (B, H, 1, D) bf16, a causal window W.
attngen: ``attngen.integrations.transformers.decode`` (the last W keys, GQA heads sharing
K/V).  sdpa: transformers' ``sdpa_attention_forward`` with the boolean mask transformers
builds for a sliding layer over the whole cache.  Both captured in a CUDA graph; the graph's
replay timed with triton.testing.do_bench (median).  Outputs compared (rel. error).
"""
import argparse
import json

import torch

from attngen.bench.timing import cuda_graph

SHAPES = {   # name: heads, kv heads, head_dim, window, softcap, sinks
    "mistral-7b": (32, 8, 128, 4096, None, False),
    "gemma3-4b local": (8, 4, 256, 1024, None, False),
    "gemma2-9b local": (16, 8, 256, 4096, 50.0, False),
    "gpt-oss local": (64, 8, 64, 128, None, True),
}


def measure(name, batch, ctx):
    """One shape, batch and context: the peer's and attngen's graph replay times."""
    import triton  # on the GPU machine; --help works without it
    from transformers import masking_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attngen.integrations.transformers import decode, fallback
    from attngen.core.mask import Mask

    h, hkv, d, w, softcap, sinks = SHAPES[name]
    torch.manual_seed(0)
    q = torch.randn(batch, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    s = torch.randn(h, device="cuda", dtype=torch.bfloat16) if sinks else None
    mask = Mask.from_transformers(w, True)
    module = torch.nn.Module().eval()
    module.is_causal, module.num_key_value_groups = True, h // hkv
    if softcap is None and not sinks:
        peer_name = "sdpa"
        mask4d = masking_utils.sdpa_mask(
            batch_size=batch, q_length=1, kv_length=ctx, q_offset=ctx - 1,
            mask_function=masking_utils.sliding_window_causal_mask_function(w),
            allow_is_causal_skip=False).to("cuda")
        peer = lambda: sdpa_attention_forward(module, q, k, v, mask4d, scaling=d ** -0.5)[0]  # noqa: E731
    else:   # sdpa has no softcap or sinks: transformers runs these layers in eager attention
        peer_name = "eager"
        peer = lambda: fallback(module, q, k, v, None, mask, 0.0, d ** -0.5,  # noqa: E731
                                softcap=softcap, sinks=s)
    ours = lambda: decode(q, k, v, None, mask, d ** -0.5, softcap=softcap, sinks=s)  # noqa: E731
    (g_peer, o_peer), (g_ours, o_ours) = cuda_graph(peer), cuda_graph(ours)
    t_peer = 1e3 * triton.testing.do_bench(g_peer.replay, warmup=25, rep=200)
    t_ours = 1e3 * triton.testing.do_bench(g_ours.replay, warmup=25, rep=200)
    err = ((o_ours.float() - o_peer.float()).norm() / o_peer.float().norm()).item()
    return dict(shape=name, batch=batch, context=ctx, peer=peer_name, peer_us=t_peer, attngen_us=t_ours,
                rel_err=err, gpu=torch.cuda.get_device_name())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    print(f"{'shape':<18} {'B':>3} {'context':>7} {'peer us':>8} {'attngen us':>10} {'speedup':>7} {'rel err':>8}")
    for name in SHAPES:
        for batch in args.batch:
            for ctx in args.context:
                r = measure(name, batch, ctx)
                rows.append(r)
                print(f"{name:<18} {batch:>3} {ctx:>7} {r['peer_us']:>8.1f} {r['attngen_us']:>10.1f} "
                      f"{r['peer_us'] / r['attngen_us']:>7.2f} {r['rel_err']:>8.1e}  (peer: {r['peer']})", flush=True)
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
