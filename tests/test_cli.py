"""cli.py: `rollfleet render | validate | schema`, in-process (fast) plus one console-script smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import EXAMPLES
from rollfleet.cli import main
from rollfleet.render import render_objects, to_yaml
from rollfleet.values import load_values

EXAMPLE = next(e for e in EXAMPLES if e.stem == "one-node-8gpu")
COLOCATED = next(e for e in EXAMPLES if e.stem == "one-node-8gpu-colocated")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    return lines


def test_render_prints_multi_document_yaml(capsys):
    code, out, err = run(capsys, "render", "-f", str(EXAMPLE))
    assert code == 0 and err == ""
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob", "NetworkPolicy"]
    assert out == to_yaml(render_objects(load_values(EXAMPLE)))


def test_render_without_values_uses_the_defaults(capsys):
    code, out, _ = run(capsys, "render")
    assert code == 0
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(out)] == ["rollfleet-config", "rollfleet", "rollfleet"]


def test_render_to_a_directory_writes_one_file_per_object(capsys, tmp_path):
    out_dir = tmp_path / "out" / "nested"
    code, out, err = run(capsys, "render", "-f", str(EXAMPLE), "-o", str(out_dir))
    assert code == 0 and out == ""
    assert "wrote 3 objects" in err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "grpo-8gpu.configmap.yaml", "grpo-8gpu.networkpolicy.yaml", "grpo-8gpu.rayjob.yaml"]
    (job,) = yaml.safe_load_all((out_dir / "grpo-8gpu.rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "grpo-8gpu"


def test_render_to_a_directory_removes_only_this_fleets_stale_files(capsys, tmp_path):
    (tmp_path / "other.rayjob.yaml").write_text("kept")
    (tmp_path / "notes.txt").write_text("kept")
    assert run(capsys, "render", "--set", "name=a", "-o", str(tmp_path))[0] == 0
    code, _, _ = run(capsys, "render", "--set", "name=a,job.enabled=false,networkPolicy.enabled=false",
                     "-o", str(tmp_path))
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.configmap.yaml", "a.raycluster.yaml", "notes.txt", "other.rayjob.yaml"]


def test_set_overrides_the_values_file(capsys):
    code, out, _ = run(capsys, "render", "-f", str(EXAMPLE), "--set", "pools.inference.gpusPerNode=8",
                       "--set", "vllm.tensorParallelSize=2", "--set", "name=over")
    assert code == 0
    cm, job, _ = yaml.safe_load_all(out)
    assert job["metadata"]["name"] == "over"
    inference = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]
    assert inference["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert json.loads(cm["data"]["fleet.json"])["vllm"]["tensorParallelSize"] == 2


def test_bad_values_exit_2_with_one_error_line_per_problem_and_write_nothing(capsys, tmp_path):
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump({
        "name": "Bad_Name",
        "pools": {"inference": {"gpusPerNod": 8}, "trainer": {"memory": "lots"}},
        "job": {"submissionMode": "SidecarMode"},
    }))
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "render", "-f", str(values), "-o", str(out_dir))
    assert code == 2 and out == ""
    lines = error_lines(err)
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "job.submissionMode", "name", "pools.inference.gpusPerNod", "pools.trainer.memory"]
    assert not out_dir.exists()
    # cross-field problems in the same run as field problems: one line each too
    code, _, err = run(capsys, "render", "--set", "name=Bad_Name", "--set", "vllm.tensorParallelSize=3",
                       "-o", str(out_dir))
    assert code == 2
    assert [line.split(":")[1].strip() for line in error_lines(err)] == ["name", "vllm.tensorParallelSize"]
    assert not out_dir.exists()


def test_bad_values_leave_an_existing_output_directory_untouched(capsys, tmp_path):
    code, _, err = run(capsys, "render", "--set", "vllm.tensorParallelSize=3", "-o", str(tmp_path))
    assert code == 2
    assert error_lines(err) == [line for line in err.splitlines() if "vllm.tensorParallelSize" in line]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "fragment"), [
    (["render", "--set", "pools.inference.gpusPerNode"], "--set"),
    (["render", "-f", "/nonexistent/values.yaml"], "/nonexistent/values.yaml"),
    (["render", "--set", "env.VLLM_USE_V1=1"], "env.VLLM_USE_V1"),  # YAML int, refused: quote it
])
def test_usage_errors_exit_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    (line,) = error_lines(err)
    assert fragment in line


def test_validate_ok(capsys, crds):
    code, out, err = run(capsys, "validate", "-f", str(EXAMPLE), "--crds", str(crds))
    assert code == 0 and err == ""
    assert out.startswith("ok: ConfigMap/grpo-8gpu-config, RayJob/grpo-8gpu, NetworkPolicy/grpo-8gpu valid")
    assert "4 engine(s) × TP 1, 4 trainer GPU(s)" in out


def test_validate_bad_values_exit_2(capsys, crds):
    code, out, err = run(capsys, "validate", "--set", "pools.trainer.gpusPerNode=0", "--crds", str(crds))
    assert code == 2 and out == ""
    (line,) = error_lines(err)
    assert line.startswith("error: pools.trainer.gpusPerNode: ")


def test_validate_reports_schema_problems_with_exit_1(capsys, crds, monkeypatch):
    import rollfleet.render

    real = rollfleet.render.render_objects

    def broken(spec):
        objs = real(spec)
        objs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["bogus"] = True
        return objs

    monkeypatch.setattr(rollfleet.render, "render_objects", broken)
    code, out, err = run(capsys, "validate", "--crds", str(crds))
    assert code == 1 and out == ""
    (line,) = error_lines(err)
    assert line.startswith("error: RayJob/rollfleet: spec.rayClusterSpec.workerGroupSpecs.0: ") and "bogus" in line


def test_schema_prints_camel_case_json(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "rollfleet values"
    pool = schema["$defs"]["Pool"]["properties"]
    assert "gpusPerNode" in pool and "shmSize" in pool and "gpus_per_node" not in pool
    assert "bucketMiB" in schema["$defs"]["Sync"]["properties"]
    assert "rayVersion" in schema["properties"]


def test_console_script_smoke(tmp_path):
    script = Path(sys.executable).with_name("rollfleet")
    ok = subprocess.run([str(script), "render", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert [d["kind"] for d in yaml.safe_load_all(ok.stdout)] == ["ConfigMap", "RayJob", "NetworkPolicy"]
    bad = subprocess.run([str(script), "render", "--set", "pools.inference.gpusPerNod=8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: pools.inference.gpusPerNod: unknown key; did you mean 'pools.inference.gpusPerNode'?\n"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("rollfleet 0.1.0 (")


# --- values the way Helm reads them -----------------------------------------------------------------------


def test_several_values_files_and_set_string(capsys, tmp_path):
    base, team = tmp_path / "base.yaml", tmp_path / "team.yaml"
    base.write_text("name: base\npools: {inference: {gpusPerNode: 8}}\n")
    team.write_text("name: team\n")
    code, out, _ = run(capsys, "render", "-f", str(base), "-f", str(team), "--set", "vllm.tensorParallelSize=2",
                       "--set-string", "image.tag=1.10")
    assert code == 0
    cm, job, _ = yaml.safe_load_all(out)
    fleet = json.loads(cm["data"]["fleet.json"])
    assert (job["metadata"]["name"], fleet["pools"]["inference"]["gpusPerNode"]) == ("team", 8)
    assert fleet["image"]["tag"] == "1.10" and fleet["vllm"]["tensorParallelSize"] == 2


@pytest.mark.parametrize(("text", "fragment"), [
    ("name: a\nname: b\n", "bad.yaml:2:1: duplicate key 'name'"),
    ("name: [a\n", "bad.yaml:2:1: "),
    ("name: a\n---\nname: b\n", "bad.yaml:2:1: several YAML documents"),
    ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [{','.join([f'*{p}'] * 10)}]\n"
                                                for p, c in zip("abcdefgh", "bcdefghi")), "aliases expand"),
    ("a: " + "[" * 500 + "]" * 500 + "\n", "nested 501 levels deep"),
])
def test_yaml_problems_exit_2_with_file_line_column_and_write_nothing(capsys, tmp_path, text, fragment):
    values, out_dir = tmp_path / "bad.yaml", tmp_path / "out"
    values.write_text(text)
    code, out, err = run(capsys, "render", "-f", str(values), "-o", str(out_dir))
    assert code == 2 and out == "" and not out_dir.exists()
    (line,) = error_lines(err)
    assert f"error: {values}".removesuffix("bad.yaml") in line and fragment in line, line


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from importlib import metadata

    out = " ".join(capsys.readouterr().out.split())  # argparse wraps it
    assert out.startswith("rollfleet 0.1.0 (image tag 0.1.0-vllm0.14.1, Ray 2.52.1, KubeRay v1.7.0); installed here: ")
    assert f"ray {metadata.version('ray')}, torch {metadata.version('torch')}, " in out  # what runs here, beside the pins


def test_a_closed_pipe_ends_quietly():
    script = Path(sys.executable).with_name("rollfleet")
    piped = subprocess.run(f"{script} schema | head -c 10", shell=True, capture_output=True, text=True, timeout=60,
                           executable="/bin/bash")
    assert piped.stdout == '{\n  "$defs'[:10] and piped.stderr == "", piped.stderr


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_validate_prints_a_report(capsys, crds, fmt):
    code, out, err = run(capsys, "validate", "-f", str(EXAMPLE), "--crds", str(crds), "-o", fmt)
    assert code == 0 and err == ""
    report = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert report["valid"] is True and report["problems"] == []
    assert report["objects"] == ["ConfigMap/grpo-8gpu-config", "RayJob/grpo-8gpu", "NetworkPolicy/grpo-8gpu"]
    assert (report["engines"], report["trainerGpus"], report["namespace"]) == (4, 4, "rl")


def test_validate_counts_the_colocated_pool_once(capsys, crds):
    code, out, err = run(capsys, "validate", "-f", str(COLOCATED),
                         "--crds", str(crds), "-o", "json")
    report = json.loads(out)
    assert code == 0 and report["colocated"] is True
    assert (report["engines"], report["trainerGpus"], report["inferenceGpus"]) == (8, 8, 8)
    code, out, err = run(capsys, "validate", "-f", str(COLOCATED),
                         "--crds", str(crds))
    assert "8 engine(s) × TP 1, 8 trainer GPU(s), the same GPUs (colocated)" in out


def test_validate_report_names_the_value_problems(capsys, crds):
    code, out, err = run(capsys, "validate", "--set", "pools.trainer.nodes=0", "--crds", str(crds), "-o", "json")
    assert code == 2
    report = json.loads(out)
    assert report["valid"] is False and report["stage"] == "values"
    assert [p.split(":")[0] for p in report["problems"]] == ["pools.trainer.nodes"]
    assert error_lines(err)


@pytest.mark.parametrize(("module", "command", "extra"), [
    ("jsonschema", ["validate"], "validate"),
    ("kubernetes_validate", ["validate"], "validate"),
    ("ray", ["demo"], "runtime"),
])
def test_a_missing_extra_is_named_with_what_to_install(capsys, monkeypatch, module, command, extra):
    import sys as _sys

    for name in [m for m in _sys.modules if m == module or m.startswith(module + ".")] + ["rollfleet.validate"]:
        monkeypatch.delitem(_sys.modules, name, raising=False)
    monkeypatch.setitem(_sys.modules, module, None)  # `import module` now raises ModuleNotFoundError
    if module == "kubernetes_validate":
        monkeypatch.setenv("ROLLFLEET_CRDS_DIR", "/nonexistent")  # reach the built-in kinds' check
        import rollfleet.validate as validate

        monkeypatch.setattr(validate, "validate_object", lambda obj, crds=None: __import__("kubernetes_validate"))
    code, out, err = run(capsys, *command)
    assert code == 2
    (line,) = error_lines(err)
    assert f"needs {module}, which is not installed; pip install 'rollfleet[{extra}]'" in line


def test_an_unexpected_failure_is_one_line_not_a_traceback(capsys, monkeypatch):
    import rollfleet.render

    monkeypatch.setattr(rollfleet.render, "render_objects", lambda spec: 1 / 0)
    code, out, err = run(capsys, "render")
    assert code == 1 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "ZeroDivisionError" in line and "ROLLFLEET_DEBUG=1" in line


# --- fuzz: mutated example values never give a traceback; what is accepted validates strictly ------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rollfleet.validate import validate_objects  # noqa: E402

_EXAMPLE_VALUES = [yaml.safe_load(e.read_text()) for e in EXAMPLES]
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                  st.text(max_size=12), st.sampled_from(["0", "1Gi", "500m", "a\nb: c", "{{ x }}", "NCCL_X", "-1"]),
                  st.lists(st.text(max_size=4), max_size=2), st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                                                             max_size=2))


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    yield path


@st.composite
def mutated_values(draw):
    import copy

    values = copy.deepcopy(draw(st.sampled_from(_EXAMPLE_VALUES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _leaves(values) if p]
        path = draw(st.sampled_from(paths))
        node = values
        for part in path[:-1]:
            node = node[part]
        if draw(st.booleans()):
            node[path[-1]] = draw(_JUNK)
        else:
            node[draw(st.sampled_from([path[-1], path[-1] + "x", "bogus"]))] = draw(_JUNK)
    return values


def run_captured(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=mutated_values())
def test_fuzz_mutated_examples(tmp_path_factory, crds, values):
    path = tmp_path_factory.mktemp("fuzz") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    code, out, err = run_captured("render", "-f", str(path))
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert out == "" and error_lines(err)
    else:
        assert validate_objects(list(yaml.safe_load_all(out)), crds) == []


def test_render_into_a_place_it_cannot_write_is_one_line(capsys, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code, out, err = run(capsys, "render", "-f", str(EXAMPLE), "-o", str(not_a_dir))
    assert code == 2 and error_lines(err) == [
        f"error: -o {not_a_dir}: cannot write there (File exists); give a directory you can write"]


def test_crds_given_without_the_files_names_them_and_the_download(capsys, tmp_path):
    code, out, err = run(capsys, "validate", "-f", str(EXAMPLE), "--crds", str(tmp_path))
    (line,) = error_lines(err)
    assert code == 2
    assert line.startswith(f"error: --crds {tmp_path}: ray.io_rayclusters.yaml, ray.io_rayjobs.yaml not there; ")
    assert "curl -fsSLO" in line


def test_an_interrupt_is_one_line(capsys, monkeypatch):
    import rollfleet.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_schema", interrupted)
    code, out, err = run(capsys, "schema")
    assert code == 130 and error_lines(err) == ["error: rollfleet schema interrupted"]
