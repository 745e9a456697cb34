"""Values read the way Helm reads them: `-f` files (YAML, `-` for stdin) deep-merged in order, then
`--set` and `--set-string` in Helm's syntax, then the spec model.

- YAML scalars resolve as Helm's YAML reader resolves them (a YAML 1.1 reader: `y`/`n` are booleans,
  dates and times stay strings, `1e3` and `08` are numbers, `0o17` is octal); tests/test_values.py checks
  this against Helm's own reader. A values file is one YAML mapping; duplicate keys, several documents,
  syntax errors, alias bombs and nesting deeper than `MAX_DEPTH` are refused with `file:line:column`.
- `--set` follows Helm's strvals grammar: `a.b=c,d={x,y},e[0].f=g`, `\\` escapes `.`, `,`, `=`, `[`;
  values are typed (true/false/null/integers without a leading 0), `--set-string` keeps them strings.
  Helm's parser is Go; helm-python-sdk binds it but ships an 85 MB native library for one platform, so
  this is a small port, checked against that library case by case in the tests (dev dependency).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel

from rollfleet.spec import FleetSpec, load_spec

MAX_DEPTH = 32  # a values file nests about 8 deep; deeper would reach RecursionError further on
MAX_NODES = 100_000  # values after expanding aliases; a file of a few anchors can expand to gigabytes
MAX_NESTED_NAMES = 30  # Helm's strvals limits
MAX_INDEX = 65536
_MERGE = "tag:yaml.org,2002:merge"


class ValuesError(ValueError):
    """A values file or --set item Helm would not read; the message is one line naming where."""


# --- YAML -------------------------------------------------------------------------------------------

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOLS = {**dict.fromkeys("y Y yes Yes YES on On ON true True TRUE".split(), True),
          **dict.fromkeys("n N no No NO off Off OFF false False FALSE".split(), False)}
# Go's YAML reader tries a plain scalar that starts with a digit or a sign as a number once every '_' is
# removed (ParseInt with base prefixes, then a float of this shape), one that starts with '.' as a float
# as it is; else it stays a string.
_NUMBER = re.compile(r"[-+.0-9][-+._0-9a-zA-Z]*")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_SPECIAL_FLOAT = re.compile(r"[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")


class HelmLoader(_Base):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with Helm's scalar resolution and checks a values file needs."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            raw = self.construct_object(key_node, deep=True)
            if isinstance(raw, (list, dict)):
                raise yaml.MarkedYAMLError(None, None, "a key must be a plain scalar, not a list or mapping",
                                           key_node.start_mark)
            key = _key(raw)
            if key in seen:
                first = seen[key].start_mark
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r} (first at line {first.line + 1}); "
                                           f"keep one", key_node.start_mark)
            seen[key] = key_node
        self.flatten_mapping(node)  # merge keys (<<), as SafeConstructor does
        # keys become strings before the dict is built: True and 1 are the same Python key, not Helm's
        return {_key(self.construct_object(k, deep=True)): self.construct_object(v, deep=deep) for k, v in node.value}

    def construct_helm_scalar(self, node: yaml.ScalarNode) -> Any:
        value = node.value
        if value in _BOOLS:
            return _BOOLS[value]
        if value in ("", "~", "null", "Null", "NULL"):
            return None
        if _SPECIAL_FLOAT.fullmatch(value):
            raise yaml.MarkedYAMLError(None, None, f"{value} is not a number Helm accepts (JSON has no "
                                       f"infinity or NaN); quote it to keep it a string", node.start_mark)
        return _number(value)


def _key(key: Any) -> Any:
    """Keys as Helm turns them into JSON object keys (true -> 'true', 1 -> '1')."""
    if isinstance(key, bool):
        return str(key).lower()
    return key if isinstance(key, str) or key is None else str(key)


def _number(text: str) -> Any:
    """A plain scalar as Go's strconv reads it after removing '_' (Helm's YAML reader); else the text."""
    if text.startswith(".") and "_" in text:  # Go reads these with ParseFloat as they are: no '_' allowed
        return text
    plain = text.replace("_", "")
    sign, digits = (-1 if plain[0] == "-" else 1, plain[1:]) if plain[0] in "+-" else (1, plain)  # one sign
    try:
        if re.fullmatch(r"0[0-7]+", digits):
            return sign * int(digits, 8)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|[1-9][0-9]*|0", digits):
            return sign * int(digits, 0)
        if not _FLOAT.fullmatch(plain):
            return text
        number = float(plain)
    except ValueError:
        return text
    return text if number in (float("inf"), float("-inf")) else number


HelmLoader.add_implicit_resolver(_MERGE, re.compile(r"^<<$"), ["<"])
HelmLoader.add_implicit_resolver("tag:rollfleet,helm-scalar", re.compile(
    rf"^({'|'.join(map(re.escape, _BOOLS))}|~|null|Null|NULL|{_NUMBER.pattern}|{_SPECIAL_FLOAT.pattern})$"),
    list("yYnNoOtTfF~+-.0123456789"))
HelmLoader.add_implicit_resolver("tag:rollfleet,helm-scalar", re.compile(r"^$"), [""])
HelmLoader.add_constructor("tag:rollfleet,helm-scalar", HelmLoader.construct_helm_scalar)


def _measure(root: yaml.Node) -> tuple[int, int]:
    """(depth, values after expanding aliases) of a composed document, without recursion."""
    depth: dict[int, int] = {}
    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes on the current path: meeting one again is a recursive alias
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if not done:
            if id(node) in open_:
                raise yaml.MarkedYAMLError(None, None, "a recursive alias (an anchor used inside itself); "
                                           "write the values out", node.start_mark)
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        open_.discard(id(node))
        depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
        size[id(node)] = min(1 + sum(size[id(c)] for c in children), MAX_NODES + 1)
    return depth[id(root)], size[id(root)]


def parse_yaml(text: str, name: str) -> dict[str, Any]:
    """One values document as Helm reads it, or ValuesError naming `name:line:column`."""
    loader = HelmLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        depth, size = _measure(node)
        where = f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        if depth > MAX_DEPTH:
            raise ValuesError(f"{where}: nested {depth} levels deep; values nest far less (at most {MAX_DEPTH})")
        if size > MAX_NODES:
            raise ValuesError(f"{where}: aliases expand to more than {MAX_NODES} values; write the values out "
                              f"instead of repeating anchors")
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        if "expected a single document" in problem:
            problem = "several YAML documents; a values file holds one mapping (remove the extra '---')"
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ValuesError(f"{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ValuesError(f"{name}: {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ValuesError(f"{name}: the values file must be a YAML mapping (key: value), not a {type(data).__name__}")
    return data


def read_file(path: str | Path) -> dict[str, Any]:
    """A values file by path; `-` reads standard input."""
    if str(path) == "-":
        return parse_yaml(sys.stdin.read(), "<stdin>")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValuesError(f"{path}: cannot read the values file ({getattr(exc, 'strerror', None) or exc})") from None
    return parse_yaml(text, str(path))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, anything else in `override` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --- --set ------------------------------------------------------------------------------------------


class _Scanner:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def until(self, stop: str) -> tuple[str, str | None]:
        """Characters up to one in `stop` (consumed and returned; None at the end); `\\` escapes one."""
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c in stop:
                return "".join(out), c
            if c == "\\":
                if self.pos == len(self.text):
                    return "".join(out), None
                c = self.text[self.pos]
                self.pos += 1
            out.append(c)
        return "".join(out), None


def _typed(text: str, strings: bool) -> Any:
    if strings:
        return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "null":
        return None
    if text == "0" or re.fullmatch(r"[-+]?[1-9][0-9]*", text) and abs(int(text)) < 2**63:
        return int(text)
    return text


class _End(Exception):
    """The text ended inside a key path: Helm's parser stops there, keeping what it had set."""


class _SetParser:
    """One `--set` (or `--set-string`) argument applied into values, as Helm's strvals.ParseInto does."""

    def __init__(self, text: str, strings: bool):
        self.scan, self.strings, self.text = _Scanner(text), strings, text

    def fail(self, what: str) -> ValuesError:
        flag = "--set-string" if self.strings else "--set"
        return ValuesError(f"{flag} {self.text!r}: {what}")

    def parse_into(self, data: dict[str, Any]) -> None:
        try:
            while True:
                self.key(data, 0)
        except _End:
            pass

    def key(self, data: dict[str, Any], level: int) -> None:
        """Parse one key path and its value into `data`; _End when the text ends."""
        name, last = self.scan.until("=[,.")
        if last is None:
            if name:
                raise self.fail(f"key {name!r} has no value; write {name}=VALUE")
            raise _End
        if last == ",":
            raise self.fail(f"key {name!r} has no value (cannot end with ,)")
        if last == "=":
            at_end = self.scan.pos == len(self.text)
            self.put(data, name, self.value())
            if at_end:  # `a=` at the very end: Helm sets "" and stops there
                raise _End
            return
        if last == ".":
            if level + 1 > MAX_NESTED_NAMES:
                raise self.fail(f"nested deeper than {MAX_NESTED_NAMES} names")
            inner = data.get(name, {})
            if not isinstance(inner, dict):
                raise self.fail(f"{name} is not a mapping")
            try:
                self.key(inner, level + 1)
            finally:
                if inner:
                    self.put(data, name, inner)
            if not inner:
                raise self.fail(f"key map {name!r} has no value")
            return
        index = self.index()  # last == "["
        items = data.get(name, [])
        if not isinstance(items, list):
            raise self.fail(f"{name} is not a list")
        items = list(items)
        try:
            self.item(items, index, level)
        finally:
            self.put(data, name, items)

    @staticmethod
    def put(data: dict[str, Any], name: str, value: Any) -> None:
        if name:
            data[name] = value

    def index(self) -> int:
        text, last = self.scan.until("]")
        if last is None:
            raise _End
        if not re.fullmatch(r"[-+]?[0-9]+", text):  # Go's Atoi: no spaces, no '_' (Python's int() takes both)
            raise self.fail(f"{text!r} is not a list index; write [0], [1], …")
        index = int(text)
        if index < 0 or index > MAX_INDEX:
            raise self.fail(f"index {index} is outside 0…{MAX_INDEX}")
        return index

    def item(self, items: list[Any], index: int, level: int) -> None:
        """Parse what follows `[index]` into `items` (in place)."""
        rest, last = self.scan.until("[.=")
        if rest:
            raise self.fail(f"unexpected {rest!r} after [{index}]")
        if last is None:
            raise _End
        if last == "=":
            value = self.value()
        elif last == "[":
            value = list(items[index]) if index < len(items) and isinstance(items[index], list) else []
            self.item(value, self.index(), level)
        else:  # "."
            value = items[index] if index < len(items) and isinstance(items[index], dict) else {}
            self.key(value, level)
        items.extend([None] * (index + 1 - len(items)))
        items[index] = value

    def value(self) -> Any:
        """What follows '=': a `{a,b}` list, or a scalar up to the next unescaped ','."""
        if self.scan.pos < len(self.text) and self.text[self.scan.pos] == "{":
            self.scan.pos += 1
            items = []
            while True:
                text, last = self.scan.until(",}")
                if last is None:
                    raise self.fail("a list must end with '}'")
                items.append(_typed(text, self.strings))
                if last == "}":
                    if self.scan.pos < len(self.text) and self.text[self.scan.pos] == ",":
                        self.scan.pos += 1
                    return items
        text, _ = self.scan.until(",")
        return _typed(text, self.strings)

def apply_sets(values: dict[str, Any], sets: Iterable[str] = (), set_strings: Iterable[str] = ()) -> dict[str, Any]:
    """`values` with every `--set`, then every `--set-string`, applied (as Helm orders them); not mutated."""
    out = copy.deepcopy(values)
    for strings, items in ((False, sets), (True, set_strings)):
        for item in items:
            _SetParser(item, strings).parse_into(out)
    return out


# --- values -> spec ----------------------------------------------------------------------------------


def merge_default_maps(values: dict[str, Any], model: type[BaseModel] = FleetSpec) -> dict[str, Any]:
    """Merge the values' maps into their non-empty defaults (`env`, `ncclEnv`, `monitoring.dashboard.labels`),
    as Helm merges a values file into the chart's values.yaml (pydantic would replace them, dropping e.g.
    NCCL_CUMEM_ENABLE=0 when a file only adds NCCL_IB_HCA). So `rollfleet render -f` and `helm install -f`
    build the same spec from the same file. As in Helm, `KEY: null` removes a default key; a null for any
    other key stays and is refused."""
    out = dict(values)
    for name, field in model.model_fields.items():
        key, defaults = field.alias or name, field.default
        if not isinstance(out.get(key), dict):
            continue
        if isinstance(defaults, dict) and defaults:
            merged = {**defaults, **out[key]}
            out[key] = {k: v for k, v in merged.items() if v is not None or k not in defaults}
        elif isinstance(defaults, BaseModel):  # a section: its own maps
            out[key] = merge_default_maps(out[key], type(defaults))
    return out


def read_values(files: Iterable[str | Path] = (), sets: Iterable[str] = (),
                set_strings: Iterable[str] = ()) -> dict[str, Any]:
    """The values Helm would take from `-f` files (in order, later wins), `--set` and `--set-string`."""
    values: dict[str, Any] = {}
    for path in files:
        values = merge(values, read_file(path))
    return apply_sets(values, sets, set_strings)


def load_values(files: str | Path | Iterable[str | Path] | None = None, sets: Iterable[str] = (),
                set_strings: Iterable[str] = ()) -> FleetSpec:
    """Values files (one path, several, or None for the defaults) and overrides, validated into a FleetSpec.
    Raises ValuesError (YAML, --set) or SpecError (one line per problem)."""
    if files is None:
        files = []
    elif isinstance(files, (str, Path)):
        files = [files]
    return load_spec(merge_default_maps(read_values(files, sets, set_strings)))
