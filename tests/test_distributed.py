"""Context-parallel sliding-window attention (attngen.distributed) on CPU over gloo.

One spawn of 4 processes runs every case; each case runs on the whole world (4 ranks) or on a
subgroup of 3 or 2 (which also checks group ranks against global ones).  Each rank takes its
chunk of a float64 q, k, v built from a fixed seed and compares its output and its q, k, v
gradient chunks with the reference over the whole sequence in one process.  A child's
unexpected exception fails every test here with its traceback; a mismatch fails its case.
"""
import json
import os
import random
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attngen.core import reference
from attngen.integrations import distributed
from attngen.core.mask import Mask

WORLD = 4
GROUPS = {"world": (0, 1, 2, 3), "g3": (1, 2, 3), "g2": (0, 3)}

# name: group, chunk lengths, window, causal, layout, batch, heads, kv_heads, extras
CASES = {
    "causal_w3_smaller_than_chunk": ("world", (5, 5, 5, 5), 3, True, "bhsd", 1, 2, 2, {}),
    "causal_w12_halo_from_3_ranks": ("world", (5, 5, 5, 5), 12, True, "bhsd", 1, 2, 1, {}),
    "causal_w1_no_halo": ("world", (3, 4, 2, 5), 1, True, "bshd", 1, 2, 2, {}),
    "bidir_l6_r7_unequal_b2_gqa4": ("world", (3, 6, 2, 5), {"left": 6, "right": 7}, False, "bshd",
                                    2, 4, 1, {}),
    "causal_w8_empty_chunk": ("world", (2, 7, 0, 4), 8, True, "bhsd", 1, 2, 1, {}),
    "causal_w6_softcap_sinks_scale": ("world", (4, 3, 5, 4), 6, True, "bhsd", 1, 4, 2,
                                      {"softcap": 2.0, "sinks": True, "scale": 0.3}),
    "g3_causal_w7_short_chunk_bshd": ("g3", (2, 6, 3), 7, True, "bshd", 1, 2, 2, {}),
    "g3_bidir_l2_r9_b2_gqa2": ("g3", (4, 3, 5), {"left": 2, "right": 9}, False, "bhsd", 2, 4, 2, {}),
    "g2_causal_w4_b2_gqa4_bshd": ("g2", (6, 6), 4, True, "bshd", 2, 4, 1, {}),
    "g2_bidir_l0_r3_right_only": ("g2", (5, 4), {"left": 0, "right": 3}, False, "bhsd", 1, 2, 2, {}),
    "g2_causal_w100_whole_sequence": ("g2", (3, 4), 100, True, "bhsd", 1, 2, 2, {}),
    "bidir_l9_r2_softcap_sinks_lengths_given": ("world", (4, 0, 7, 3), {"left": 9, "right": 2}, False,
                                                "bhsd", 1, 4, 2,
                                                {"softcap": 3.0, "sinks": True, "lengths": True}),
    "g3_causal_w5_lengths_given_bshd": ("g3", (6, 2, 5), 5, True, "bshd", 2, 2, 1, {"lengths": True}),
}
HEAD_DIM = 8


def _global_inputs(seed, lengths, layout, batch, heads, kv_heads, extras):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def shape(h):
        return (batch, h, total, HEAD_DIM) if layout == "bhsd" else (batch, total, h, HEAD_DIM)
    q, k, v = (torch.randn(shape(h), generator=gen, dtype=torch.float64)
               for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(shape(heads), generator=gen, dtype=torch.float64)
    sinks = torch.randn(heads, generator=gen, dtype=torch.float64) if extras.get("sinks") else None
    return q, k, v, dout, sinks


def _run_case(name, group, rank):
    group_name, lengths, window, causal, layout, batch, heads, kv_heads, extras = CASES[name]
    seed = sorted(CASES).index(name)
    q, k, v, dout, sinks = _global_inputs(seed, lengths, layout, batch, heads, kv_heads, extras)
    kwargs = {"scale": extras.get("scale"), "softcap": extras.get("softcap")}
    # the single-process reference over the whole sequence
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    full_sinks = None if sinks is None else sinks.clone().requires_grad_()
    mask = Mask.from_window(window, causal)
    out_full = reference.attention(*full, mask, layout=layout, sinks=full_sinks, **kwargs)
    (out_full * dout).sum().backward()
    # this rank's chunk, through the halo exchange
    dim = 2 if layout == "bhsd" else 1
    start = sum(lengths[:rank])
    chunk = lambda t: t.narrow(dim, start, lengths[rank])      # noqa: E731
    local = [chunk(t).clone().requires_grad_() for t in (q, k, v)]
    local_sinks = None if sinks is None else sinks.clone().requires_grad_()
    given = list(lengths) if extras.get("lengths") else None
    out = distributed.attention(*local, window=window, causal=causal, group=group, layout=layout,
                                sinks=local_sinks, lengths=given, **kwargs)
    if out.requires_grad:       # an empty chunk's output depends on nothing
        (out * chunk(dout)).sum().backward()
    if local_sinks is not None:
        grad = local_sinks.grad if local_sinks.grad is not None else torch.zeros_like(sinks)
        dist.all_reduce(grad, group=group)     # a replicated parameter: sum the ranks' shares
        local_sinks.grad = grad
    # compare only after every collective of the case has run on every rank
    opts = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out, chunk(out_full.detach()), **opts, msg=lambda m: f"output: {m}")
    for what, mine, whole in zip("qkv", local, full):
        got = mine.grad if mine.grad is not None else torch.zeros_like(mine)
        torch.testing.assert_close(got, chunk(whole.grad), **opts, msg=lambda m: f"d{what}: {m}")
    if sinks is not None:
        torch.testing.assert_close(local_sinks.grad, full_sinks.grad, **opts,
                                   msg=lambda m: f"dsinks: {m}")


def _run_mismatch(group, rank):
    """Ranks that disagree on the window all raise the same error (after the all_gather)."""
    q = torch.randn(1, 2, 3, HEAD_DIM, dtype=torch.float64)
    try:
        distributed.attention(q, q, q, window=4 + rank, group=group)
    except ValueError as e:
        assert "same window left" in str(e), e
    else:
        raise AssertionError("no error for ranks with different windows")


def _run_bad_lengths(group, rank):
    """lengths= that do not give this rank's own chunk length are refused (before any message)."""
    q = torch.randn(1, 2, 3, HEAD_DIM, dtype=torch.float64)
    for lengths in ([3, 3, 3], [2] * WORLD):
        try:
            distributed.attention(q, q, q, window=4, group=group, lengths=lengths)
        except ValueError as e:
            assert "lengths must give" in str(e), e
        else:
            raise AssertionError(f"no error for lengths={lengths}")


def _worker(rank, port, out_dir):
    try:
        _cases(rank, port, out_dir)
    except BaseException:
        # the rank that fails first is the one to read; the others then lose their peers
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _cases(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        groups = {n: None if len(r) == WORLD else dist.new_group(list(r)) for n, r in GROUPS.items()}
        results = {}
        for name in [*CASES, "mismatch", "bad_lengths"]:
            group_name = CASES[name][0] if name in CASES else "world"
            if rank not in GROUPS[group_name]:
                continue
            group_rank = GROUPS[group_name].index(rank)
            try:
                if name == "mismatch":
                    _run_mismatch(groups[group_name], group_rank)
                elif name == "bad_lengths":
                    _run_bad_lengths(groups[group_name], group_rank)
                else:
                    _run_case(name, groups[group_name], group_rank)
                results[name] = None
            except AssertionError:   # a mismatch: record it, go on (the collectives have run)
                results[name] = f"rank {rank} (group rank {group_rank}):\n{traceback.format_exc()}"
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    try:
        mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
        failed = None
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        failed = str(e)
    if failed is not None:      # every rank's traceback, those that lost a peer last
        errors = sorted((p.read_text() for p in sorted(out_dir.glob("rank*.error"))),
                        key=lambda text: "remote worker" in text)
        pytest.fail("a child process failed:\n" + "\n".join(errors or [failed]), pytrace=False)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", [*CASES, "mismatch", "bad_lengths"])
def test_matches_single_process_reference(results, name):
    ranks = GROUPS[CASES[name][0] if name in CASES else "world"]
    assert all(name in results[r] for r in ranks)
    failures = [results[r][name] for r in ranks if results[r][name]]
    assert not failures, "\n".join(failures)


# -- no processes -----------------------------------------------------------------------------

@pytest.mark.parametrize("window,causal", [(None, True), (None, False)])
def test_full_attention_is_refused_with_a_pointer_to_ring_attention(window, causal):
    q = torch.randn(1, 2, 4, HEAD_DIM)
    with pytest.raises(ValueError, match="ring attention"):
        distributed.attention(q, q, q, window=window, causal=causal)
    with pytest.raises(ValueError, match="ring attention"):
        distributed.halo_plan([4, 4], 0, Mask(causal))


def test_bad_inputs_are_named_before_any_communication():
    q = torch.randn(1, 4, 6, HEAD_DIM)
    k = torch.randn(1, 3, 6, HEAD_DIM)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        distributed.attention(q, k, k, window=4)
    with pytest.raises(ValueError, match="local sequence length"):
        distributed.attention(q, q[:, :, :5], q[:, :, :5], window=4)
    with pytest.raises(ValueError, match="layout"):
        distributed.attention(q, q, q, window=4, layout="sbhd")
    with pytest.raises(ValueError, match="sinks"):
        distributed.attention(q, q, q, window=4, sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.attention(q, q, q, window=4)


def _random_splits(seed, count=300):
    """(chunk lengths, mask) of 1-6 ranks holding 0-9 tokens each, causal or bidirectional
    windows of up to 12 keys either way: windows shorter and longer than the chunks."""
    rng = random.Random(seed)
    for _ in range(count):
        lengths = [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.5:
            yield lengths, Mask(True, rng.randint(0, 12))
        else:
            yield lengths, Mask(False, rng.randint(0, 12), rng.randint(0, 12))


def test_parts_give_every_query_exactly_its_keys():
    """A rank's queries attend to its local keys (the layer's mask) in one launch and to its
    halo keys in the halo parts, each a chunked launch (queries the last of its keys: S_q <=
    S_k) with the shifted mask.  Per query, the local keys and the halo parts' keys must be
    exactly the whole-sequence mask's, each key once."""
    for lengths, mask in _random_splits(seed=1):
        total = sum(lengths)
        for rank in range(len(lengths)):
            plan = distributed.halo_plan(lengths, rank, mask)
            seen = {t: [j for j in range(plan.start, plan.stop)
                        if mask.visible(plan.start + t, j) and j < total]
                    for t in range(plan.stop - plan.start)}
            for part in distributed._halo_parts(mask, plan):
                (a, b), first, stop = part.rows, part.first, part.stop
                assert 0 < b - a <= stop - first, (lengths, mask, rank, part)
                assert part.mask.left >= 0 and (part.mask.right or 0) >= 0
                halo = (plan.stop, plan.hi) if part.right else (plan.lo, plan.start)
                assert halo[0] <= first < stop <= halo[1]
                for t in range(a, b):
                    p = (stop - first) - (b - a) + (t - a)      # the kernel's query position
                    seen[t] += [first + j for j in range(stop - first) if part.mask.visible(p, j)]
            for t, keys in seen.items():
                want = [j for j in range(total) if mask.visible(plan.start + t, j)]
                assert sorted(keys) == want, (lengths, mask, rank, t)


def test_worked_example_of_the_docs():
    """docs/distributed.md: 3 ranks of 6, 6 and 2 tokens, causal window of 8 keys, then
    the bidirectional window {left: 2, right: 3}."""
    mask = Mask.from_window(8)
    plans = [distributed.halo_plan([6, 6, 2], r, mask) for r in range(3)]
    assert [(p.recv, p.send) for p in plans] == [
        ((), ((1, 0, 6), (2, 5, 6))),
        (((0, 0, 6),), ((2, 6, 12),)),
        (((0, 5, 6), (1, 6, 12)), ()),
    ]
    assert [(p.lo, p.hi, p.left) for p in plans] == [(0, 6, 0), (0, 12, 6), (5, 14, 7)]
    parts = [[(h.rows, h.first, h.stop) for h in distributed._halo_parts(mask, p)] for p in plans]
    assert parts == [[], [((0, 6), 0, 6)], [((0, 2), 5, 12)]]      # local rows, halo keys
    plans = [distributed.halo_plan([6, 6, 2], r, Mask.from_window({"left": 2, "right": 3}, False))
             for r in range(3)]
    assert [p.recv for p in plans] == [((1, 6, 9),), ((0, 4, 6), (2, 12, 14)), ((1, 10, 12),)]


def test_sends_and_receives_match_and_cover_exactly_the_visible_keys():
    for lengths, mask in _random_splits(seed=0):
        total = sum(lengths)
        plans = [distributed.halo_plan(lengths, r, mask) for r in range(len(lengths))]
        for a, plan in enumerate(plans):
            for p, lo, hi in plan.recv:
                assert (a, lo, hi) in plans[p].send
            for p, lo, hi in plan.send:
                assert (a, lo, hi) in plans[p].recv
            keys = [j for _, lo, hi in plan.recv for j in range(lo, hi)]
            keys[plan.left:plan.left] = range(plan.start, plan.stop)
            i = torch.arange(plan.start, plan.stop)[:, None]
            j = torch.arange(total)[None, :]
            visible = mask.visible(i, j).any(0).nonzero().flatten().tolist()
            assert keys == list(range(plan.lo, plan.hi)) == visible, (lengths, mask, a)
