"""report.py: the demo's plot and `rollfleet bench rollout`'s, written as PNGs a person can look at."""

from __future__ import annotations

import pytest

from rollfleet import report

plt = pytest.importorskip("matplotlib.pyplot")


def _size(path) -> tuple[int, int]:
    height, width = plt.imread(path).shape[:2]
    return width, height


def test_the_demo_plot_has_a_panel_per_measure(tmp_path):
    rows = [{"step": i, "reward": 0.5 + i / 40, "reward_spread": 0.1, "tokens_per_s": 300.0, "staleness": i % 2,
             "push_ms": 40.0} for i in range(1, 21)]
    path = report.write_plot(rows, tmp_path / "sub" / "demo.png", "title")
    assert path == str(tmp_path / "sub" / "demo.png")
    assert _size(path) == (770, round(2.2 * len(report.PANELS) * 110))


RESULT = {"shape": "llama-3.2-1b", "vllm": "0.20.2", "bare": {"tokens_per_s": 9000.0},
          "batch": {"tokens_per_s": 5000.0}, "async": {"tokens_per_s": 8500.0}}


def test_the_rollout_plot_without_a_trainer_gpu_shows_the_paths(tmp_path):
    path = report.write_rollout_plot({**RESULT, "push": "not measured: a push needs a trainer GPU"}, tmp_path / "r.png")
    assert _size(path) == (770, round(2.6 * 110))  # one panel: tokens/s per path


def test_the_rollout_plot_with_pushes_adds_push_and_pause_per_policy(tmp_path):
    pushes = [{"push_s": 0.05, "paused_s": 0.01, "in_flight": 3, "aborted": 0}] * 4
    push = {p: {"generation": {"tokens_per_s": 8000.0}, "pushes": pushes} for p in ("wait", "abort", "keep")}
    path = report.write_rollout_plot({**RESULT, "push": push}, tmp_path / "r.png")
    assert _size(path) == (770, round(3 * 2.6 * 110))


def test_without_matplotlib_it_says_how_to_get_it(tmp_path, monkeypatch):
    def missing():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "_pyplot", missing)
    assert "pip install matplotlib" in report.write_rollout_plot(RESULT, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
