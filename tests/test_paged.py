"""The paging logic on the CPU: what a paged variant generates, how its launcher checks the
lengths and block tables it is given, and how it splits keys for decode.  (The kernels
themselves run in the generated GPU suites and tests/test_paged_gpu.py; the float64
reference over a paged cache is tests/test_paged_reference.py.)"""
import ast

import pytest
import torch

import attngen
from attngen.core.mask import Mask
from attngen.core.variant import Features, KernelSpec
from attngen.generate.cases import cases_for
from attngen.generate.codegen import pair_tree, render
from attngen.runtime import inputs
from attngen.runtime.inputs import InputError, key_splits, prepare_paged


def _spec(**features):
    return KernelSpec.tuned(Mask(True, 4095), 4, 128, "bf16", Features(paged=True, **features))


def test_paged_implies_packed_queries_after_cached_keys_and_has_no_backward():
    f = Features(paged=True)
    assert f.varlen and f.chunked and f.tag == "_paged"
    spec = _spec(sinks=True)
    narrow = {"", "_split", "_combine", "_pieces", "_split_pieces"}
    assert set(spec.kernels) == narrow | {s + "_i64" for s in narrow}
    assert spec.tiles.pack == 4          # the GQA group shares each tile
    files = render(spec)
    tree = ast.parse(files["kernel.py"])
    kernels = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert kernels == {spec.name + s for s in spec.kernels}
    launcher = ast.parse(files["launcher.py"])
    entries = {n.name for n in launcher.body if isinstance(n, ast.FunctionDef)}
    assert entries == {"launch", "infer"}
    assert "test_gradients" not in files[f"test_{spec.name}.py"]
    # the sinks join the merge, not the slices
    for suffix in ("_split", "_split_pieces"):
        split = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == spec.name + suffix)
        assert "Sinks" not in [a.arg for a in split.args.args]


def test_paged_cases_cover_every_page_size_mixed_batches_and_splits():
    cases = cases_for(_spec())
    assert {c.page for c in cases} == {16, 32, 64, 128, 256}
    lengths = [q for c in cases for q, _ in c.lengths]
    assert 0 in lengths and 1 in lengths and max(lengths) > 1          # empty, decode, prefill
    assert any(c.shared for c in cases) and any(c.splits for c in cases)
    assert any(q > k for c in cases for q, k in c.lengths)             # more queries than keys


def test_pair_tree_combines_leaves_as_nested_pairs():
    assert pair_tree(1, "t{}", "max({}, {})") == "t0"
    assert pair_tree(4, "t{}", "max({}, {})") == "max(max(t0, t1), max(t2, t3))"
    assert pair_tree(2, "ct.sum(p{})", "{} + {}") == "ct.sum(p0) + ct.sum(p1)"


def _tables(lengths, page=16, width=None, pages=64):
    width = width or max(-(-n // page) for n in lengths)
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        count = -(-n // page)
        table[b, :count] = torch.arange(count) + b * width
    return torch.tensor(lengths, dtype=torch.int32), table


def _fail(message):
    raise InputError(message)


def test_host_checks_name_the_bad_length_or_page():
    used, table = _tables([40, 3, 0])
    cu = torch.tensor([0, 1, 4, 4], dtype=torch.int32)
    assert inputs._read_paged(cu, used, table, 4, 64, 16, None, True, _fail) == 3
    with pytest.raises(InputError, match=r"cu_seqlens_q must rise from 0 to 5"):
        inputs._read_paged(cu, used, table, 5, 64, 16, None, True, _fail)
    with pytest.raises(InputError, match="max_seqlen_q is 2 but a sequence has 3"):
        inputs._read_paged(cu, used, table, 4, 64, 16, 2, True, _fail)
    with pytest.raises(InputError, match=r"seqused_k must lie in 0..48 .* sequence 1 has 49"):
        inputs._read_paged(cu, torch.tensor([40, 49, 0], dtype=torch.int32), table, 4, 64, 16, None, True, _fail)
    bad = table.clone()
    bad[0, 2] = 64
    with pytest.raises(InputError, match=r"block_table\[0, 2\] is 64, a page the cache \(64 pages\)"):
        inputs._read_paged(cu, used, bad, 4, 64, 16, None, True, _fail)
    bad[0, 2] = 5         # entries past a sequence's pages are never read: -1 there is fine
    assert inputs._read_paged(cu, used, bad, 4, 64, 16, None, True, _fail) == 3
    # check=False reads only what the grid needs
    assert inputs._read_paged(cu, torch.tensor([99, 99, 99], dtype=torch.int32), table, 4, 64, 16, None,
                              False, _fail) == 3


def test_layouts_and_page_sizes_are_checked_before_anything_runs():
    q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(10, 24, 2, 128, dtype=torch.bfloat16)
    used, table = _tables([3])
    cu = torch.tensor([0, 4], dtype=torch.int32)
    kwargs = dict(head_dim=128, dtype=torch.bfloat16, group=4, name="v")
    with pytest.raises(InputError, match="page size must be a multiple of 16 keys, got 24"):
        prepare_paged(q, cache, cache, cu, used, table, None, None, **kwargs)
    with pytest.raises(InputError, match="k_cache and v_cache must have one shape"):
        prepare_paged(q, torch.zeros(10, 16, 2, 128, dtype=torch.bfloat16), cache, cu, used, table, None, None,
                      **kwargs)
    with pytest.raises(InputError, match="4 query head"):
        prepare_paged(q, cache[:, :16, :1], cache[:, :16, :1], cu, used, table, None, None, **kwargs)


def test_keys_split_only_when_the_batch_leaves_the_gpu_idle(monkeypatch):
    monkeypatch.setattr(inputs, "_multiprocessors", lambda device: 132)
    device = torch.device("cpu")
    assert key_splits(264, 64, device) == 1           # enough programs already
    assert key_splits(8, 6, device) == 1              # too few key blocks to share
    assert key_splits(8, 64, device) == 16            # 4 blocks a slice at least
    assert key_splits(8, 4096, device) == 32          # at most 32 slices
    assert key_splits(128, 64, device) == 2           # one wave on 264 slots; 3 slices take two
    assert key_splits(128, 64, device, per_sm=3) == 3   # 396 slots: 384 programs, one wave
    assert key_splits(100, 64, device) == 5           # two waves of 13 blocks and a merge each
    assert key_splits(8, 64, device, asked=2) == 2    # what the caller asks
    with pytest.raises(InputError, match="splits must be a positive int"):
        key_splits(8, 64, device, asked=0, name="v")


def test_get_kernel_returns_the_paged_callable_and_refuses_a_backward_choice():
    attn = attngen.get_kernel(4096, gqa=4, paged=True)
    assert type(attn).__name__ == "PagedAttentionKernel"
    assert attn.family.features.paged
    with pytest.raises(attngen.ArgumentError, match="paged kernel has none"):
        attngen.get_kernel(4096, gqa=4, paged=True, deterministic=True)
    with pytest.raises(InputError, match="3-D"):
        attn(torch.zeros(2, 4, 8, 128), None, None, None, None, None)


def test_a_paged_decode_step_traces_into_attngen_ops():
    """torch.export(strict=True) runs torch.compile's tracer over flash_attn_with_kvcache: the
    cache write and the paged op, no graph break (fake tensors: no kernel runs), through the
    op's fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attngen.flash_attn import flash_attn_with_kvcache

    class Step(torch.nn.Module):
        def forward(self, q, k, v, k_cache, v_cache, seqlens, table):
            return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                           causal=True, window_size=(4095, 0))

    with FakeTensorMode():
        q = torch.randn(3, 1, 8, 128, dtype=torch.bfloat16)
        k, v = (torch.randn(3, 1, 2, 128, dtype=torch.bfloat16) for _ in range(2))
        k_cache, v_cache = (torch.randn(40, 16, 2, 128, dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.tensor([5, 17, 100], dtype=torch.int32)
        table = torch.arange(39, dtype=torch.int32).view(3, 13)
        exported = torch.export.export(Step(), (q, k, v, k_cache, v_cache, seqlens, table), strict=True)
    ops = [str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count("attngen.paged_attention.default") == 1, ops
    out = [n for n in exported.graph_module.graph.nodes if n.op == "output"][0]
    assert tuple(out.args[0][0].meta["val"].shape) == (3, 1, 8, 128)

    class RotaryStep(torch.nn.Module):     # the rotation in the call, and the log-sum-exp asked for
        def forward(self, q, k, v, k_cache, v_cache, seqlens, table, cos, sin):
            return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=seqlens, block_table=table, causal=True,
                                           return_softmax_lse=True)

    with FakeTensorMode():
        cos, sin = torch.randn(208, 32), torch.randn(208, 32)
        exported = torch.export.export(RotaryStep(), (q, k, v, k_cache, v_cache, seqlens, table, cos, sin),
                                       strict=True)
    ops = [str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count("attngen.paged_attention_lse.default") == 1, ops
    out = [n for n in exported.graph_module.graph.nodes if n.op == "output"][0]
    assert [tuple(o.meta["val"].shape) for o in out.args[0]] == [(3, 1, 8, 128), (3, 8, 1)]


def test_scattered_pages_gather_back_and_test_caches_poison_the_rest():
    """reference.page_table / scatter_pages invert gather_pages; the generated suites' cache
    (attngen.testing.paged_cache) holds each sequence's keys, shares a prefix when asked, and
    NaN in every slot no sequence uses."""
    from attngen.core.reference import gather_pages, page_table, scatter_pages
    from attngen.testing import paged_cache

    lengths = [200, 230, 0, 17, 16]
    order = torch.randperm(40).to(torch.int32)
    table = page_table(lengths, 16, order)
    assert table.shape == (5, 16) and (table[2] == -1).all() and table[3, 1] >= 0 and table[3, 2] == -1
    packed = torch.randn(sum(lengths), 2, 8)
    cache = scatter_pages(packed, lengths, table, 40, 16)
    got, cu = gather_pages(cache, table, torch.tensor(lengths, dtype=torch.int32))
    assert torch.equal(got, packed)

    gen = torch.Generator().manual_seed(0)
    k, v, used, table = paged_cache(lengths, 16, 2, 8, torch.float32, gen, shared=True)
    assert used.tolist() == lengths
    assert torch.equal(table[1, :11], table[0, :11]) and table[1, 11] != table[0, 11]
    slots = {(int(table[b, p // 16]), p % 16) for b, n in enumerate(lengths) for p in range(n)}
    for cache in (k, v):
        keys, _ = gather_pages(cache, table, used)
        assert not keys.isnan().any()
        assert int(cache.isnan().all(-1).all(-1).sum()) == cache.shape[0] * 16 - len(slots)
