"""The `rollfleet` command. Bad input: exit 2, one line per problem, nothing written or applied."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rollfleet.deploy import commands as deploy_commands
from rollfleet.runtime import bench, demo
from rollfleet.spec import SpecError

USAGE_ERROR = 2


def _values_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--values", help="values file (YAML); omitted: the defaults")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override one value, e.g. --set pools.inference.gpusPerNode=8 (repeatable)")


def _spec(args):
    from rollfleet.render import load_values

    return load_values(args.values, args.set)


def cmd_render(args) -> int:
    from rollfleet.render import render_objects, to_yaml

    objects = render_objects(_spec(args))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for obj in objects:
            (out / f"{obj['kind'].lower()}.yaml").write_text(to_yaml([obj]))
        print(f"wrote {len(objects)} objects to {out}/", file=sys.stderr)
    else:
        sys.stdout.write(to_yaml(objects))
    return 0


def cmd_validate(args) -> int:
    from rollfleet.render import render_objects
    from rollfleet.validate import CrdsMissing, validate_objects

    spec = _spec(args)
    objects = render_objects(spec)
    try:
        problems = validate_objects(objects, Path(args.crds) if args.crds else None)
    except CrdsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    print(f"ok: {kinds} valid (KubeRay v1.7.0 CRDs strict, Kubernetes strict); "
          f"{spec.engines} engine(s) × TP {spec.vllm.tensor_parallel_size}, "
          f"{spec.pools.trainer.gpus} trainer GPU(s)")
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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="print the Kubernetes objects for a values file")
    _values_args(p)
    p.add_argument("-o", "--output", help="write one file per object into this directory")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="render and validate against KubeRay CRDs and Kubernetes schemas")
    _values_args(p)
    p.add_argument("--crds", help="directory with the KubeRay v1.7.0 CRDs (default: found or `make crds`)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the values JSON Schema (the chart's values.schema.json)")
    p.set_defaults(func=cmd_schema)

    deploy_commands.add_commands(sub, _values_args, cmd_kube)
    demo.add_command(sub, cmd_demo)
    bench.add_command(sub, cmd_bench)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
