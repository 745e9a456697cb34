"""Shared fixtures. Tests mirror src/: test_spec.py ↔ spec.py, and so on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from rollfleet.demo import RAY_ENV  # the env Ray and HF need here, set before any `import ray`

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))

for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)

# CI replays the same examples every run (a landing never hinges on a new random draw); elsewhere the
# property tests draw new ones, and what they find is kept as an @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs on 2 xdist workers with --dist loadgroup: every `slow` test (each starts a local
    Ray) goes to one worker, one after another, so two Rays never compete; the rest share both."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="module")
def reference():
    """The stand-in's reference generator (tests/reference.py): what each weight version gives."""
    from reference import Reference

    ref = Reference()
    yield ref
    ref.close()


@pytest.fixture(scope="session")
def loop_runs(tmp_path_factory):
    """The shared runs of the training loop (tests/loop_runs.py), with the Prometheus that scraped them."""
    import loop_runs as runs

    out = runs.run_all(tmp_path_factory.mktemp("loop-runs"))
    yield out
    if out["prometheus"] is not None and not isinstance(out["prometheus"], BaseException):
        out["prometheus"].stop()


@pytest.fixture(scope="session")
def crds() -> Path:
    """The KubeRay v1.7.0 CRDs. In CI (CI=true) their absence fails; elsewhere it skips (run `make crds`)."""
    from rollfleet.validate import CrdsMissing, crds_dir

    try:
        return crds_dir()
    except CrdsMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


# ---- the end of the run ----------------------------------------------------------------------------
# The tests leave gloo process groups in this process (some broken by design, with work pending) and their
# native threads; destroying them while the interpreter tears down C++ statics can crash (seen once in CI:
# a segfault in libstdc++ after every test had passed and the summary was printed). Like the receivers in
# test_sync (os._exit), the run ends without that teardown, once everything is reported, with pytest's
# exit status. ROLLFLEET_FULL_TEARDOWN=1 keeps the normal interpreter exit.
_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "status" in _EXIT and not hasattr(config, "workerinput") and not os.environ.get("ROLLFLEET_FULL_TEARDOWN"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
