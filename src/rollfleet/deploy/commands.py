"""`rollfleet deploy | diff | status | logs | down`: the commands, built on client, preflight and watch.

deploy = render → preflight (every check runs; any failure: one error line each, nothing written,
exit 2) → server-side dry run of every object (a conflict or a rejected object also writes nothing,
exit 2; `--dry-run` stops here and prints what would change) → server-side apply as field manager
`rollfleet` → wait with a progress line until the fleet is ready or the timeout (default
`timeouts.initSeconds`) passes (exit 1, with the reasons read from pods and events). A second deploy
with the same values is a server-side-apply no-op: "unchanged".
"""

from __future__ import annotations

import argparse
import difflib
import json
import queue
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from rollfleet.deploy.client import Kube, KubeError, NotServed, api_message, connect
from rollfleet.deploy.fleet import (CREATED_KINDS, TOPS, Fleet, down_selector, helm_release, live_fleet, ref,
                                    rendered_fleet)
from rollfleet.deploy.preflight import gpu_table, preflight
from rollfleet.deploy.watch import FAILED, diagnose, err, observe, say, wait, wait_gone
from rollfleet.spec import KUBERAY_VERSION

NOTHING_APPLIED = 2  # bad input, a failed preflight check or a refused dry run: the cluster was not touched
DIFFERENT = 1  # `diff`: some object would change (as `kubectl diff`)
INTERRUPTED = 130
DELETE_TIMEOUT = 120.0  # seconds `down` and `deploy --replace` wait for deleted objects to go
DEFAULT_NAMESPACE = "default"  # the values' default: a values file that leaves it is read as "not said"
SERVER_FIELDS = ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp")
API_HINTS = {401: "; your kubeconfig's credentials were refused: refresh them or pick another --context",
             403: "; your user may not do this: ask a cluster admin for the permission, or pick another --context",
             429: "; the API server is throttling: rerun in a moment",
             500: "; the API server failed: rerun, and check the server if it persists",
             503: "; the API server is unavailable: rerun, and check the server if it persists"}


class UsageError(Exception):
    """The command line asks for something contradictory or incomplete (exit 2)."""


class FleetNotFound(Exception):
    """No RayJob or RayCluster of the name given (exit 1)."""


# ---- durations ----------------------------------------------------------------------------------

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m`, `1h30m`, `1.5h`, `500ms` (Go's time.ParseDuration units, as
    kubectl's --timeout); an argparse type."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration; write e.g. 90s, 5m, 1h30m or a number of seconds") from None
        seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in parts)
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a timeout is a finite duration above 0; write e.g. 90s or 20m")
    return seconds


# ---- the command line ---------------------------------------------------------------------------

def add_commands(sub, values_args: Callable, func: Callable) -> None:
    """The five subcommands; `values_args` adds the values options (-f, --set) as `render` has them."""
    def common(p, named: bool = False):
        values_args(p)
        if named:
            p.add_argument("fleet", nargs="?", metavar="NAME",
                           help="the fleet's name (its RayJob/RayCluster, or a Helm release's), instead of -f")
        p.add_argument("-n", "--namespace", help="the namespace (default: the values' `namespace` when set, else "
                                                 "the kube context's namespace, else default)")
        p.add_argument("--context", help="kubeconfig context (default: the current context)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; inside a "
                                            "pod without one: its service account)")
        p.set_defaults(func=func)

    timeout_help = "how long to wait, e.g. 90s, 5m, 1h (default: timeouts.initSeconds)"
    p = sub.add_parser("deploy", help="preflight, server-side apply and wait for the fleet on a cluster")
    common(p)
    p.add_argument("--wait", choices=("ready", "complete", "none"), default="ready",
                   help="ready: cluster up and job running (default); complete: the RayJob succeeded; none: "
                        "return after applying")
    p.add_argument("--timeout", type=duration, metavar="DURATION", help=timeout_help)
    p.add_argument("--dry-run", action="store_true",
                   help="preflight and a server-side dry run only: print what would change, write nothing")
    p.add_argument("--replace", action="store_true",
                   help="delete the existing RayJob/RayCluster first (a RayJob that already ran is not rerun)")
    p.add_argument("--force-conflicts", action="store_true",
                   help="take over fields another field manager owns (server-side apply force)")
    p.add_argument("--skip-gpu-check", action="store_true",
                   help="skip the GPU capacity check (node pools that autoscale from zero)")
    p.add_argument("--skip-operator-check", action="store_true",
                   help="skip looking for the KubeRay operator's Deployment (an operator deployed another way)")
    p.set_defaults(kube_command="deploy")

    p = sub.add_parser("diff", help="what `deploy` would change, as a unified diff (server-side dry run); "
                                    "exit 1 when something would change")
    common(p)
    p.add_argument("--force-conflicts", action="store_true", help="as deploy --force-conflicts")
    p.set_defaults(kube_command="diff")

    p = sub.add_parser("status", help="show the fleet's objects, pools and problems (optionally wait)")
    common(p, named=True)
    p.add_argument("--wait", choices=("ready", "complete"), help="wait until ready / the RayJob succeeded")
    p.add_argument("--timeout", type=duration, metavar="DURATION", help=timeout_help)
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text",
                   help="text (default), or one JSON / YAML document")
    p.set_defaults(kube_command="status")

    p = sub.add_parser("logs", help="print the RayJob submitter's logs (the job's output) or a pool's")
    common(p, named=True)
    p.add_argument("--component", choices=("submitter", "head", "trainer", "inference", "colocated"),
                   help="default: submitter for a K8sJobMode RayJob, otherwise head")
    p.add_argument("--tail", type=int, default=100, help="lines per pod (default 100)")
    p.add_argument("--follow", action="store_true", help="keep printing until the pods' containers end")
    p.set_defaults(kube_command="logs")

    p = sub.add_parser("down", help="delete the fleet's RayJob/RayCluster, ConfigMap and NetworkPolicy (by rollfleet labels)")
    common(p, named=True)
    p.add_argument("--timeout", type=duration, default=DELETE_TIMEOUT, metavar="DURATION",
                   help=f"how long to wait until they are gone (default {DELETE_TIMEOUT:g}s)")
    p.set_defaults(kube_command="down")


def main(args, load: Callable) -> int:
    """Run `args.kube_command`; `load(args)` reads the values into a FleetSpec (cli's loader)."""
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    try:
        return COMMANDS[args.kube_command](args, load)
    except (UsageError, KubeError) as exc:
        err(str(exc))
        return NOTHING_APPLIED
    except FleetNotFound as exc:
        err(str(exc))
        return FAILED
    except DynamicApiError as exc:
        err(f"the API server answered {exc.status}: {api_message(exc)}{API_HINTS.get(exc.status, '')}")
        return FAILED
    except HTTPError as exc:
        err(f"lost the API server: {exc}; check that the cluster is up and rerun")
        return FAILED
    except KeyboardInterrupt:
        err("interrupted")
        return INTERRUPTED


# ---- which fleet, in which namespace ------------------------------------------------------------

def namespace_for(values_namespace: str, flag: str | None, context_namespace: str | None) -> str:
    """The values' namespace when they set one (a different -n is refused, as kubectl refuses a
    manifest's namespace that differs from -n), else -n, else the context's, else default."""
    if values_namespace != DEFAULT_NAMESPACE:
        if flag and flag != values_namespace:
            raise UsageError(f"--namespace {flag}: the values say namespace {values_namespace!r}; drop -n or make "
                             f"them agree")
        return values_namespace
    return flag or context_namespace or DEFAULT_NAMESPACE


def in_namespace(spec, namespace: str):
    """`spec` in `namespace`, validated again (through the runtime config, the model's stable form)."""
    if spec.namespace == namespace:
        return spec
    from rollfleet.spec import load_spec, runtime_config

    return load_spec({**runtime_config(spec), "namespace": namespace})


def values_given(args) -> bool:
    return any(getattr(args, key, None) for key in ("values", "set", "set_string"))


def render(spec) -> tuple[list[dict], Fleet]:
    from rollfleet.render import render_objects

    objects = render_objects(spec)
    return objects, rendered_fleet(objects)


@dataclass(frozen=True)
class Target:
    """The fleet a status/logs/down acts on: named, or rendered from values (`fleet` then known)."""

    name: str
    namespace: str
    fleet: Fleet | None


def target(args, load: Callable) -> tuple[Kube, Target]:
    """Connect and find the fleet: `NAME` (and -n), or the values (-f/--set); never a default."""
    command = args.kube_command
    if args.fleet and values_given(args):
        raise UsageError(f"{command}: give the fleet's NAME or a values file (-f/--set), not both")
    if not args.fleet and not values_given(args):
        raise UsageError(f"{command}: name the fleet: `rollfleet {command} NAME [-n NAMESPACE]`, or "
                         f"`rollfleet {command} -f values.yaml`")
    spec = None if args.fleet else load(args)
    kube = connect(args.kubeconfig, args.context)
    if args.fleet:
        return kube, Target(args.fleet, args.namespace or kube.namespace or DEFAULT_NAMESPACE, None)
    spec = in_namespace(spec, namespace_for(spec.namespace, args.namespace, kube.namespace))
    _, fleet = render(spec)
    return kube, Target(fleet.name, fleet.namespace, fleet)


def found_fleet(kube: Kube, t: Target) -> Fleet:
    """The target's fleet as the cluster has it (a named one), or as rendered."""
    if t.fleet is not None:
        return t.fleet
    fleet = live_fleet(kube, t.name, t.namespace)
    if fleet is None:
        others = []
        for kind in TOPS:
            try:
                listed = kube.list(kind, t.namespace, labels="app.kubernetes.io/name=rollfleet")
                others += [o["metadata"]["name"] for o in listed]
            except NotServed:
                pass
        have = f"; fleets there: {', '.join(sorted(set(others)))}" if others else "; none of rollfleet's is there"
        raise FleetNotFound(f"no RayJob or RayCluster {t.name!r} in namespace {t.namespace} on {kube.where}{have} "
                            f"(-n picks the namespace)")
    return fleet


# ---- apply --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    obj: dict  # what is applied
    before: dict | None  # on the cluster now
    after: dict  # what the server's dry run says it would store

    @property
    def outcome(self) -> str:
        if self.before is None:
            return "created"
        return "unchanged" if comparable(self.before) == comparable(self.after) else "configured"


def comparable(obj: dict | None) -> dict:
    """`obj` without what the server keeps for itself (managed fields, versions, uid, status)."""
    if obj is None:
        return {}
    out = {k: v for k, v in obj.items() if k != "status"}
    out["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in SERVER_FIELDS}
    return out


def as_yaml(obj: dict | None) -> list[str]:
    from rollfleet.render import to_yaml

    return to_yaml([comparable(obj)])[4:].splitlines(keepends=True) if obj is not None else []


def diff_text(change: Change) -> str:
    name = ref(change.obj).replace(" ", "/")
    return "".join(difflib.unified_diff(as_yaml(change.before), as_yaml(change.after),
                                        f"live/{name}", f"after-apply/{name}"))


def apply_problem(obj: dict, exc) -> str:
    message = api_message(exc)
    if exc.status == 409:
        return (f"{ref(obj)}: {message}; another field manager (a kubectl edit, another tool) owns these fields: "
                f"change them back, or rerun with --force-conflicts to take them over")
    if exc.status == 400 and "unknown field" in message:
        return (f"{ref(obj)} rejected by the API server: {message}; the cluster's KubeRay CRDs are likely older "
                f"than {KUBERAY_VERSION} (kubectl get crd {obj['kind'].lower()}s.ray.io): upgrade them")
    if exc.status == 404 and "namespaces" in message:
        ns = obj["metadata"].get("namespace")
        return f"{ref(obj)}: {message}; create it (kubectl create namespace {ns}) or set `namespace:` (or -n)"
    if exc.status == 422:
        return f"{ref(obj)} rejected by the API server: {message}"
    return f"{ref(obj)}: the API server answered {exc.status}: {message}"


def dry_run(kube: Kube, objects: list[dict], force: bool,
            live: dict[str, dict | None] | None = None) -> tuple[list[Change], list[str]]:
    """A server-side dry run of every object (`live`: what preflight read, else read now)."""
    from kubernetes.dynamic.exceptions import DynamicApiError

    changes, problems = [], []
    for obj in objects:
        before = live[ref(obj)] if live and ref(obj) in live else \
            kube.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"])
        try:
            changes.append(Change(obj, before, kube.apply(obj, force, dry_run=True)))
        except DynamicApiError as exc:
            problems.append(apply_problem(obj, exc))
    return changes, problems


def apply_objects(kube: Kube, changes: list[Change], force: bool) -> tuple[list[str], list[str]]:
    """Apply for real what the dry run passed. (outcome lines, problems); outcomes compare
    resourceVersions: `unchanged` means the server wrote nothing."""
    from kubernetes.dynamic.exceptions import DynamicApiError

    lines = []
    for change in changes:
        try:
            after = kube.apply(change.obj, force)
        except DynamicApiError as exc:  # the dry run passed: something changed in between
            return lines, [apply_problem(change.obj, exc)]
        old = change.before
        outcome = ("created" if old is None else "unchanged"
                   if old["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"] else "configured")
        lines.append(f"{ref(change.obj)}: {outcome}")
    return lines, []


def fail_nothing_applied(problems: list[str]) -> int:
    for p in problems:
        err(p)
    err(f"nothing applied ({len(problems)} problem{'s' * (len(problems) != 1)})")
    return NOTHING_APPLIED


def flush_warnings(kube: Kube) -> None:
    for w in dict.fromkeys(kube.warnings):
        print(f"warning: the API server says: {w}", file=sys.stderr, flush=True)
    kube.warnings.clear()


def deploy(args, load: Callable) -> int:
    spec = load(args)
    if args.wait == "complete" and not spec.job.enabled:
        raise UsageError("--wait complete: job.enabled is false, and a standalone RayCluster never completes; "
                         "use --wait ready")
    kube = connect(args.kubeconfig, args.context)
    objects, fleet = render(in_namespace(spec, namespace_for(spec.namespace, args.namespace, kube.namespace)))
    say(f"preflight against {kube.where}, namespace {fleet.namespace}")
    report = preflight(kube, objects, fleet, check_gpus=not args.skip_gpu_check,
                       check_operator=not args.skip_operator_check, replace=args.replace)
    if report.fits:
        say(gpu_table(report.fits))
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if report.problems:
        return fail_nothing_applied(report.problems)
    changes, problems = dry_run(kube, objects, args.force_conflicts, report.live)
    flush_warnings(kube)
    if problems:
        return fail_nothing_applied(problems)
    top = next(c for c in changes if c.obj["kind"] in TOPS)
    replace = args.replace and top.before is not None
    if args.dry_run:
        if replace:
            say(f"{ref(top.obj)}: would be deleted and created again (--replace)")
        for change in changes:
            outcome = "created" if replace and change is top else change.outcome
            say(f"{ref(change.obj)}: would be {outcome} (server dry run)")
            if outcome == "configured":
                sys.stdout.write(diff_text(change))
        say("dry run: nothing written")
        return 0
    if replace:
        meta = top.obj["metadata"]
        kube.delete(top.obj["kind"], meta["name"], meta["namespace"])
        say(f"deleted {ref(top.obj)} (--replace; its RayCluster and pods go with it)")
        if wait_gone(kube, [(top.obj["kind"], meta["namespace"], meta["name"])], DELETE_TIMEOUT):
            return FAILED
        changes = [Change(c.obj, None, c.after) if c is top else c for c in changes]
    lines, problems = apply_objects(kube, changes, args.force_conflicts)
    for line in lines:
        say(line)
    flush_warnings(kube)
    if problems:  # the real apply failed part-way
        for p in problems:
            err(p)
        return FAILED
    if args.wait == "none":
        return 0
    return wait(kube, fleet, args.wait, args.timeout or fleet.init_seconds)  # the rendered ConfigMap has it


def diff(args, load: Callable) -> int:
    spec = load(args)
    kube = connect(args.kubeconfig, args.context)
    objects, _ = render(in_namespace(spec, namespace_for(spec.namespace, args.namespace, kube.namespace)))
    changes, problems = dry_run(kube, objects, args.force_conflicts)
    flush_warnings(kube)
    if problems:
        for p in problems:
            err(p)
        return NOTHING_APPLIED
    texts = [diff_text(c) for c in changes if c.outcome != "unchanged"]
    for text in texts:
        sys.stdout.write(text)
    if not texts:
        say(f"no changes: {', '.join(ref(c.obj) for c in changes)} as the values render them")
    return DIFFERENT if texts else 0


# ---- status, logs, down -------------------------------------------------------------------------

def status(args, load: Callable) -> int:
    kube, t = target(args, load)
    fleet = found_fleet(kube, t)
    if args.wait == "complete" and fleet.kind == "RayCluster":
        raise UsageError("--wait complete: a standalone RayCluster never completes; use --wait ready")
    structured = args.output != "text"
    rc = None
    if args.wait:
        from rollfleet.spec import Timeouts

        timeout = args.timeout or fleet.init_seconds or Timeouts().init_seconds  # a fleet without a readable config
        progress = (lambda line: print(line, file=sys.stderr, flush=True)) if structured else say
        rc = wait(kube, fleet, args.wait, timeout, out=progress)
        if not structured:
            return rc
    top = kube.get(fleet.kind, fleet.name, fleet.namespace)
    objects = []
    for kind, name in (("ConfigMap", fleet.config), (fleet.kind, fleet.name)):
        obj = top if kind == fleet.kind else kube.get(kind, name, fleet.namespace) if name else None
        objects.append({"kind": kind, "name": name, "present": obj is not None,
                        "resourceVersion": obj["metadata"]["resourceVersion"] if obj else None})
    snap, _ = observe(kube, fleet, args.wait or "ready")
    problems = diagnose(kube, fleet)
    ok = snap.found and not snap.failure
    if structured:
        doc = {"name": fleet.name, "namespace": fleet.namespace, "kind": fleet.kind, "objects": objects,
               "state": snap.state, "pods": snap.pods, "ready": snap.done, "failure": snap.failure,
               "problems": problems}
        if args.output == "json":
            say(json.dumps(doc, indent=2))
        else:
            import yaml

            sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
        return rc if rc is not None else 0 if ok else FAILED
    for o in objects:
        state = f"present (resourceVersion {o['resourceVersion']})" if o["present"] else "absent"
        say(f"{o['kind']} {fleet.namespace}/{o['name']}: {state}")
    say(snap.line)
    owner = helm_release(top) if top else None
    if owner:
        say(f"installed by Helm release {owner[0]} (namespace {owner[1]})")
    for p in problems:
        say(f"problem: {p}")
    if snap.failure:
        err(snap.failure)
    return 0 if ok else FAILED


def logs(args, load: Callable) -> int:
    kube, t = target(args, load)
    fleet = found_fleet(kube, t)
    component = args.component or ("submitter" if fleet.kind == "RayJob" and fleet.submission_mode == "K8sJobMode"
                                   else "head")
    labels = (f"job-name={fleet.name}" if component == "submitter"
              else f"{fleet.selector},app.kubernetes.io/component={component}")
    pods = sorted(kube.list("Pod", fleet.namespace, labels=labels),
                  key=lambda p: p["metadata"].get("creationTimestamp", ""))
    if not pods:
        err(f"no {component} pod in namespace {fleet.namespace} (labels {labels}); `rollfleet status {fleet.name} -n "
            f"{fleet.namespace}` shows what exists (a finished RayJob's pods go after job.ttlSecondsAfterFinished)")
        return FAILED
    streams = [(p["metadata"]["name"], p["spec"]["containers"][0]["name"]) for p in pods]
    if not args.follow:
        for pod, container in streams:
            say(f"==> pod {pod}, container {container} (last {args.tail} lines) <==")
            sys.stdout.write(kube.log(pod, fleet.namespace, container, args.tail))
        return 0
    return follow(kube, fleet.namespace, streams, args.tail)


def follow(kube: Kube, namespace: str, streams: list[tuple[str, str]], tail: int) -> int:
    """Stream every (pod, container) log; with several pods each line starts with `[pod] `. Ends when
    every container has ended (or on Ctrl-C)."""
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    say(f"==> following {', '.join(f'pod {p}, container {c}' for p, c in streams)} (from the last {tail} lines; "
        f"Ctrl-C stops) <==")
    lines: queue.Queue = queue.Queue()
    prefix = len(streams) > 1

    def pump(pod: str, container: str) -> None:
        try:
            for line in kube.follow(pod, namespace, container, tail):
                lines.put(f"[{pod}] {line}" if prefix else line)
        except (DynamicApiError, HTTPError) as exc:
            lines.put(("error", f"pod {pod}: the log stream ended: {getattr(exc, 'status', '')} {exc}"))
        finally:
            lines.put(None)

    for pod, container in streams:
        threading.Thread(target=pump, args=(pod, container), daemon=True).start()
    ended, failed = 0, False
    while ended < len(streams):
        item = lines.get()
        if item is None:
            ended += 1
        elif isinstance(item, tuple):
            err(item[1])
            failed = True
        else:
            sys.stdout.write(item)
            sys.stdout.flush()
    return FAILED if failed else 0


def down(args, load: Callable) -> int:
    from kubernetes.dynamic.exceptions import NotFoundError

    kube, t = target(args, load)
    selector, ns = down_selector(t.name), t.namespace
    found = []
    for kind in CREATED_KINDS:
        try:
            found += [(kind, item) for item in kube.list(kind, ns, labels=selector)]
        except NotServed:  # ray.io/v1 not served: none of these can exist
            continue
    if not found:
        say(f"nothing to delete: no {', '.join(CREATED_KINDS)} labelled {selector} in namespace {ns}")
        for kind in TOPS:
            try:
                other = kube.get(kind, t.name, ns)
            except NotServed:
                continue
            owner = helm_release(other) if other else None
            if owner:
                say(f"{kind} {ns}/{t.name} belongs to Helm release {owner[0]}: remove it with "
                    f"`helm uninstall {owner[0]} -n {owner[1]}`")
        return 0
    uids = {item["metadata"]["uid"] for _, item in found}
    for kind, item in found:
        name = item["metadata"]["name"]
        owner = next((o for o in item["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
        if owner and owner.get("uid") in uids:
            say(f"{kind} {ns}/{name}: goes with its owner {owner['kind']} {owner['name']}")
            continue
        try:
            kube.delete(kind, name, ns)
            say(f"deleted {kind} {ns}/{name}")
        except NotFoundError:
            say(f"{kind} {ns}/{name}: already gone")
    return wait_gone(kube, [(kind, ns, item["metadata"]["name"]) for kind, item in found], args.timeout)


COMMANDS = {"deploy": deploy, "diff": diff, "status": status, "logs": logs, "down": down}
