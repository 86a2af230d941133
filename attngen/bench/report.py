"""What `attngen bench` prints and draws: the rows as a table, and matplotlib figures
(imported only when a plot is asked for)."""

from __future__ import annotations


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header and rows:
        r = rows[0]
        lines.append(f"\n{r['shape']}: B={r['batch']} H={r['heads']} HKV={r['heads_kv']} "
                     f"D={r['head_dim']} W={r['window']} {r['dtype']} on {r['gpu']}, "
                     f"pass {r.get('pass', 'fwd')}"
                     f"{', CUDA-graph replays' if r.get('timing') == 'cuda-graph' else ''}")
        lines.append(f"{'S':>6} {'impl':<11} {'us (p50)':>10} {'TFLOP/s':>8} {'GB/s':>7} "
                     f"{'attngen x':>9} {'extra MB':>9} {'rel err':>8}")
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        speed = "-" if r.get("attngen_speedup") is None else f"{r['attngen_speedup']:.2f}"
        lines.append(f"{r['seq']:>6} {r['impl']:<11} {r['us_p50']:>10.1f} {r['tflops']:>8.0f} "
                     f"{r['io_gb_s']:>7.0f} {speed:>9} {r['extra_mem_bytes'] / 2**20:>9.1f} {err:>8}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = panels(len(shapes), 5)
    for ax, label in zip(axes, shapes):
        sub = [r for r in rows if r["shape"] == label]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = [(r["seq"], r["tflops"]) for r in sub if r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(label)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("effective TFLOP/s (attended pairs)")
        ax.legend()
    save(fig, path)


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
