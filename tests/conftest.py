"""Shared fixtures. Tests mirror src/: test_spec.py ↔ spec.py, and so on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollfleet.demo import RAY_ENV  # the env Ray and HF need here, set before any `import ray`

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))

for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)


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
