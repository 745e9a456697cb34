"""The `rollfleet` command. Bad input: exit 2, one line per problem, nothing written or applied."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from rollfleet import bench, demo
from rollfleet.deploy import commands as deploy_commands
from rollfleet.deploy.fleet import CREATED_KINDS
from rollfleet.spec import IMAGE_TAG, KUBERAY_VERSION, PROMETHEUS_OPERATOR_VERSION, RAY_VERSION, SpecError

USAGE_ERROR = 2
# What a command needs beyond `pip install rollfleet`: the module, and the extra that brings it.
EXTRAS = {"ray": "runtime", "torch": "runtime", "transformers": "runtime", "vllm": "vllm",
          "jsonschema": "validate", "kubernetes_validate": "validate"}


def _values_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--values", action="append", metavar="FILE",
                   help="values file (YAML; `-` reads stdin); repeatable, later files win (deep merge, as Helm)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override values in Helm's syntax, e.g. --set pools.inference.gpusPerNode=8,"
                        "image.pullSecrets={a,b} (repeatable; after the files)")
    p.add_argument("--set-string", action="append", default=[], metavar="PATH=VALUE",
                   help="as --set, but every value stays a string (e.g. --set-string image.tag=1.10)")


def _spec(args):
    from rollfleet.values import load_values

    return load_values(args.values or [], args.set, getattr(args, "set_string", []))


def _write_dir(out: Path, name: str, objects: list[dict]) -> None:
    """One file per object, named <fleet>.<kind>.yaml; this fleet's files of kinds not rendered now are
    removed (e.g. after job.enabled: false); other files in the directory are left alone."""
    from rollfleet.render import to_yaml

    written = set()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for obj in objects:
            path = out / f"{name}.{obj['kind'].lower()}.yaml"
            path.write_text(to_yaml([obj]))
            written.add(path)
    except OSError as exc:
        raise ValueError(f"-o {out}: cannot write there ({exc.strerror}); give a directory you can write") from None
    for kind in (k.lower() for k in CREATED_KINDS):
        stale = out / f"{name}.{kind}.yaml"
        if stale not in written and stale.is_file():
            stale.unlink()


def cmd_render(args) -> int:
    from rollfleet.render import render_objects, to_yaml

    spec = _spec(args)
    objects = render_objects(spec)
    if args.output:
        _write_dir(Path(args.output), spec.name, objects)
        print(f"wrote {len(objects)} objects to {args.output}/{spec.name}.*.yaml", file=sys.stderr)
    else:
        sys.stdout.write(to_yaml(objects))
    return 0


def _report(args, report: dict) -> None:
    if args.output == "json":
        print(json.dumps(report, indent=2))
    elif args.output == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(report, sort_keys=False))


def cmd_validate(args) -> int:
    from rollfleet.render import render_objects
    from rollfleet.validate import CrdsMissing, validate_objects

    try:
        spec = _spec(args)
    except SpecError as exc:
        _report(args, {"valid": False, "stage": "values", "problems": exc.problems})
        raise
    objects = render_objects(spec)
    try:
        problems = validate_objects(objects, Path(args.crds) if args.crds else None)
    except CrdsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    _report(args, {"valid": not problems, "stage": "objects", "problems": problems,
                   "objects": [f"{o['kind']}/{o['metadata']['name']}" for o in objects],
                   "namespace": spec.namespace, "engines": spec.engines,
                   "tensorParallelSize": spec.vllm.tensor_parallel_size, "trainerGpus": spec.trainer_pool.gpus,
                   "inferenceGpus": spec.inference_pool.gpus, "colocated": spec.colocated, "kuberay": KUBERAY_VERSION})
    if problems:
        return 1
    if not args.output:
        kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        monitoring = any(o["apiVersion"].startswith("monitoring.coreos.com/") for o in objects)
        crds = f"KubeRay {KUBERAY_VERSION}" + (f" and Prometheus Operator {PROMETHEUS_OPERATOR_VERSION}" if monitoring else "")
        print(f"ok: {kinds} valid ({crds} CRDs strict, Kubernetes strict); "
              f"{spec.engines} engine(s) × TP {spec.vllm.tensor_parallel_size}, "
              f"{spec.trainer_pool.gpus} trainer GPU(s)" + (", the same GPUs (colocated)" if spec.colocated else ""))
    return 0


def cmd_schema(args) -> int:
    from rollfleet.spec import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def cmd_kube(args) -> int:
    return deploy_commands.main(args, _spec)


def cmd_demo(args) -> int:
    return demo.main(args)


def cmd_bench(args) -> int:
    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollfleet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="print the Kubernetes objects for a values file")
    _values_args(p)
    p.add_argument("-o", "--output", metavar="DIR",
                   help="write one file per object into DIR, named <name>.<kind>.yaml (stale ones of this fleet go)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="render and validate against KubeRay CRDs and Kubernetes schemas")
    _values_args(p)
    p.add_argument("--crds", help=f"directory with the KubeRay {KUBERAY_VERSION} CRDs (default: found or `make crds`)")
    p.add_argument("-o", "--output", choices=("json", "yaml"), help="also print the result as JSON or YAML")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the values JSON Schema (the chart's values.schema.json)")
    p.set_defaults(func=cmd_schema)

    deploy_commands.add_commands(sub, _values_args, cmd_kube)
    demo.add_command(sub, cmd_demo)
    bench.add_command(sub, cmd_bench)
    return parser


def version() -> str:
    try:
        own = metadata.version("rollfleet")
    except metadata.PackageNotFoundError:
        own = "unknown"
    installed = []
    for name in ("ray", "torch", "vllm"):
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            installed.append(f"no {name}")
    return (f"rollfleet {own} (image tag {IMAGE_TAG}, Ray {RAY_VERSION}, KubeRay {KUBERAY_VERSION}); "
            f"installed here: {', '.join(installed)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return USAGE_ERROR
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        extra = EXTRAS.get(module)
        fix = f"pip install 'rollfleet[{extra}]'" if extra else f"install {module}"
        print(f"error: rollfleet {args.command} needs {module}, which is not installed; {fix}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"error: rollfleet {args.command} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`rollfleet schema | head`): stop quietly, as `yes | head` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
        return 141
    except Exception as exc:  # noqa: BLE001 - the promise: no traceback reaches a user
        if os.environ.get("ROLLFLEET_DEBUG"):
            raise
        print(f"error: rollfleet {args.command} failed: {type(exc).__name__}: {exc} (a bug: please report it; "
              f"ROLLFLEET_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
