"""launch.py and demo.py: the RayJob entrypoint's config errors, and `rollfleet demo` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rollfleet.values import load_values
from rollfleet import demo
from rollfleet.runtime import launch
from rollfleet.spec import runtime_config

from conftest import ROOT


def _config(tmp_path, values) -> str:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(values) if not isinstance(values, str) else values)
    return str(path)


def test_launch_with_a_bad_field_exits_2_naming_it(tmp_path, capsys):
    config = runtime_config(demo.local_spec())
    config["sync"]["timeoutSeconds"] = 0
    path = _config(tmp_path, config)
    assert launch.main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: sync.timeoutSeconds:" in err
    assert "Traceback" not in err


def test_launch_with_a_misspelt_key_suggests_the_right_one(tmp_path, capsys):
    path = _config(tmp_path, {"engine": "cpu-standin", "sync": {"timeoutSecond": 5}})
    assert launch.main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "sync.timeoutSecond: unknown key; did you mean 'sync.timeoutSeconds'?" in err


def test_launch_with_a_cross_field_problem_exits_2(tmp_path, capsys):
    path = _config(tmp_path, {"engine": "cpu-standin", "vllm": {"tensorParallelSize": 2}})  # the stand-in has no TP
    assert launch.main(["--config", path]) == 2
    assert "vllm.tensorParallelSize: the cpu-standin engine has no tensor parallelism" in capsys.readouterr().err


def test_launch_with_unreadable_config_exits_2_naming_the_file(tmp_path, capsys):
    bad_json = _config(tmp_path, "{not json")
    assert launch.main(["--config", bad_json]) == 2
    assert f"error: {bad_json}:" in capsys.readouterr().err
    missing = str(tmp_path / "absent.json")
    assert launch.main(["--config", missing]) == 2
    assert f"error: {missing}:" in capsys.readouterr().err


def test_demo_runs_the_local_example_values():
    spec = demo.local_spec()
    assert spec == load_values(ROOT / "manifests" / "examples" / "local.yaml")
    assert spec.engine == "cpu-standin" and spec.sync_backend == "gloo"
    assert spec.engines == 2 and spec.world_size == 3 and spec.pools.trainer.gpus == 2
    assert demo.local_spec(["job.steps=5"]).job.steps == 5


@pytest.mark.slow
def test_rollfleet_demo_passes_end_to_end(tmp_path):
    """`rollfleet demo` as a user runs it: local Ray, 2 stand-in engines, 2 trainer ranks (FSDP2 over
    gloo), the asynchronous built-in GRPO trainer, 3 pushes."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # ignored: the demo starts its own local Ray
    proc = subprocess.run([sys.executable, "-m", "rollfleet.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "CPU STAND-IN" in out and ": PASS" in out
    assert "trainer group: 2 rank(s); weights sharded with FSDP2" in out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["step", "version", "policy"])
    table = [ln.split() for ln in lines[header + 1:] if ln.split()[:1] in (["1"], ["2"], ["3"])][:3]
    assert [row[:3] for row in table] == [["1", "1", "wait"], ["2", "2", "wait"], ["3", "3", "wait"]]  # as steps end
    (line,) = [ln for ln in lines if ln.startswith("ROLLFLEET_RESULT ")]
    rows = json.loads(line.removeprefix("ROLLFLEET_RESULT "))
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["version"] for r in rows] == [1, 2, 3]
    assert [r["staleness"] for r in rows] == [0, 1, 1]  # step k+1 generated while step k trained
    for r in rows:
        assert r["checksums_ok"] is True, r
        assert r["outputs_changed"] is True and r["versions_stamped"] is True, r


@pytest.mark.slow
def test_rollfleet_demo_colocated_passes_end_to_end(tmp_path):
    """`rollfleet demo --colocated`: each trainer rank and its stand-in engine share a slot; the engine
    sleeps while the rank trains and gets the weights through the shared-memory stand-in for CUDA IPC."""
    proc = subprocess.run([sys.executable, "-m", "rollfleet.cli", "demo", "--colocated"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "rollfleet demo (colocated)" in out and "shared memory in place of CUDA IPC" in out and ": PASS" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("ROLLFLEET_RESULT ")]
    rows = json.loads(line.removeprefix("ROLLFLEET_RESULT "))
    assert [r["version"] for r in rows] == [1, 2, 3] and all(r["staleness"] == 0 for r in rows)
    assert all(r["checksums_ok"] and r["outputs_changed"] and r["versions_stamped"] for r in rows)
