"""The paged-cache reference (attngen.core.reference.gather_pages, paged) on the CPU: a cache
written through a random block table — pages shuffled and shared, last pages partly filled,
empty sequences, every block size — reads back as the contiguous keys, and attention over it
equals attention over those keys."""
import random

import pytest
import torch

from attngen.core.mask import Mask
from attngen.core.reference import gather_pages, page_table, paged, scatter_pages, varlen


def _paged_cache(keys: list[torch.Tensor], block_size: int, spare: int, share: bool, gen: random.Random):
    """A cache holding each sequence's keys in pages drawn at random (``spare`` pages unused,
    NaN), and its block table; with ``share``, sequences 0 and 1 share their first full page
    (sequence 0's keys there become sequence 1's, which the page holds)."""
    lengths = [len(k) for k in keys]
    order = list(range(sum(-(-n // block_size) for n in lengths) + spare))
    gen.shuffle(order)
    table = page_table(lengths, block_size, torch.tensor(order, dtype=torch.int32))
    if share and len(keys) > 1 and min(lengths[:2]) >= block_size:
        keys[0][:block_size] = keys[1][:block_size]         # sequence 0 reads sequence 1's page
        table[0, 0] = table[1, 0]
    return scatter_pages(torch.cat(keys), lengths, table, len(order), block_size), table


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_pages_read_back_as_the_contiguous_keys(block_size):
    gen = random.Random(block_size)
    lengths = [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 7]
    gen.shuffle(lengths)
    keys = [torch.randn(n, 2, 8, dtype=torch.float64) for n in lengths]
    cache, table = _paged_cache(keys, block_size, spare=3, share=True, gen=gen)
    packed, cu = gather_pages(cache, table, torch.tensor(lengths, dtype=torch.int32))
    assert cu.tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
    assert torch.equal(packed, torch.cat(keys))


@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("block_size", [16, 64])
def test_attention_over_pages_equals_attention_over_contiguous_keys(block_size, window):
    """A batch that mixes a prefill chunk, decode steps and an empty sequence; windows smaller
    and larger than a page; GQA 2; sinks."""
    gen = random.Random(window or 0)
    keys_per_seq, queries_per_seq = [70, 33, 1, 0, 129], [20, 1, 1, 0, 129]
    k = [torch.randn(n, 2, 8, dtype=torch.float64) for n in keys_per_seq]
    v = [torch.randn(n, 2, 8, dtype=torch.float64) for n in keys_per_seq]
    k_cache, table = _paged_cache(k, block_size, spare=2, share=False, gen=gen)
    v_cache = scatter_pages(torch.cat(v), keys_per_seq, table, len(k_cache), block_size)
    q = torch.randn(sum(queries_per_seq), 4, 8, dtype=torch.float64)
    cu_q = torch.tensor([0] + queries_per_seq).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + keys_per_seq).cumsum(0).to(torch.int32)
    mask = Mask.from_window(window)
    sinks = torch.randn(4, dtype=torch.float64)
    got = paged(q, k_cache, v_cache, cu_q, torch.tensor(keys_per_seq, dtype=torch.int32), table, mask,
                sinks=sinks)
    want = varlen(q, torch.cat(k), torch.cat(v), cu_q, cu_k, mask, sinks=sinks)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_tables_that_do_not_fit_are_refused():
    cache = torch.zeros(4, 16, 2, 8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="need 3 pages of 16"):
        gather_pages(cache, table, torch.tensor([40, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside 0..3"):
        gather_pages(cache, torch.tensor([[0, 7], [2, 3]], dtype=torch.int32), torch.tensor([20, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        gather_pages(cache, table.long(), torch.tensor([4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="one length per row"):
        gather_pages(cache, table, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_blocks, block_size"):
        gather_pages(cache[0], table, torch.tensor([4, 3], dtype=torch.int32))
