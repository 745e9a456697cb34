"""Idempotence under CRD defaulting: a second deploy of any example is `unchanged`.

kube-apiserver applies the CRDs' `default:`s after the server-side-apply merge, and decides whether an
apply is a no-op before that: a field the CRD defaults inside a list that is applied whole (like
`workerGroupSpecs[].priority`) makes every apply a write (DESIGN §11). The FAKE API server applies the
same defaults, read from the CRD files (tests/crd_schema.py), so these tests fail on templates that
leave such a field to the server.
"""

from __future__ import annotations

import copy

import pytest

from conftest import EXAMPLES
from crd_schema import defaults_in_lists, missing_list_defaults, schema_of
from rollfleet.render import render_objects
from rollfleet.values import load_values

from .conftest import operator_deployment


def test_the_fields_defaulted_inside_lists_are_derived_from_the_crds(crds):
    derived = {".".join(path) for path, _ in defaults_in_lists(schema_of("RayJob", str(crds)))}
    assert "spec.rayClusterSpec.workerGroupSpecs.[].priority" in derived  # what the real server showed
    assert "spec.rayClusterSpec.headGroupSpec.template.spec.containers.[].ports.[].protocol" in derived
    assert len(derived) > 50  # every list in the embedded pod specs: the check below is not a list of two


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.stem)
def test_renders_set_every_field_the_crds_default_inside_lists(crds, example):
    """The Jinja render (and so the chart, by parity: tests/test_chart.py) leaves no list default to the server."""
    for obj in render_objects(load_values(example)):
        if obj["kind"] in ("RayJob", "RayCluster"):
            assert missing_list_defaults(obj, schema_of(obj["kind"], str(crds))) == []


def seed_for(fake, objects):
    namespace = objects[0]["metadata"]["namespace"]
    fake.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    fake.add(operator_deployment())
    from rollfleet.deploy.fleet import secret_refs

    keys: dict[str, set[str]] = {}
    for r in secret_refs(objects):  # every Secret the fleet references, with the keys it reads
        keys.setdefault(r.name, set()).update([r.key] if r.key else [])
    for name, wanted in keys.items():
        fake.add({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                  "data": {k: "eA==" for k in wanted or {"token"}}})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.stem)
def test_a_second_deploy_of_every_example_is_unchanged(fake, rollfleet, example):
    seed_for(fake, render_objects(load_values(example)))
    args = ("--wait", "none", "--skip-gpu-check")
    rc, out, err = rollfleet("deploy", *args, values=str(example))
    assert rc == 0, err
    stored = copy.deepcopy(fake.objects)
    rc, out, err = rollfleet("deploy", *args, values=str(example))
    assert rc == 0, err
    kinds = tuple(f"{o['kind']} " for o in render_objects(load_values(example)))
    outcomes = [line for line in out.splitlines() if line.startswith(kinds)]
    assert len(outcomes) == len(kinds) and all(line.endswith(": unchanged") for line in outcomes), outcomes
    assert fake.objects == stored  # same resourceVersions, nothing written
    rc, out, err = rollfleet("diff", values=str(example))
    assert rc == 0 and out.startswith("no changes:"), out


def test_the_same_render_without_its_list_defaults_is_never_unchanged(fake, crds):
    """The bug as the real server showed it, on today's render with the defaulted fields taken out (what the
    templates rendered before): every apply writes again."""
    objects = render_objects(load_values(EXAMPLES[0]))
    seed_for(fake, objects)
    (rayjob,) = [o for o in objects if o["kind"] == "RayJob"]
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        del group["priority"]
    assert missing_list_defaults(rayjob, schema_of("RayJob", str(crds)))
    versions = {fake.apply(rayjob, "rollfleet")["metadata"]["resourceVersion"] for _ in range(3)}
    assert len(versions) == 3
