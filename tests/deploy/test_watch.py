"""deploy/watch.py: waits say what they wait for and for how long, stop at a failure or when no operator
answers, and end with the reasons pods and events give (FAKE API server stand-in; short timeouts)."""

from __future__ import annotations

import pytest

from rollfleet.deploy import watch
from rollfleet.deploy.fleet import rendered_fleet
from rollfleet.render import render_objects
from rollfleet.spec import load_spec

from .conftest import kuberay_stand_in, ready_pod


def test_wait_timeout_says_what_it_waited_for_and_that_no_operator_answered(cluster, rollfleet):
    rc, out, err = rollfleet("deploy", "--timeout", "0.2")
    assert rc == 1
    assert ("error: timed out after 0.2s waiting for RayJob rl/smoke to be running (jobDeploymentStatus Running: "
            "cluster ready, job submitted)") in err
    assert "error: last seen: RayJob rl/smoke: deployment -, job -; RayCluster -: -; pods ready: head 0/1" in err
    assert ("error: RayJob rl/smoke has no status after 0s: no KubeRay operator reconciles it (not installed, not "
            "running, or not watching namespace rl); check: kubectl get pods -A -l "
            "app.kubernetes.io/component=kuberay-operator") in err
    assert "images may still be pulling" not in err


def test_a_top_object_without_status_after_the_grace_period_stops_the_wait(cluster, rollfleet, monkeypatch):
    monkeypatch.setattr(watch, "OPERATOR_GRACE_SECONDS", 0.1)
    rc, out, err = rollfleet("deploy", "--timeout", "30")
    assert rc == 1 and "timed out" not in err
    assert "error: RayJob rl/smoke has no status after 0s: no KubeRay operator reconciles it" in err


def test_with_status_and_no_problem_the_timeout_says_raise_it(cluster, rollfleet):
    def operator(server, obj):
        if obj["kind"] == "RayJob":
            server.set_status("RayJob", "smoke", "rl", {"jobDeploymentStatus": "Initializing"})
    cluster.on_write = operator
    rc, out, err = rollfleet("deploy", "--timeout", "0.2")
    assert rc == 1 and "error: no pod or event reports a problem" in err
    assert "raise --timeout (or timeouts.initSeconds)" in err


def test_wait_timeout_default_comes_from_timeouts_init_seconds(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("status", "--wait", "complete", values=values_file(timeouts={"initSeconds": 1}))
    assert rc == 1 and "error: timed out after 1s waiting for RayJob rl/smoke to succeed (jobDeploymentStatus " \
                       "Complete, jobStatus SUCCEEDED)" in err


def test_timeouts_take_durations(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="SUCCEEDED", deployment="Complete")
    rc, out, err = rollfleet("deploy", "--wait", "complete", "--timeout", "1m")
    assert rc == 0, err
    assert "waiting up to 60s for RayJob rl/smoke to succeed" in out


def test_wait_names_the_reasons_pending_pods_give(cluster, rollfleet):
    unschedulable = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    cluster.add(ready_pod("smoke-inference-0", "inference", ready=False, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}]))
    cluster.add(ready_pod("smoke-head-0", "head", ready=False, containerStatuses=[
        {"name": "ray-head", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                   "message": 'Back-off pulling image "ghcr.io/x/y:0"'}}}]))
    cluster.add(ready_pod("smoke-trainer-0", "trainer", ready=False, containerStatuses=[
        {"name": "ray-worker", "state": {"running": {}},
         "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]))
    cluster.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke-x7k2p", "namespace": "rl",
                                                                   "labels": {"job-name": "smoke"}},
                 "spec": {"containers": [{"name": "ray-job-submitter"}]}, "status": {"phase": "Pending"}})
    for i, (pod, reason, message) in enumerate([
            ("smoke-inference-0", "FailedScheduling", unschedulable),
            ("smoke-head-0", "Failed", 'Failed to pull image "ghcr.io/x/y:0": not found'),
            ("smoke-x7k2p", "FailedMount", 'MountVolume.SetUp failed: configmap "nope" not found'),
            ("unrelated-pod", "FailedScheduling", "not ours")]):
        cluster.add({"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
                     "metadata": {"name": f"ev{i}", "namespace": "rl"},
                     "involvedObject": {"kind": "Pod", "name": pod, "namespace": "rl"}})
    rc, out, err = rollfleet("deploy", "--timeout", "0.2")
    assert rc == 1
    assert ("error: pod smoke-inference-0 (pools.inference): unschedulable: 0/3 nodes are available: 3 Insufficient "
            "nvidia.com/gpu. preemption: 0/3 nodes are available.; not enough free nvidia.com/gpu on nodes matching "
            "pools.inference") in err
    assert ('error: pod smoke-head-0 (head): container ray-head ImagePullBackOff: Back-off pulling image '
            '"ghcr.io/x/y:0"; check image.repository, image.tag') in err
    assert ("error: pod smoke-trainer-0 (pools.trainer): container ray-worker was OOMKilled (out of its memory "
            "limit); raise pools.trainer.memory") in err
    assert 'error: pod smoke-head-0 (head): Failed: Failed to pull image "ghcr.io/x/y:0": not found' in err
    assert "error: pod smoke-x7k2p (job): FailedMount: MountVolume.SetUp failed" in err
    assert "not ours" not in err
    assert err.count("Insufficient nvidia.com/gpu") == 1  # the event repeats the condition: said once
    # the same problems show while waiting, as they appear
    assert "problem: pod smoke-inference-0 (pools.inference): unschedulable" in out


def test_wait_stops_at_a_failed_rayjob_with_its_reason(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="FAILED", deployment="Failed")
    rc, out, err = rollfleet("deploy", "--timeout", "30")
    assert rc == 1
    assert "error: RayJob rl/smoke failed: deployment Failed, job FAILED" in err
    assert "timed out" not in err


def test_wait_complete(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="SUCCEEDED", deployment="Complete")
    rc, out, err = rollfleet("deploy", "--wait", "complete", "--timeout", "5")
    assert rc == 0, err
    assert "RayJob rl/smoke succeeded" in out


def test_wait_for_a_standalone_raycluster(cluster, rollfleet, values_file):
    def operator(server, obj):
        if obj["kind"] == "RayCluster":
            server.set_status("RayCluster", "smoke", "rl", {"state": "ready", "conditions": [
                {"type": "RayClusterProvisioned", "status": "True"}]})
    cluster.on_write = operator
    values = values_file(job={"enabled": False})
    rc, out, err = rollfleet("deploy", values=values)
    assert rc == 0, err
    assert "RayCluster rl/smoke: created" in out
    assert "RayCluster rl/smoke to be ready (state ready: 1 head + 1 trainer + 1 inference pod(s))" in out
    rc, out, err = rollfleet("deploy", "--wait", "complete", values=values)
    assert rc == 2 and "a standalone RayCluster never completes; use --wait ready" in err


def fleet(**values):
    return rendered_fleet(render_objects(load_spec({"name": "smoke", **values})))


def test_the_pods_a_fleet_wants_come_from_its_objects():
    f = fleet(pools={"trainer": {"nodes": 2}, "inference": {"nodes": 3}})
    assert f.want == {"head": 1, "trainer": 2, "inference": 3}
    assert f.init_seconds == load_spec({}).timeouts.init_seconds and f.config == "smoke-config"


def test_pod_problems_are_pure():
    pod = ready_pod("p", "inference", ready=False, containerStatuses=[
        {"name": "ray-worker", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    assert watch.pod_problems(fleet(), [pod], []) == [
        "pod p (pools.inference): container ray-worker CrashLoopBackOff; see `rollfleet logs --component ...`"]
    event = {"reason": "FailedToCreateRayCluster", "message": "admission webhook denied",
             "involvedObject": {"kind": "RayJob", "name": "smoke"}}
    assert watch.pod_problems(fleet(), [], [event]) == [
        "RayJob default/smoke: FailedToCreateRayCluster: admission webhook denied"]


@pytest.mark.parametrize("state, done", [({"state": "ready"}, True), ({"state": "-"}, False)])
def test_judge_a_raycluster(state, done):
    f = fleet(job={"enabled": False})
    snap = watch.judge(f, "ready", {"status": state}, [])
    assert snap.done is done and snap.has_status and snap.pods["head"] == {"ready": 0, "want": 1}
