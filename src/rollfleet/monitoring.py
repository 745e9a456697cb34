"""The Grafana dashboard of a rollfleet run, built from the metrics of runtime/metrics.py.

One dashboard for every fleet (a `fleet` variable picks them), so it does not depend on the values:
`dashboard()` is the JSON model, written to charts/rollfleet/files/dashboard.json by `make manifests`
(tests/test_golden.py fails on drift); the chart ships that file and `rollfleet render` the same text, in a
ConfigMap labelled for Grafana's dashboard sidecar. tests/test_metrics.py evaluates every expression
against a real Prometheus that scraped the loop runs. The alert rules depend on the values (the fleet's
name, the thresholds, rollout.maxStaleness) and live in the templates (prometheusrule.yaml.j2 and the
chart's twin), checked the same way and by `promtool check rules`.
"""

from __future__ import annotations

import json
from pathlib import Path

DASHBOARD_FILE = Path(__file__).resolve().parents[2] / "charts" / "rollfleet" / "files" / "dashboard.json"
F = '{fleet=~"$fleet"}'
R = "$__rate_interval"


def _mean(name: str, by: str = "fleet") -> str:
    """The mean of a histogram over the rate window."""
    return (f"sum by ({by}) (rate(ray_{name}_sum{F}[{R}])) / "
            f"sum by ({by}) (rate(ray_{name}_count{F}[{R}]))")


def _p90(name: str, by: str = "fleet") -> str:
    return f"histogram_quantile(0.9, sum by ({by}, le) (rate(ray_{name}_bucket{F}[{R}])))"


# (title, unit, [(expression, legend)]) per panel, two panels per row
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Reward (mean of the last step)", "none", [(f"max by (fleet) (ray_rollfleet_reward{F})", "{{fleet}}")]),
    ("Loss", "none", [(f"max by (fleet) (ray_rollfleet_loss{F})", "{{fleet}}")]),
    ("Trainer step", "none", [(f"max by (fleet) (ray_rollfleet_trainer_step{F})", "{{fleet}}")]),
    ("Time since the last step", "s",
     [(f"time() - max by (fleet) (ray_rollfleet_last_step_timestamp_seconds{F})", "{{fleet}}")]),
    ("Step time", "s", [(_mean("rollfleet_step_seconds"), "{{fleet}} mean")]),
    ("Tokens generated per second", "short",
     [(f"sum by (fleet) (rate(ray_rollfleet_tokens_generated_total{F}[{R}]))", "{{fleet}}")]),
    ("Requests in flight and queued", "short",
     [(f"sum by (fleet, engine) (ray_rollfleet_requests_in_flight{F})", "{{fleet}} engine {{engine}} in flight"),
      (f"sum by (fleet, engine) (ray_rollfleet_requests_queued{F})", "{{fleet}} engine {{engine}} queued")]),
    ("Requests received, completed, failed and resent per second", "reqps",
     [(f"sum by (fleet) (rate(ray_rollfleet_requests_received_total{F}[{R}]))", "{{fleet}} received"),
      (f"sum by (fleet) (rate(ray_rollfleet_requests_completed_total{F}[{R}]))", "{{fleet}} completed"),
      (f"sum by (fleet) (rate(ray_rollfleet_requests_failed_total{F}[{R}]))", "{{fleet}} failed"),
      (f"sum by (fleet) (rate(ray_rollfleet_requests_resent_total{F}[{R}]))", "{{fleet}} resent")]),
    ("Staleness of taken samples (versions)", "none", [(_mean("rollfleet_sample_staleness"), "{{fleet}} mean")]),
    ("Weight push time", "s", [(_p90("rollfleet_push_seconds"), "{{fleet}} p90"),
                               (_mean("rollfleet_push_seconds"), "{{fleet}} mean")]),
    ("Weight push size", "bytes", [(_mean("rollfleet_push_bytes"), "{{fleet}}")]),
    ("Generation paused by a push", "s", [(_p90("rollfleet_pause_seconds", "fleet, engine"),
                                            "{{fleet}} engine {{engine}} p90")]),
    ("Weight version per engine", "none",
     [(f"max by (fleet, engine) (ray_rollfleet_weight_version{F})", "{{fleet}} engine {{engine}}")]),
    ("Engine state", "none",
     [(f"max by (fleet, engine, state) (ray_rollfleet_engine_state{F}) > 0", "{{fleet}} engine {{engine}} {{state}}")]),
    ("Engine restarts (last hour)", "none",
     [(f"max by (fleet, engine) (increase(ray_rollfleet_engine_restarts_total{F}[1h]))", "{{fleet}} engine {{engine}}")]),
    # vLLM's own (or the CPU stand-in's) names: labelled by model_name, not by fleet
    ("vLLM sequences running and waiting", "short",
     [("sum by (model_name) (ray_vllm_num_requests_running)", "{{model_name}} running"),
      ("sum by (model_name) (ray_vllm_num_requests_waiting)", "{{model_name}} waiting")]),
    ("vLLM prompt and generated tokens per second", "short",
     [(f"sum by (model_name) (rate(ray_vllm_prompt_tokens_total[{R}]))", "{{model_name}} prompt"),
      (f"sum by (model_name) (rate(ray_vllm_generation_tokens_total[{R}]))", "{{model_name}} generated")]),
    ("vLLM KV cache usage", "percentunit", [("max by (model_name) (ray_vllm_kv_cache_usage_perc)", "{{model_name}}")]),
    ("vLLM prefix cache hit rate", "percentunit",
     [(f"sum by (model_name) (rate(ray_vllm_prefix_cache_hits_total[{R}])) / "
       f"sum by (model_name) (rate(ray_vllm_prefix_cache_queries_total[{R}]))", "{{model_name}}")]),
    ("vLLM request latency, end to end", "s",
     [(f"histogram_quantile(0.9, sum by (model_name, le) (rate(ray_vllm_e2e_request_latency_seconds_bucket[{R}])))",
       "{{model_name}} p90")]),
]


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, as Grafana sends it (with its variables)."""
    return [expr for _, _, targets in PANELS for expr, _ in targets]


def dashboard() -> dict:
    """The Grafana dashboard JSON model (schemaVersion 39: Grafana 10 and later)."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": source,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "datasource": source, "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "rollfleet", "uid": "rollfleet", "schemaVersion": 39, "editable": True, "tags": ["rollfleet", "ray"],
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": "fleet", "label": "Fleet", "type": "query", "datasource": source, "refresh": 2,
             "query": {"query": "label_values(ray_rollfleet_trainer_step, fleet)", "refId": "fleets"},
             "definition": "label_values(ray_rollfleet_trainer_step, fleet)",
             "includeAll": True, "multi": True, "allValue": ".+", "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


def dashboard_json() -> str:
    """The dashboard as the chart's file holds it (the ConfigMap's data)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"
