"""A run's plot, for a person to look at instead of reading the table: reward (with its spread),
tokens/s, staleness and push time per step, one PNG (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = [("reward", "mean reward (± spread within groups)"), ("tokens_per_s", "tokens/s"),
          ("staleness", "staleness of the batch (versions)"), ("push_ms", "push (ms)")]


def write_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> str:
    """Write the PNG; returns its path, or why there is none (matplotlib not installed)."""
    try:
        import matplotlib
    except ImportError:
        return f"none written ({path}): matplotlib is not installed; pip install matplotlib"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.2 * len(PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        values = [r[key] for r in rows]
        ax.plot(steps, values, marker="o", markersize=3)
        if key == "reward":
            spread = [r["reward_spread"] for r in rows]
            ax.fill_between(steps, [v - s for v, s in zip(values, spread)], [v + s for v, s in zip(values, spread)],
                            alpha=0.2)
            ax.axhline(rows[0]["reward"], linestyle=":", linewidth=1, color="grey")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
