"""monitoring.py: the Grafana dashboard shows every metric, in a model Grafana loads. (Its expressions are
evaluated against a real Prometheus in test_metrics.py; the chart's copy is checked in test_golden.py.)"""

from __future__ import annotations

import re

from rollfleet import monitoring
from rollfleet.runtime import metrics


def test_every_metric_is_on_the_dashboard():
    shown = " ".join(monitoring.expressions())
    missing = [n for n in [*metrics.METRICS, *metrics.VLLM] if not re.search(rf"\bray_{n}(_total|_sum|_count|_bucket)?\b", shown)]
    assert not missing, f"not on the dashboard: {missing}"


def test_every_series_on_the_dashboard_is_one_rollfleet_exports():
    exported = {f"ray_{n}{suffix}" for n, (kind, *_) in {**metrics.METRICS, **metrics.VLLM}.items()
                for suffix in {"counter": ["_total"], "gauge": [""], "histogram": ["_sum", "_count", "_bucket"]}[kind]}
    used = set(re.findall(r"\bray_[a-z_]+\b", " ".join(monitoring.expressions())))
    assert used <= exported, f"series nothing exports: {used - exported}"


def test_the_model_is_one_grafana_loads():
    board = monitoring.dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and board["uid"] == "rollfleet"
    assert all(0 <= p["gridPos"]["x"] < 24 and p["gridPos"]["w"] == 12 for p in panels)
    assert len({(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}) == len(panels)  # no two overlap
    variables = {v["name"] for v in board["templating"]["list"]}
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        for t in p["targets"]:
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= variables | {"__rate_interval"}, t["expr"]
    assert monitoring.dashboard_json().endswith("}\n")
