"""launch.py and demo.py: the RayJob entrypoint's config errors, and `rollfleet demo` end to end."""

from __future__ import annotations

import json
import os
import signal
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


def _demo(tmp_path, *args, stop_after: int | None = None):
    """`rollfleet demo ARGS` as a user runs it; `stop_after`: SIGTERM it (a job killed mid-run) once
    that step's row is printed. Returns (exit code, stdout, the ROLLFLEET_RESULT rows or None)."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # ignored: the demo starts its own local Ray
    proc = subprocess.Popen([sys.executable, "-m", "rollfleet.cli", "demo", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if stop_after is not None and line.split()[:2] == [str(stop_after), str(stop_after)]:
            proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=400)
    text = "".join(out)
    rows = [json.loads(ln.removeprefix("ROLLFLEET_RESULT ")) for ln in out if ln.startswith("ROLLFLEET_RESULT ")]
    return code, text, rows[0] if rows else None


def _table(text: str) -> list[list[str]]:
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["step", "version", "policy"])
    return [ln.split() for ln in lines[header + 1:] if ln.split()[:1] and ln.split()[0].isdigit()]


@pytest.mark.e2e
def test_rollfleet_demo_colocated_learns_and_rides_through_an_engine_killed_while_asleep(tmp_path):
    """`rollfleet demo --colocated --kill-engine 5`: each trainer rank and its stand-in engine share a slot;
    the engine sleeps while the rank trains and gets the weights through the shared-memory stand-in for
    CUDA IPC. Engine 0 is SIGKILLed while asleep after step 5: its rank's push waits for the new
    incarnation and re-admits it; every step completes and the reward rises."""
    code, out, rows = _demo(tmp_path, "--colocated", "--kill-engine", "5", "--plot", "")
    assert code == 0, out[-4000:]
    assert "rollfleet demo (colocated)" in out and "shared memory in place of CUDA IPC" in out
    assert "killed with SIGKILL while asleep" in out and "engine 0: healthy: synced to v" in out, out[-3000:]
    assert "[rollfleet] recovery: engine 0: detected after" in out and "serving again" in out
    assert ", 0 failed," in out
    assert ": PASS: learned" in out, out[-2000:]
    assert [r["version"] for r in rows] == list(range(1, 21)) and all(r["staleness"] == 0 for r in rows)
    assert all(r["checksums_ok"] and r["versions_stamped"] for r in rows)
    assert not (tmp_path / "rollfleet-demo.png").exists()


@pytest.mark.e2e
def test_the_demo_learns_rides_through_a_killed_engine_and_a_killed_job_resumes_at_its_checkpoint(tmp_path):
    """`rollfleet demo` as a user runs it (local Ray, 2 stand-in engines, 2 trainer ranks sharding the model
    with FSDP2 over gloo, the asynchronous built-in GRPO trainer; `sync.inflight: abort`, so that policy's
    run is the one shown to learn), with `--kill-engine 3`: engine 0 is
    SIGKILLed after step 3; every step still completes. The job is then killed (SIGTERM) after step 10 and
    started again: it resumes from the step-8 checkpoint with the same step and version numbering, and its
    verdict covers all 20 steps: the reward rose."""
    ckpt = tmp_path / "checkpoints"
    args = ["--set", f"job.checkpoint.path={ckpt}", "--set", "job.checkpoint.everySteps=4", "--set", "sync.inflight=abort"]
    code, out, rows = _demo(tmp_path, "--kill-engine", "3", *args, stop_after=10)
    assert code != 0 and rows is None  # it was stopped
    assert "CPU STAND-IN" in out and "trainer group: 2 rank(s); weights sharded with FSDP2" in out
    assert "[rollfleet] fault: engine 0 (pid" in out and "engine 0: dead: " in out, out[-3000:]
    assert "engine 0: healthy: synced to v" in out  # replaced, then re-admitted by a push
    table = _table(out)
    assert [row[:3] for row in table] == [[str(k), str(k), "abort"] for k in range(1, 11)]  # no step lost, one line each
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000008"]
    code, out, rows = _demo(tmp_path, *args)
    assert code == 0, out[-4000:]
    assert f"resuming from {ckpt}/step-00000008 (step 8, v8)" in out
    assert [row[:2] for row in _table(out)] == [[str(k), str(k)] for k in range(9, 21)]  # numbering goes on
    assert [r["step"] for r in rows] == list(range(1, 21)) and [r["version"] for r in rows] == list(range(1, 21))
    assert rows[0]["staleness"] == 0 and all(r["staleness"] <= 1 for r in rows)  # k+1 generated while k trained
    assert all(r["checksums_ok"] is True and r["versions_stamped"] is True for r in rows)
    assert ": PASS: learned: reward" in out, out[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000016", "step-00000020"]  # job.checkpoint.keep=2
    assert (tmp_path / "rollfleet-demo.png").stat().st_size > 10_000  # the plot of the whole run
