"""Plots for a person to look at instead of reading the table (matplotlib, drawn off-screen): a run's
reward (with its spread), tokens/s, staleness and push time per step (`write_plot`, the demo's), and
`rollfleet bench rollout`'s throughput per path and push and pause times per in-flight policy
(`write_rollout_plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = [("reward", "mean reward (± spread within groups)"), ("tokens_per_s", "tokens/s"),
          ("staleness", "staleness of the batch (versions)"), ("push_ms", "push (ms)")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> str:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> str:
    """Write the PNG; returns its path, or why there is none (matplotlib not installed)."""
    try:
        plt = _pyplot()
    except ImportError:
        return f"none written ({path}): matplotlib is not installed; pip install matplotlib"
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
    return _save(plt, fig, path)


ROLLOUT_PATHS = ("bare", "batch", "async")  # bench/rollout.py's: bare AsyncLLM, fleet.generate, the async client


def write_rollout_plot(result: dict[str, Any], path: str | Path) -> str:
    """`rollfleet bench rollout`'s result as a PNG: tokens/s per path; with a trainer GPU, each push's
    time and the generation it paused, per in-flight policy. Returns the path, or why there is none."""
    try:
        plt = _pyplot()
    except ImportError:
        return f"none written ({path}): matplotlib is not installed; pip install matplotlib"
    pushes = result.get("push") if isinstance(result.get("push"), dict) else {}
    fig, axes = plt.subplots(1 + 2 * bool(pushes), 1, figsize=(7, 2.6 * (1 + 2 * bool(pushes))), squeeze=False)
    axes = [a[0] for a in axes]
    paths = [p for p in ROLLOUT_PATHS if isinstance(result.get(p), dict)]
    axes[0].bar(paths, [result[p]["tokens_per_s"] for p in paths])
    for policy, costs in pushes.items():
        axes[0].bar(f"async + push\n({policy})", costs["generation"]["tokens_per_s"])
        for ax, key in zip(axes[1:], ("push_s", "paused_s")):
            ax.plot([row[key] * 1000 for row in costs["pushes"]], marker="o", markersize=3, label=policy)
    axes[0].set_ylabel("tokens/s", fontsize=8)
    for ax, label in zip(axes[1:], ("push (ms)", "generation paused (ms)")):
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("push", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"rollfleet bench rollout: {result.get('shape')}, vLLM {result.get('vllm', '?')}", fontsize=9)
    return _save(plt, fig, path)
