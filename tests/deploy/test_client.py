"""deploy/client.py: connecting (kubeconfig files, contexts, namespaces) and its one-line errors."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
import yaml

from fake_apiserver import FakeApiServer
from rollfleet import cli
from rollfleet.deploy import client


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, err


def test_unreachable_api_server(tmp_path, capsys, values_file):
    fake = FakeApiServer().start()
    kubeconfig = fake.write_kubeconfig(tmp_path / "kc")
    fake.stop()
    rc, err = run(capsys, "deploy", "-f", values_file(), "--kubeconfig", str(kubeconfig))
    assert rc == 2
    assert "error: cannot reach the Kubernetes API server at http://127.0.0.1:" in err
    assert "check --context / --kubeconfig and that the cluster is up" in err


def local_kubeconfig(tmp_path, port: int):
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "u"}}]}))
    return kubeconfig


def test_a_server_that_never_answers_times_out(tmp_path, capsys, values_file, monkeypatch):
    """Discovery requests too (the dynamic client sets no timeout of its own)."""
    monkeypatch.setattr(client, "REQUEST_TIMEOUT", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never answers
        kubeconfig = local_kubeconfig(tmp_path, silent.getsockname()[1])
        started = time.monotonic()
        rc, err = run(capsys, "status", "-f", values_file(), "--kubeconfig", str(kubeconfig))
    assert rc == 2 and "error: cannot reach the Kubernetes API server at http://127.0.0.1:" in err
    assert "timed out" in err.lower()
    assert time.monotonic() - started < 30  # one bounded request, not a hang (urllib3 retries a few times)


def test_refused_credentials_are_one_line(tmp_path, capsys, values_file):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"kind": "Status", "status": "Failure", "message": "Unauthorized", "code": 401}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kubeconfig = local_kubeconfig(tmp_path, server.server_address[1])
        rc, err = run(capsys, "status", "-f", values_file(), "--kubeconfig", str(kubeconfig))
    finally:
        server.shutdown()
    assert rc == 2
    assert "refused discovery (401 Unauthorized: Unauthorized); refresh the credentials of the context" in err


def test_a_missing_kubeconfig_file_is_named(tmp_path, capsys, values_file, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "missing"
    rc, err = run(capsys, "status", "-f", values_file(), "--kubeconfig", str(missing))
    assert rc == 2
    assert err == (f"error: kubeconfig file {missing} (from --kubeconfig) does not exist; pass --kubeconfig with an "
                   f"existing file\n")
    monkeypatch.setenv("KUBECONFIG", f"{missing}:{missing}2")
    rc, err = run(capsys, "status", "smoke")
    assert rc == 2 and f"error: kubeconfig file {missing}, {missing}2 (from $KUBECONFIG) does not exist" in err
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    rc, err = run(capsys, "down", "smoke")
    assert rc == 2 and f"error: kubeconfig file {tmp_path}/.kube/config (from the default location) does not exist; " \
                       f"pass --kubeconfig, set KUBECONFIG, or run inside a pod with a service account" in err


def test_an_unknown_context_lists_the_contexts(fake, kubeconfig, capsys):
    rc, err = run(capsys, "status", "smoke", "--kubeconfig", kubeconfig, "--context", "prod")
    assert rc == 2
    assert err == (f"error: context 'prod' is not in kubeconfig {kubeconfig}; its contexts: fake-apiserver; pass one "
                   f"of them with --context\n")


def test_a_broken_kubeconfig_is_named(tmp_path, capsys):
    broken = tmp_path / "kc"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    rc, err = run(capsys, "status", "smoke", "--kubeconfig", str(broken))
    assert rc == 2 and f"error: kubeconfig {broken} is not usable" in err


def test_the_context_namespace_and_the_server_are_read(fake, tmp_path):
    path = fake.write_kubeconfig(tmp_path / "kc")
    config = yaml.safe_load(path.read_text())
    config["contexts"][0]["context"]["namespace"] = "team-a"
    path.write_text(yaml.safe_dump(config))
    kube = client.connect(str(path), None)
    assert kube.namespace == "team-a" and kube.where == f"{fake.url} (context fake-apiserver)"


def test_api_warnings_are_collected(fake, kubeconfig):
    fake.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
    kube = client.connect(kubeconfig, None)
    fake.admission = lambda obj: fake._warn("a stand-in deprecation") or None
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}, False)
    assert kube.warnings == ["a stand-in deprecation"]


@pytest.mark.parametrize("kind", ["RayJob", "Deployment"])
def test_a_kind_the_cluster_does_not_serve(kind, tmp_path):
    fake = FakeApiServer([t for t in FakeApiServer().types if t.kind not in ("RayJob", "Deployment")]).start()
    try:
        kube = client.connect(str(fake.write_kubeconfig(tmp_path / "kc")), None)
        with pytest.raises(client.NotServed, match=f"does not serve {kind}"):
            kube.list(kind)
    finally:
        fake.stop()
