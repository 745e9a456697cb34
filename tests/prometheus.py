"""A real Prometheus server for the tests (Debian's `prometheus` package; .ci/run installs it): on
loopback, scraping the local Ray's metrics endpoint every second, queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path


class Prometheus:
    def __init__(self, target: str, workdir: Path, rules: Path | None = None):
        """`target`: host:port of a Prometheus metrics endpoint (Ray's on this node)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}]}
        if rules is not None:
            config["rule_files"] = [str(rules)]
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"prometheus did not become ready within 30 s; its log: "
                                       f"{(workdir / 'prometheus.log').read_text()[-2000:]}") from None
                time.sleep(0.2)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query's result vector (each: {"metric": labels, "value": [t, v]}), now or `at` (Unix time)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        return self.api("query?" + urllib.parse.urlencode(params))["result"]

    def api(self, path: str) -> dict:
        """The `data` of a successful answer of the HTTP API at /api/v1/`path`."""
        answer = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=10).read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def targets_up(self) -> bool:
        return any(float(r["value"][1]) == 1 for r in self.query('up{job="ray"}'))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
