"""Matplotlib figures for the benchmarks (``attngen bench ... --plot``); matplotlib is
imported only when a plot is asked for."""

from __future__ import annotations


def panels(count: int, width: float):
    """A figure of ``count`` side-by-side panels (Agg backend): ``(figure, axes)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(width * count, 4), squeeze=False)
    return fig, axes[0]


def save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
