"""Which keys a query sees: the one definition every part of attngen uses.

Positions are 0-based and queries and keys are aligned at position 0 (prefill:
query ``i`` is the token at position ``i``).  Key ``j`` is visible to query ``i`` iff

    j <= i                         (when causal)
    i - left <= j                  (when ``left`` is set)
    j <= i + right                 (when ``right`` is set)
    0 <= j < seq_k                 (always)

A causal sliding window of ``W`` keys (Mistral, Gemma, gpt-oss, transformers'
``sliding_window=W``) is ``left = W - 1``: query ``i`` sees keys ``i-W+1 .. i``, ``W`` keys
including itself, which is FlashAttention's ``window_size=(W-1, 0)``.  A bidirectional
local window (ModernBERT) sets both ``left`` and ``right``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .support import ArgumentError


class MaskError(ArgumentError):
    """A window/causality description that attngen cannot accept."""


def _reach(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MaskError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise MaskError(f"{what} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Mask:
    """A band of visible keys; ``None`` means unbounded on that side."""

    causal: bool
    left: int | None = None
    right: int | None = None

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise MaskError(f"causal must be true or false, got {self.causal!r}")
        if self.left is not None:
            _reach(self.left, "window left reach")
        if self.causal:
            if self.right is not None:
                raise MaskError("a causal mask has no right reach (keys after the query are never visible)")
        else:
            if (self.left is None) != (self.right is None):
                raise MaskError("a non-causal local window needs both left and right")
            if self.right is not None:
                _reach(self.right, "window right reach")

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_window(cls, window: Any, causal: bool = True) -> "Mask":
        """Build from the user-facing ``window`` value.

        Causal: ``None`` (full causal) or a positive int ``W`` (the ``W`` most recent keys,
        the query's own included).  Non-causal: ``None`` (full bidirectional) or
        ``{"left": L, "right": R}`` / ``(L, R)`` (keys ``i-L .. i+R``).
        """
        if not isinstance(causal, bool):
            raise MaskError(f"causal must be true or false, got {causal!r}")
        if window is None:
            return cls(causal)
        if causal:
            if isinstance(window, bool) or not isinstance(window, int):
                raise MaskError(
                    f"a causal window is a positive integer W (the W most recent keys, the "
                    f"query's own included), got {window!r}")
            if window <= 0:
                raise MaskError(f"window must be a positive integer, got {window}")
            return cls(True, left=window - 1)
        if isinstance(window, dict):
            extra = set(window) - {"left", "right"}
            if extra or set(window) != {"left", "right"}:
                raise MaskError(
                    f"a non-causal window is {{left: L, right: R}}, got keys {sorted(window)}")
            left, right = window["left"], window["right"]
        elif isinstance(window, (tuple, list)) and len(window) == 2:
            left, right = window
        else:
            raise MaskError(
                f"a non-causal window is {{left: L, right: R}} (key j visible iff "
                f"i-L <= j <= i+R), got {window!r}")
        return cls(False, left=_reach(left, "window left"), right=_reach(right, "window right"))

    @classmethod
    def from_transformers(cls, sliding_window: int | None, causal: bool) -> "Mask":
        """The mask of a transformers attention call from its ``sliding_window`` argument
        (``None`` or <= 0: no window).  Causal ``W`` keeps ``kv_idx > q_idx - W``: the ``W``
        most recent keys.  Bidirectional (ModernBERT): the attention module passes
        ``sliding_window = R + 1`` for a reach of ``R`` keys on each side."""
        if sliding_window is None or sliding_window <= 0:
            return cls(causal)
        if causal:
            return cls.from_window(int(sliding_window), causal=True)
        reach = int(sliding_window) - 1
        return cls(False, reach, reach)

    # -- descriptions ---------------------------------------------------------------
    @property
    def window(self) -> int | dict | None:
        """The user-facing ``window`` value this mask came from."""
        if self.left is None:
            return None
        if self.causal:
            return self.left + 1
        return {"left": self.left, "right": self.right}

    @property
    def span(self) -> int | None:
        """Keys in a full window (``None`` without one)."""
        return None if self.left is None else self.left + 1 + (self.right or 0)

    @property
    def tag(self) -> str:
        """Short, file-name-safe description used in canonical names."""
        if self.causal:
            return "causal" if self.left is None else f"causal_w{self.left + 1}"
        return "bidir" if self.left is None else f"bidir_l{self.left}_r{self.right}"

    def describe(self) -> str:
        if self.causal and self.left is None:
            return "causal: query i sees keys 0..i"
        if self.causal:
            return f"causal sliding window of {self.left + 1} keys: query i sees keys i-{self.left}..i"
        if self.left is None:
            return "bidirectional: every query sees every key"
        return f"bidirectional local window: query i sees keys i-{self.left}..i+{self.right}"

    def flash_window_size(self) -> tuple[int, int]:
        """FlashAttention's ``window_size`` for this mask (``-1`` = unbounded)."""
        left = -1 if self.left is None else self.left
        right = 0 if self.causal else (-1 if self.right is None else self.right)
        return left, right

    def as_dict(self) -> dict:
        return {"causal": self.causal, "left": self.left, "right": self.right}

    # -- semantics -------------------------------------------------------------------
    def visible(self, rows, cols):
        """Boolean tensor: ``visible[i, j]`` for broadcastable index tensors ``rows``, ``cols``."""
        ok = cols >= 0
        if self.causal:
            ok = ok & (cols <= rows)
        if self.left is not None:
            ok = ok & (cols >= rows - self.left)
        if self.right is not None:
            ok = ok & (cols <= rows + self.right)
        return ok

    def key_range(self, q_start: int, q_stop: int, seq_k: int) -> tuple[int, int]:
        """Half-open range of keys that queries ``q_start .. q_stop-1`` can see."""
        lo = 0 if self.left is None else max(0, q_start - self.left)
        if self.causal:
            hi = q_stop
        elif self.right is None:
            hi = seq_k
        else:
            hi = q_stop + self.right
        return lo, min(hi, seq_k)

    def pairs(self, seq_q: int, seq_k: int | None = None) -> int:
        """Visible (query, key) pairs of ``seq_q`` queries, the last of ``seq_k`` keys."""
        seq_k = seq_q if seq_k is None else seq_k
        total = 0
        for i in range(seq_k - seq_q, seq_k):
            lo, hi = self.key_range(i, i + 1, seq_k)
            total += max(0, hi - lo)
        return total
