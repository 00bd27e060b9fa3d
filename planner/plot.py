"""Latency against request rate, layouts side by side (PNG; matplotlib imported only here, when asked)."""

from __future__ import annotations

PANELS = (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("norm_latency_s", "normalized latency (s/token)"))


def plot_rates(rows: list[dict], path: str) -> bool:
    """Three panels (TTFT, TPOT, normalized latency; p50 solid, p90 dashed) against rate, one line
    per layout; rows are simulate()'s figures with a "rate". False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (key, label) in zip(axes, PANELS):
        for layout in layouts:
            mine = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["rate"])
            rates = [r["rate"] for r in mine]
            line, = ax.plot(rates, [r[key]["p50"] for r in mine], "o-", label=f"{layout} p50")
            ax.plot(rates, [r[key]["p90"] for r in mine], "x--", color=line.get_color(), label=f"{layout} p90")
        ax.set(xlabel="request rate (req/s)", ylabel=label, title=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
