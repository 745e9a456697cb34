"""metrics.py: rollfleet's metrics reach a real Prometheus from Ray's metrics endpoint. The runs of
tests/loop_runs.py (four fleets on one local Ray, an engine killed in one) are scraped every second by
Debian's prometheus on loopback; every metric of metrics.METRICS and the stand-in's vLLM names
(metrics.VLLM) must have series with their labels, and the values must be the runs' own. The same
Prometheus evaluates the rendered alert rules throughout (the killed engine's restart must fire its
alert), and every expression of the dashboard and of the alerts returns data when the runs end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from rollfleet import monitoring
from rollfleet.runtime import metrics

import loop_runs as loop_runs_module
from conftest import ROOT
from loop_runs import STEPS

WINDOW = "30m"  # the runs are over when the queries run: their last samples, not instant values


def test_outside_ray_recording_does_nothing_and_never_raises():
    metrics.inc("rollfleet_requests_received", fleet="f", engine=0)
    metrics.set("rollfleet_weight_version", 3, fleet="f", engine=0)
    metrics.observe("rollfleet_push_seconds", 0.1, fleet="f")
    metrics.zero("rollfleet_engine_restarts", fleet="f", engine=0)
    metrics.StepClock("f").row({"step": 1, "loss": 0.5, "reward": "not a number"})


def test_a_silent_metrics_endpoint_is_named_and_an_answering_one_is_not():
    import http.server
    import socket
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ray_up 1\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket is closed
    nodes = [{"Alive": True, "NodeManagerAddress": "127.0.0.1", "MetricsExportPort": port}
             for port in (server.server_address[1], closed)] + [{"Alive": False, "NodeManagerAddress": "x"}]
    try:
        assert metrics.silent_endpoints(nodes, timeout_s=1, poll_s=0.2) == [f"http://127.0.0.1:{closed}/metrics"]
    finally:
        server.shutdown()


def test_exported_names_follow_rays_exporter():
    assert metrics.exported("rollfleet_requests_received") == "ray_rollfleet_requests_received_total"
    assert metrics.exported("rollfleet_push_seconds") == "ray_rollfleet_push_seconds_count"
    assert metrics.exported("vllm_num_requests_running") == "ray_vllm_num_requests_running"


def test_every_metric_is_documented():
    page = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [n for n in [*metrics.METRICS, *metrics.VLLM] if f"`{metrics.exported(n).removesuffix('_count')}" not in page]
    assert not missing, f"docs/monitoring.md does not list {missing}"


@pytest.fixture(scope="module")
def prometheus(loop_runs):
    server = loop_runs["prometheus"]
    if isinstance(server, BaseException):
        raise server
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's package")
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    return server


def _series(prometheus, name: str, by: tuple[str, ...]) -> dict[tuple, float]:
    result = prometheus.query(f"max by ({', '.join(by)}) (last_over_time({metrics.exported(name)}[{WINDOW}]))")
    return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in result}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(metrics.METRICS))
def test_every_rollfleet_metric_has_series_with_its_labels(prometheus, name):
    labels = metrics.METRICS[name][2]
    series = _series(prometheus, name, labels)
    assert series, f"no series of {metrics.exported(name)} in Prometheus"
    assert {key[0] for key in series} == {"local"}  # the fleet's name (spec.name)
    if "engine" in labels:
        assert {key[1] for key in series} == {"0", "1"}, series
    if "state" in labels:
        assert {key[2] for key in series} == set(metrics.STATES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(metrics.VLLM))
def test_the_stand_in_exports_vllms_names(prometheus, name):
    series = _series(prometheus, name, metrics.VLLM_LABELS)
    assert series and {key for key in series} == {("rollfleet/tiny-random-qwen2", "0")}, series


@pytest.mark.slow
def test_the_values_are_the_runs_own(prometheus):
    assert _series(prometheus, "rollfleet_trainer_step", ("fleet",)) == {("local",): STEPS}
    assert max(_series(prometheus, "rollfleet_weight_version", ("engine",)).values()) == STEPS
    assert _series(prometheus, "rollfleet_engine_restarts", ("engine",))[("0",)] >= 1  # the killed engine
    assert _series(prometheus, "rollfleet_requests_failed", ("fleet",)) == {("local",): 0}
    # a state held for less than Ray's report interval (dead → restarting takes milliseconds) may never be
    # seen by a gauge: the restart counter above is what records a fault
    assert _series(prometheus, "rollfleet_engine_state", ("state",))[("healthy",)] == 1
    tokens = prometheus.query(f"sum(max_over_time({metrics.exported('rollfleet_tokens_generated')}[{WINDOW}]))")
    assert float(tokens[0]["value"][1]) >= 4 * STEPS * 64  # 4 runs × steps × 64 samples, a token at least each
    fresh = prometheus.query(f"last_over_time({metrics.exported('rollfleet_sample_staleness').removesuffix('_count')}"
                             f'_bucket{{le="0.5"}}[{WINDOW}])')
    assert sum(float(r["value"][1]) for r in fresh) > 0  # on-policy groups were taken


def _quantity(expr: str) -> str:
    """An alert's expression without its comparison: the quantity it watches (prometheusrule.yaml.j2)."""
    quantity, n = re.subn(r" (>=|>|<=|<|==) [0-9.]+$", "", expr)
    assert n == 1, f"not `<quantity> <comparison> <threshold>`: {expr}"
    return quantity


def _rules(loop_runs) -> list[dict]:
    return [rule for group in json.loads(loop_runs["rules"].read_text())["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("staleness", [0, 4])
def test_promtool_accepts_the_rendered_rules(tmp_path, staleness):
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; .ci/run installs Debian's prometheus")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rules = loop_runs_module.alert_rules({**loop_runs_module.ALERTS, "rollout": {"maxStaleness": staleness}})
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    promtool = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                              text=True, timeout=60)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    assert f"SUCCESS: {4 + (staleness > 0)} rules found" in promtool.stdout


@pytest.mark.slow
def test_prometheus_evaluated_every_alert_rule_without_error(prometheus, loop_runs):
    loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in _rules(loop_runs))
    assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded


@pytest.mark.slow
def test_the_killed_engines_restart_fired_its_alert(prometheus, loop_runs):
    fired = prometheus.query('max_over_time(ALERTS{alertname="RollfleetEngineRestarting", alertstate="firing"}[30m])',
                             at=loop_runs["ended_at"])
    assert {(r["metric"]["fleet"], r["metric"]["engine"]) for r in fired} == {("local", "0")}, fired
    quiet = prometheus.query('max_over_time(ALERTS{alertname=~"RollfleetEngineFailed|RollfleetNoStep"}[30m])',
                             at=loop_runs["ended_at"])
    assert quiet == []  # no engine failed for good, and steps came every few seconds


@pytest.mark.slow
def test_every_alert_quantity_returns_data(prometheus, loop_runs):
    empty = [r["alert"] for r in _rules(loop_runs) if not prometheus.query(_quantity(r["expr"]), at=loop_runs["alive_at"])]
    assert not empty, f"alert expressions without data: {empty}"


@pytest.mark.slow
@pytest.mark.parametrize("expr", monitoring.expressions())
def test_every_dashboard_expression_returns_data(prometheus, loop_runs, expr):
    # as Grafana sends it: $fleet is the selected fleets' regex, $__rate_interval a window of scrapes
    query = expr.replace("$fleet", "local").replace("$__rate_interval", "1m")
    result = prometheus.query(query, at=loop_runs["alive_at"])
    assert result, f"no data for {query}"
