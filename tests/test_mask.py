import pytest
import torch

from attngen.core.mask import Mask, MaskError


def visible_set(mask, i, seq):
    rows = torch.tensor([[i]])
    cols = torch.arange(seq)[None, :]
    return set(torch.nonzero(mask.visible(rows, cols)[0]).flatten().tolist())


def test_causal_window_is_w_keys_including_the_query():
    mask = Mask.from_window(4, causal=True)
    assert (mask.left, mask.right) == (3, None)
    assert visible_set(mask, 10, 20) == {7, 8, 9, 10}
    assert visible_set(mask, 1, 20) == {0, 1}
    assert mask.flash_window_size() == (3, 0)
    assert mask.window == 4 and mask.tag == "causal_w4"


def test_window_of_one_sees_only_itself():
    assert visible_set(Mask.from_window(1), 5, 9) == {5}


def test_full_causal_and_bidirectional():
    assert visible_set(Mask.from_window(None), 3, 9) == {0, 1, 2, 3}
    full = Mask.from_window(None, causal=False)
    assert visible_set(full, 3, 9) == set(range(9))
    assert full.flash_window_size() == (-1, -1) and full.tag == "bidir"


def test_bidirectional_local_window():
    mask = Mask.from_window({"left": 2, "right": 1}, causal=False)
    assert visible_set(mask, 5, 9) == {3, 4, 5, 6}
    assert visible_set(mask, 8, 9) == {6, 7, 8}
    assert mask.flash_window_size() == (2, 1)
    assert Mask.from_window((2, 1), causal=False) == mask
    assert mask.window == {"left": 2, "right": 1} and mask.tag == "bidir_l2_r1"


@pytest.mark.parametrize("window,causal,match", [
    (0, True, "positive"),
    (-3, True, "positive"),
    (2.5, True, "positive integer"),
    (True, True, "positive integer"),
    ({"left": 1, "right": 1}, True, "causal window is a positive integer"),
    (128, False, "left: L, right: R"),
    ({"left": 1}, False, "left: L, right: R"),
    ({"left": -1, "right": 2}, False, ">= 0"),
    ({"left": 1, "right": 2, "up": 3}, False, "got keys"),
])
def test_bad_windows_name_the_problem(window, causal, match):
    with pytest.raises(MaskError, match=match):
        Mask.from_window(window, causal)


def test_key_range_covers_exactly_the_visible_keys():
    for mask in [Mask(True), Mask(True, 5), Mask(False), Mask(False, 3, 7), Mask(False, 0, 0)]:
        seq = 40
        for start in range(0, seq, 7):
            stop = min(start + 7, seq)
            lo, hi = mask.key_range(start, stop, seq)
            seen = set().union(*(visible_set(mask, i, seq) for i in range(start, stop)))
            assert seen <= set(range(lo, hi))
            assert min(seen) == lo and max(seen) == hi - 1


def test_pairs_counts_visible_pairs():
    mask = Mask.from_window(3)
    seq = 10
    rows = torch.arange(seq)[:, None]
    cols = torch.arange(seq)[None, :]
    assert mask.pairs(seq) == int(mask.visible(rows, cols).sum())
