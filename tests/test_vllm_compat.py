"""vllm_api.py ↔ the real vLLM 0.14.1, 0.16.0, 0.17.1 and 0.20.2 wheels, read statically (never installed).

* test_use: every declared `Use` exists, with the declared signature, in each version it names
  (all of VERSIONS by default); a Use limited to some versions must fail in the others.
* test_runtime_uses_are_declared: the runtime imports / calls / passes keywords to no vLLM name that
  vllm_api.py does not declare (so the list cannot go stale).
* the remaining tests pin the analyzer itself (it must notice what is missing) and DIFFERENCES: the
  surfaces near the runtime's that exist in only some of the versions (the runtime must avoid them).

Sources come from tests/wheel_source.py: Range requests into the pinned PyPI wheels, cached under
~/.cache/rollfleet/vllm-src/<version>/ (or $ROLLFLEET_VLLM_SRC_CACHE). Offline without a cache: fails.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

import vllm_api
from vllm_api import (
    ATTR, CALL, CLASS, EXPORT, FIELD, LITERALS, MODULE, SOURCE, STATIC, USES, VERSIONS, Use,
)
from wheel_source import PINNED, WheelSource, WheelSourceError

assert set(VERSIONS) <= set(PINNED), f"pin a wheel for each of {VERSIONS} in tests/wheel_source.py"
SRC = Path(__file__).resolve().parents[1] / "src" / "rollfleet"  # the runtime, the benchmarks, everything


# ---------------------------------------------------------------------------------------------
# A tiny static model of a package's source: module bindings, re-exports, classes, signatures.


@dataclass
class Mod:
    name: str
    file: str
    text: str
    tree: ast.Module
    is_pkg: bool
    bindings: dict[str, list[tuple]] = field(default_factory=dict)


@dataclass
class Target:
    mod: Mod
    node: ast.AST | None  # None: the target is the module itself
    owner: ast.ClassDef | None = None  # class whose body holds node (for methods and fields)
    owner_mod: Mod | None = None

    def where(self) -> str:
        line = getattr(self.node, "lineno", None)
        return f"{self.mod.file}:{line}" if line else self.mod.file


@dataclass
class Param:
    name: str
    kind: str  # "posonly" | "pos" | "kwonly"
    required: bool


@dataclass
class Sig:
    params: list[Param]
    varargs: bool
    varkw: bool
    text: str


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _decorators(fn: ast.AST) -> set[str]:
    out = set()
    for d in getattr(fn, "decorator_list", []):
        d = d.func if isinstance(d, ast.Call) else d
        out.add(ast.unparse(d).split(".")[-1])
    return out


def _body(stmts: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a module/class body, descending into if/try/with (not `if TYPE_CHECKING:`)."""
    for s in stmts:
        if isinstance(s, ast.If):
            if not _is_type_checking(s.test):
                yield from _body(s.body)
            yield from _body(s.orelse)
        elif isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
            yield from _body(s.body)
            for h in s.handlers:
                yield from _body(h.body)
            yield from _body(s.orelse)
            yield from _body(s.finalbody)
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            yield from _body(s.body)
        else:
            yield s


def _targets(node: ast.AST, leaf) -> Iterator[str]:
    """Names bound by an assignment target (through tuples, lists, starred), as picked by `leaf`."""
    if isinstance(node, (ast.Tuple, ast.List)):
        for t in node.elts:
            yield from _targets(t, leaf)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value, leaf)
    else:
        yield from leaf(node)


def _names(target: ast.AST) -> Iterator[str]:
    return _targets(target, lambda n: [n.id] if isinstance(n, ast.Name) else [])


def _self_targets(node: ast.AST) -> Iterator[str]:
    return _targets(node, lambda n: [n.attr] if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id == "self" else [])


class Package:
    """Static view of one vLLM version's source, backed by a WheelSource."""

    def __init__(self, src: WheelSource) -> None:
        self.src = src
        self.version = src.version
        self._mods: dict[str, Mod | None] = {}

    # -- modules -------------------------------------------------------------------------------

    def mod(self, name: str) -> Mod | None:
        if name not in self._mods:
            self._mods[name] = self._load(name)
        return self._mods[name]

    def _load(self, name: str) -> Mod | None:
        if name.split(".")[0] != "vllm":
            return None
        file = self.src.module_file(name)
        if file is None:
            return None
        text = self.src.read(file) or ""
        try:
            tree = ast.parse(text, filename=file)
        except SyntaxError as exc:
            pytest.fail(f"vllm {self.version}: cannot parse {file} with this Python: {exc}")
        m = Mod(name, file, text, tree, file.endswith("__init__.py"))
        self._bind(m)
        return m

    def _absolute(self, m: Mod, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = m.name.split(".") if m.is_pkg else m.name.split(".")[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))

    def _bind(self, m: Mod) -> None:
        b = m.bindings
        for s in _body(m.tree.body):
            if isinstance(s, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                b.setdefault(s.name, []).append(("node", s))
            elif isinstance(s, ast.Assign):
                for t in s.targets:
                    for n in _names(t):
                        b.setdefault(n, []).append(("node", s))
            elif isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
                b.setdefault(s.target.id, []).append(("node", s))
            elif type(s).__name__ == "TypeAlias":  # `type X = ...` (3.12+)
                b.setdefault(s.name.id, []).append(("node", s))
            elif isinstance(s, ast.ImportFrom):
                base = self._absolute(m, s.module, s.level)
                for a in s.names:
                    if a.name != "*":
                        b.setdefault(a.asname or a.name, []).append(("from", base, a.name))
            elif isinstance(s, ast.Import):
                for a in s.names:
                    if a.asname:
                        b.setdefault(a.asname, []).append(("module", a.name))
                    else:
                        top = a.name.split(".")[0]
                        b.setdefault(top, []).append(("module", top))
        # Lazy exports: a module-level __getattr__ plus a {"Name": ".module:attr"} table (MODULE_ATTRS).
        if any(n[0] == "node" and isinstance(n[1], ast.FunctionDef) for n in b.get("__getattr__", [])):
            for s in _body(m.tree.body):
                if isinstance(s, (ast.Assign, ast.AnnAssign)) and isinstance(s.value, ast.Dict):
                    pairs = list(zip(s.value.keys, s.value.values))
                    if pairs and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                     and isinstance(v, ast.Constant) and isinstance(v.value, str) and ":" in v.value
                                     for k, v in pairs):
                        for k, v in pairs:
                            mod, attr = v.value.split(":", 1)
                            level = len(mod) - len(mod.lstrip("."))
                            target = self._absolute(m, mod.lstrip(".") or None, level)
                            b.setdefault(k.value, []).append(("from", target, attr))

    # -- name resolution -----------------------------------------------------------------------

    def resolve_name(self, module: str, name: str, depth: int = 0) -> list[Target]:
        m = self.mod(module)
        if m is None or depth > 12:
            return []
        out: list[Target] = []
        for bind in m.bindings.get(name, []):
            if bind[0] == "node":
                out.append(Target(m, bind[1]))
            elif bind[0] == "module":
                sub = self.mod(bind[1])
                if sub is not None:
                    out.append(Target(sub, None))
            elif bind[0] == "from":
                out += self.resolve_name(bind[1], bind[2], depth + 1)
        if not out:  # `from pkg import submodule`
            sub = self.mod(f"{module}.{name}")
            if sub is not None:
                out.append(Target(sub, None))
        return out

    def resolve(self, module: str, qualname: str) -> list[Target]:
        parts = qualname.split(".")
        targets = self.resolve_name(module, parts[0])
        for part in parts[1:]:
            nxt: list[Target] = []
            for t in targets:
                if t.node is None:
                    nxt += self.resolve_name(t.mod.name, part)
                elif isinstance(t.node, ast.ClassDef):
                    nxt += self.members(t.mod, t.node, part)
            targets = nxt
        return targets

    def resolve_expr(self, m: Mod, expr: ast.expr) -> list[Target]:
        if isinstance(expr, ast.Subscript):
            expr = expr.value
        try:
            dotted = ast.unparse(expr)
        except Exception:  # pragma: no cover
            return []
        if not all(p.isidentifier() for p in dotted.split(".")):
            return []
        return self.resolve(m.name, dotted)

    def bases(self, m: Mod, cls: ast.ClassDef) -> list[Target]:
        out = []
        for base in cls.bases:
            out += [t for t in self.resolve_expr(m, base) if isinstance(t.node, ast.ClassDef)]
        return out

    def members(self, m: Mod, cls: ast.ClassDef, name: str, seen: frozenset = frozenset()) -> list[Target]:
        """Class-body definitions of `name` in cls, else in the first vLLM base (MRO-ish) that has it."""
        key = (m.name, cls.name)
        if key in seen:
            return []
        own = []
        for s in _body(cls.body):
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s.name == name:
                own.append(s)
            elif isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.target.id == name:
                own.append(s)
            elif isinstance(s, ast.Assign) and any(name in _names(t) for t in s.targets):
                own.append(s)
        if own:
            real = [s for s in own if "overload" not in _decorators(s)] or own
            return [Target(m, s, cls, m) for s in real]
        for base in self.bases(m, cls):
            found = self.members(base.mod, base.node, name, seen | {key})
            if found:
                return found
        return []

    def self_assigns(self, m: Mod, cls: ast.ClassDef, name: str, where: tuple[str, ...],
                     seen: frozenset = frozenset()) -> list[Target]:
        key = (m.name, cls.name)
        if key in seen:
            return []
        out = []
        for fn in _body(cls.body):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (where and fn.name not in where):
                continue
            for node in ast.walk(fn):
                targets = (node.targets if isinstance(node, ast.Assign)
                           else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                if any(name in _self_targets(t) for t in targets):
                    out.append(Target(m, node, cls, m))
        for base in self.bases(m, cls):
            out += self.self_assigns(base.mod, base.node, name, where, seen | {key})
        return out

    # -- signatures ----------------------------------------------------------------------------

    @staticmethod
    def fn_sig(fn: ast.FunctionDef, bound: bool) -> Sig:
        a = fn.args
        positional = [("posonly", x) for x in a.posonlyargs] + [("pos", x) for x in a.args]
        n_defaults = len(a.defaults)
        params = [Param(x.arg, kind, i < len(positional) - n_defaults) for i, (kind, x) in enumerate(positional)]
        params += [Param(x.arg, "kwonly", d is None) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
        if bound and params and params[0].kind != "kwonly":
            params = params[1:]
        return Sig(params, a.vararg is not None, a.kwarg is not None, f"({ast.unparse(a)})")

    def field_sig(self, m: Mod, cls: ast.ClassDef) -> Sig | None:
        """Constructor signature of a dataclass / msgspec.Struct / vLLM @config class, from its fields."""
        decos = _decorators(cls)
        base_names = {ast.unparse(b).split(".")[-1] for b in cls.bases}
        is_dc = bool(decos & {"dataclass", "config"})
        is_struct = "Struct" in base_names
        if not (is_dc or is_struct):
            return None
        kw_only = any(k.arg == "kw_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                      for d in cls.decorator_list if isinstance(d, ast.Call) for k in d.keywords)
        kw_only |= any(k.arg == "kw_only" and ast.unparse(k.value) == "True" for k in cls.keywords)
        params: list[Param] = []
        for base in reversed(self.bases(m, cls)):
            inherited = self.field_sig(base.mod, base.node)
            if inherited:
                params = [p for p in params if p.name not in {q.name for q in inherited.params}] + inherited.params
        for s in _body(cls.body):
            if not (isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)):
                continue
            ann = ast.unparse(s.annotation)
            if "ClassVar" in ann:
                continue
            if ann.endswith("KW_ONLY"):
                kw_only = True
                continue
            required = s.value is None
            if isinstance(s.value, ast.Call) and ast.unparse(s.value.func).split(".")[-1] == "field":
                kws = {k.arg: k.value for k in s.value.keywords}
                if "init" in kws and ast.unparse(kws["init"]) == "False":
                    continue
                required = not ({"default", "default_factory"} & set(kws))
            params = [p for p in params if p.name != s.target.id]
            params.append(Param(s.target.id, "kwonly" if kw_only else "pos", required))
        text = "(" + ", ".join(p.name + ("" if p.required else "=...") for p in params) + ")  [fields]"
        return Sig(params, False, False, text)

    def constructor_sig(self, t: Target) -> tuple[Sig | None, Target]:
        init = self.members(t.mod, t.node, "__init__")
        if init and isinstance(init[0].node, ast.FunctionDef):
            return self.fn_sig(init[0].node, bound=True), init[0]
        return self.field_sig(t.mod, t.node), t

    # -- checks --------------------------------------------------------------------------------

    def check(self, use: Use) -> list[str]:
        """Problems with `use` in this version ([] when it is fine)."""
        if use.kind == MODULE:
            return [] if self.mod(use.module) else [f"module {use.module} does not exist"]
        if self.mod(use.module) is None:
            return [f"module {use.module} does not exist"]
        if use.kind == SOURCE and not use.qualname:
            missing = [v for v in use.values if v not in self.mod(use.module).text]
            return [f"{self.mod(use.module).file} does not mention {v!r}" for v in missing]
        if use.kind == ATTR:
            return self._check_attr(use)
        targets = self.resolve(use.module, use.qualname)
        if not targets:
            return [f"{use.qualname} is not defined in (or exported by) {use.module}"]
        if use.kind == EXPORT:
            return []
        if use.kind == CLASS:
            return [] if any(isinstance(t.node, ast.ClassDef) for t in targets) else [
                f"{use.qualname} is not a class ({targets[0].where()})"]
        if use.kind == FIELD:
            ok = [t for t in targets if t.owner is not None and isinstance(t.node, (ast.AnnAssign, ast.Assign))]
            return [] if ok else [f"{use.qualname} is not a class-level field ({targets[0].where()})"]
        if use.kind in (CALL, STATIC):
            return self._check_call(use, targets[0])
        if use.kind == SOURCE:
            t = targets[0]
            text = ast.get_source_segment(t.mod.text, t.node) if t.node is not None else t.mod.text
            return [f"{use.qualname} ({t.where()}) does not mention {v!r}" for v in use.values if v not in (text or "")]
        if use.kind == LITERALS:
            return self._check_literals(use, targets[0])
        raise AssertionError(use.kind)

    def _check_attr(self, use: Use) -> list[str]:
        cls_name, _, attr = use.qualname.rpartition(".")
        classes = [t for t in self.resolve(use.module, cls_name) if isinstance(t.node, ast.ClassDef)]
        if not classes:
            return [f"class {cls_name} is not defined in (or exported by) {use.module}"]
        c = classes[0]
        if not use.where:
            found = self.members(c.mod, c.node, attr)
            if any(isinstance(t.node, (ast.AnnAssign, ast.Assign)) or "property" in _decorators(t.node)
                   for t in found):
                return []
        if self.self_assigns(c.mod, c.node, attr, use.where):
            return []
        in_ = f" in {'/'.join(use.where)}" if use.where else ""
        return [f"{cls_name} ({c.where()}) never assigns self.{attr}{in_}"
                + ("" if use.where else " nor declares it as a field or property")]

    def _check_call(self, use: Use, t: Target) -> list[str]:
        node = t.node
        if isinstance(node, ast.ClassDef):
            sig, at = self.constructor_sig(t)
            if sig is None:
                return [f"{use.qualname} ({t.where()}): no __init__ and not a dataclass/Struct; "
                        f"cannot tell its constructor signature"]
            static = True
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            decos = _decorators(node)
            static = t.owner is None or bool(decos & {"staticmethod", "classmethod"})
            sig = self.fn_sig(node, bound=t.owner is not None and "staticmethod" not in decos)
            at = t
        else:
            return [f"{use.qualname} ({t.where()}) is not a function, method or class"]
        where = f"{use.qualname}{sig.text} at {at.where()}"
        problems = []
        if use.kind == STATIC and not static:
            problems.append(f"{where}: not a staticmethod/classmethod")
        star = use.params.index("*") if "*" in use.params else len(use.params)
        positional = list(use.params[:star])
        keyword = [p for p in use.params[star + 1:] if p != "**"]
        want_varkw = "**" in use.params
        pos_params = [p for p in sig.params if p.kind != "kwonly"]
        for i, name in enumerate(positional):
            if i >= len(pos_params):
                problems.append(f"{where}: takes {len(pos_params)} positional parameter(s); "
                                f"the runtime passes {name!r} as positional #{i + 1}")
            elif pos_params[i].name != name:
                problems.append(f"{where}: positional parameter #{i + 1} is {pos_params[i].name!r}, not {name!r}")
        by_name = {p.name: p for p in sig.params}
        for name in keyword:
            p = by_name.get(name)
            if p is None:
                problems.append(f"{where}: no parameter {name!r}")
            elif p.kind == "posonly":
                problems.append(f"{where}: parameter {name!r} is positional-only")
        if want_varkw and not sig.varkw:
            problems.append(f"{where}: no **kwargs catch-all")
        passed = set(positional[: len(pos_params)]) | set(keyword)
        for i, p in enumerate(sig.params):
            supplied = (p.kind != "kwonly" and i < len(positional)) or p.name in passed
            if p.required and not supplied:
                problems.append(f"{where}: requires {p.name!r}, which the runtime does not pass")
        if use.kwargs_to and isinstance(node, ast.FunctionDef):
            text = ast.get_source_segment(t.mod.text, node) or ""
            kw = node.args.kwarg.arg if node.args.kwarg else "kwargs"
            if f"{use.kwargs_to}(" not in text or f"**{kw}" not in text:
                problems.append(f"{where}: does not visibly forward **{kw} to {use.kwargs_to}(...)")
        return problems

    def _literal_strings(self, m: Mod, expr: ast.AST, depth: int = 0) -> set[str]:
        if depth > 8 or expr is None:
            return set()
        out: set[str] = set()
        if isinstance(expr, ast.Subscript) and ast.unparse(expr.value).split(".")[-1] == "Literal":
            return {n.value for n in ast.walk(expr.slice) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):  # forward reference
            try:
                return self._literal_strings(m, ast.parse(expr.value, mode="eval").body, depth + 1)
            except SyntaxError:
                return set()
        if isinstance(expr, (ast.Name, ast.Attribute)):
            for t in self.resolve_expr(m, expr):
                if isinstance(t.node, (ast.Assign, ast.AnnAssign)) and t.owner is None:
                    out |= self._literal_strings(t.mod, t.node.value, depth + 1)
                elif type(t.node).__name__ == "TypeAlias":
                    out |= self._literal_strings(t.mod, t.node.value, depth + 1)
            return out
        for child in ast.iter_child_nodes(expr):
            out |= self._literal_strings(m, child, depth + 1)
        return out

    def _check_literals(self, use: Use, t: Target) -> list[str]:
        if not isinstance(t.node, ast.AnnAssign):
            return [f"{use.qualname} ({t.where()}) is not an annotated field"]
        admitted = self._literal_strings(t.mod, t.node.annotation)
        missing = [v for v in use.values if v not in admitted]
        return [f"{use.qualname}: {ast.unparse(t.node.annotation)} ({t.where()}) admits {sorted(admitted)}, "
                f"not {missing}"] if missing else []


# ---------------------------------------------------------------------------------------------
# One Package per version, built once per session; network problems fail loudly (CI has PyPI).

_PACKAGES: dict[str, Package | str] = {}


def package(version: str) -> Package:
    if version not in _PACKAGES:
        try:
            src = WheelSource(version)
            # concurrent cold fetch of the declared modules; re-exports and bases are fetched on demand
            src.prefetch(sorted({u.module for u in USES} | {"vllm.config.parallel"}))
            _PACKAGES[version] = Package(src)
        except (WheelSourceError, OSError) as exc:
            _PACKAGES[version] = f"vllm {version} sources unavailable: {exc}"
    got = _PACKAGES[version]
    if isinstance(got, str):
        pytest.fail(got, pytrace=False)
    return got


def check(version: str, use: Use) -> list[str]:
    try:
        return package(version).check(use)
    except WheelSourceError as exc:  # a module not cached yet, and no network
        pytest.fail(f"vllm {version}: {exc}", pytrace=False)


_CASES = [(v, u) for v in VERSIONS for u in USES if u.applies_to(v)]


@pytest.mark.parametrize("version,use", _CASES, ids=[f"{v}-{u.id}" for v, u in _CASES])
def test_use(version: str, use: Use) -> None:
    problems = check(version, use)
    assert not problems, f"vllm {version}: {use.id}\n  " + "\n  ".join(problems)


def test_uses_are_unique() -> None:
    ids = [u.id for u in USES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# ---------------------------------------------------------------------------------------------
# The runtime may use only what vllm_api.py declares.


def _declared_modules() -> set[str]:
    return {u.module for u in USES}


def _call_uses(qual: str) -> list[Use]:
    """CALL/STATIC uses for calling `qual` ('LLM' -> 'LLM' or 'LLM.__init__'; 'LLM.generate')."""
    names = {qual, f"{qual}.__init__"}
    return [u for u in USES if u.kind in (CALL, STATIC) and u.qualname in names]


def _declared_under(qual: str) -> bool:
    return any(u.qualname == qual or u.qualname.startswith(qual + ".") for u in USES)


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None  # e.g. LLM(...).generate: no static name


def undeclared_vllm_uses(source: str, filename: str = "<runtime>") -> list[str]:
    """Problems: vLLM names that `source` imports, touches or calls in ways vllm_api.py does not declare.

    Tracked: `import vllm...`, `from vllm... import X`, `importlib.import_module("vllm...")`; attribute
    access on imported names (`X.attr`); calls of imported names and of attributes/variables assigned
    from an imported class's constructor (`self.llm = LLM(...)`; `self.llm.generate(...)`): the callable
    must be declared as CALL/STATIC, every keyword must be a declared param (or a field of its
    `kwargs_to` class), and positional arguments may not exceed the declared positional names.
    """
    tree = ast.parse(source, filename=filename)
    problems: list[str] = []
    modules = _declared_modules()
    names: dict[str, str] = {}  # local name -> vLLM qualname (class/function imported from vllm)
    mod_alias: dict[str, str] = {}  # local name -> vllm module

    def at(node: ast.AST) -> str:
        return f"{filename}:{getattr(node, 'lineno', '?')}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "vllm" or a.name.startswith("vllm."):
                    if a.name not in modules:
                        problems.append(f"{at(node)}: `import {a.name}`: module not declared in vllm_api.py")
                    if a.asname:
                        mod_alias[a.asname] = a.name
                    else:
                        mod_alias["vllm"] = "vllm"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "vllm" or node.module.startswith("vllm.")):
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:  # a submodule
                    mod_alias[a.asname or a.name] = f"{node.module}.{a.name}"
                elif any(u.module == node.module and (u.qualname == a.name or u.qualname.startswith(a.name + "."))
                         for u in USES):
                    names[a.asname or a.name] = a.name
                else:
                    problems.append(f"{at(node)}: `from {node.module} import {a.name}`: not declared in vllm_api.py")
        elif (isinstance(node, ast.Call)
              and _dotted(node.func) in ("importlib.import_module", "import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == "vllm" and node.args[0].value not in modules):
            problems.append(f"{at(node)}: import_module({node.args[0].value!r}): module not declared in vllm_api.py")

    def qual_of(expr: ast.AST) -> str | None:
        """vLLM qualname an expression names: an imported name, or an attribute chain below one."""
        d = _dotted(expr)
        if d is None:
            return None
        head, _, rest = d.partition(".")
        if head in names:
            return names[head] + (f".{rest}" if rest else "")
        if head in mod_alias:
            parts = (mod_alias[head] + (f".{rest}" if rest else "")).split(".")
            for i in range(len(parts), 0, -1):  # longest declared module prefix, then the qualname in it
                if ".".join(parts[:i]) in modules:
                    return ".".join(parts[i:]) or None
        return None

    # Instances: `x = Cls(...)` / `self.x = Cls(...)` / `x = Cls.from_...(...)` (an alternate
    # constructor) for an imported class -> "Cls"
    instances: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
            q = qual_of(node.value.func)
            if q and q.count(".") == 1 and q.split(".")[1].startswith("from_"):
                q = q.split(".")[0]
            if q and "." not in q:
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    d = _dotted(t)
                    if d:
                        instances[d] = q

    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in called and not isinstance(node.ctx, ast.Store):
            q = qual_of(node)
            if q and "." in q and not _declared_under(q):
                problems.append(f"{at(node)}: `{ast.unparse(node)}`: {q} not declared in vllm_api.py")
        if not isinstance(node, ast.Call):
            continue
        q = qual_of(node.func)
        if q is None and isinstance(node.func, ast.Attribute):
            owner = _dotted(node.func.value)
            if owner in instances:
                q = f"{instances[owner]}.{node.func.attr}"
        if q is None:
            continue
        uses = _call_uses(q)  # several when declared per version: any may allow the call
        call = f"{at(node)}: `{ast.unparse(node.func)}(...)`"
        if not uses:
            problems.append(f"{call}: {q} is not declared as CALL/STATIC in vllm_api.py")
            continue
        stars = [u.params.index("*") if "*" in u.params else len(u.params) for u in uses]
        n_pos = sum(1 for a in node.args if not isinstance(a, ast.Starred))
        if n_pos > max(stars) or any(isinstance(a, ast.Starred) for a in node.args) and max(stars) == 0:
            problems.append(f"{call}: passes {n_pos} positional argument(s); {uses[0].id} declares {max(stars)}")
        for kw in node.keywords:
            if kw.arg is None:  # **splat: keys unknown statically
                continue
            if any(kw.arg in u.params and kw.arg not in ("*", "**") for u in uses):
                continue
            if any(u.kwargs_to and any(f.qualname == f"{u.kwargs_to}.{kw.arg}" for f in USES) for u in uses):
                continue
            problems.append(f"{call}: keyword {kw.arg!r} is not declared in {uses[0].id}"
                            + (f" nor as a {uses[0].kwargs_to} field" if uses[0].kwargs_to else ""))
    return problems


def test_runtime_uses_are_declared() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    problems = [p for f in files for p in undeclared_vllm_uses(f.read_text(), str(f.relative_to(SRC.parents[1])))]
    assert not problems, "the runtime uses vLLM surfaces that vllm_api.py does not declare:\n  " + "\n  ".join(problems)


def test_import_scan_catches_undeclared_uses() -> None:
    src = """
import vllm.not_declared
from vllm import NotDeclared
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.distributed.utils import StatelessProcessGroup
import importlib
importlib.import_module("vllm.also_not_declared")

class E:
    def __init__(self):
        args = AsyncEngineArgs(model="m", enforce_eager=True, no_such_engine_arg=1, **extra)
        self.llm = AsyncLLM.from_engine_args(args)
        StatelessProcessGroup.not_declared_helper(1)

    async def go(self, p, sp):
        self.llm.generate(p, sp, "r")
        self.llm.generate(p, sp, "r", True)
        await self.llm.collective_rpc("m", timeout=1, bogus=2)
        await self.llm.sleep_forever(level=1)
"""
    problems = "\n".join(undeclared_vllm_uses(src, "x.py"))
    expected = [
        "`import vllm.not_declared`", "import NotDeclared`", "import_module('vllm.also_not_declared')",
        "keyword 'no_such_engine_arg'", "StatelessProcessGroup.not_declared_helper",
        "`self.llm.generate(...)`: passes 4 positional", "keyword 'bogus'", "AsyncLLM.sleep_forever is not declared",
    ]
    for e in expected:
        assert e in problems, f"{e!r} not reported in:\n{problems}"
    assert problems.count("\n") + 1 == len(expected), problems  # and nothing else (enforce_eager, create, ...)


# ---------------------------------------------------------------------------------------------
# The analyzer must see absences, not just presences (checked against the real 0.20.2 source).

_NEGATIVE = [
    Use(MODULE, "vllm.no_such_module"),
    Use(EXPORT, "vllm", "NoSuchName"),
    Use(CLASS, "vllm.outputs", "CompletionOutput.text"),
    Use(CALL, "vllm.entrypoints.llm", "LLM.generate", ("prompts", "*", "no_such_param")),
    Use(CALL, "vllm.entrypoints.llm", "LLM.generate", ("sampling_params",)),  # wrong position
    Use(CALL, "vllm.entrypoints.llm", "LLM.generate", ("prompts", "sampling_params", "use_tqdm")),  # kw-only
    Use(CALL, "vllm.distributed.utils", "StatelessProcessGroup.create", ("host", "port")),  # misses required
    Use(CALL, "vllm.distributed.utils", "StatelessProcessGroup", ("*", "rank")),  # misses required fields
    Use(CALL, "vllm.distributed.device_communicators.pynccl", "PyNcclCommunicator.broadcast", ("*", "tensor", "**")),
    Use(STATIC, "vllm.entrypoints.llm", "LLM.generate", ("prompts",)),
    Use(FIELD, "vllm.sampling_params", "SamplingParams.no_such_field"),
    Use(FIELD, "vllm.outputs", "RequestOutput.outputs"),  # assigned in __init__, not a class field
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.device", where=("load_model",)),
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.no_such_attr"),
    Use(SOURCE, "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker", values=("no_such_text",)),
    Use(LITERALS, "vllm.config", "ParallelConfig.distributed_executor_backend", values=("uni", "no_such_backend")),
]


@pytest.mark.parametrize("use", _NEGATIVE, ids=[u.id for u in _NEGATIVE])
def test_analyzer_reports_missing(use: Use) -> None:
    assert check("0.20.2", use), f"{use.id} should have been reported missing"


# ---------------------------------------------------------------------------------------------
# Surfaces near the runtime's that differ between the versions: the runtime must not use these.
# (surface, versions in which it exists). Kept true by this test; see vllm_api.py's docstring.
# Lines: vllm/<file>:<line> in the version named (0.14.1, 0.16.0, 0.17.1, 0.20.2).

_DU, _LLM, _NCCL = "vllm.distributed.utils", "vllm.entrypoints.llm", "vllm.distributed.device_communicators.pynccl"
_RUNNER, _WB = "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.worker_base"
_ASYNC, _WORKER, _AU = "vllm.v1.engine.async_llm", "vllm.v1.worker.gpu_worker", "vllm.engine.arg_utils"
_WTN, _WTI = "vllm.distributed.weight_transfer.nccl_engine", "vllm.distributed.weight_transfer.ipc_engine"
_TO_017, _FROM_016, _FROM_017 = ("0.14.1", "0.16.0", "0.17.1"), ("0.16.0", "0.17.1", "0.20.2"), ("0.17.1", "0.20.2")
DIFFERENCES: list[tuple[Use, tuple[str, ...]]] = [
    # StatelessProcessGroup(rank=, world_size=, store=) works only on 0.20: up to 0.17 the dataclass has a
    # required `socket` field (distributed/utils.py:155 0.14.1, :154 0.16.0 / 0.17.1), which 0.20 removed.
    # create() works on all (listen_socket=: 0.20.2 utils.py:443).
    (Use(CALL, _DU, "StatelessProcessGroup", ("*", "rank", "world_size", "store", "socket")), _TO_017),
    (Use(FIELD, _DU, "StatelessProcessGroup.socket"), _TO_017),
    (Use(STATIC, _DU, "StatelessProcessGroup.create", ("host", "port", "rank", "world_size", "*", "listen_socket")),
     ("0.20.2",)),
    # tensor collectives on the StatelessProcessGroup itself: 0.17 on (utils.py:231 / :247 0.17.1)
    (Use(CALL, _DU, "StatelessProcessGroup.broadcast", ("tensor", "src")), _FROM_017),
    (Use(CALL, _DU, "StatelessProcessGroup.send", ("tensor", "dst")), _FROM_017),
    # PyNcclCommunicator.destroy(): 0.20 only (device_communicators/pynccl.py:146 0.20.2)
    (Use(CALL, _NCCL, "PyNcclCommunicator.destroy"), ("0.20.2",)),
    # TokensPrompt moved: inputs/data.py (:56 0.14.1, :68 0.16.0, :65 0.17.1) -> inputs/llm.py (:106 0.20.2);
    # its cache_salt key moved into a _PromptOptions base in 0.16 (data.py:55 0.16.0, :52 0.17.1; llm.py:93
    # 0.20.2); 0.14.1 declares it on TokensPrompt itself (data.py:90)
    (Use(MODULE, "vllm.inputs.data"), _TO_017),
    (Use(MODULE, "vllm.inputs.llm"), ("0.20.2",)),
    (Use(SOURCE, "vllm.inputs.data", "TokensPrompt", values=("cache_salt",)), ("0.14.1",)),
    # AsyncLLM.sleep() resets the prefix cache itself up to 0.16 (async_llm.py:756 0.14.1, :940 0.16.0);
    # from 0.17 the engine core does, and only for level >= 1 (core.py:657-658 0.17.1)
    (Use(SOURCE, _ASYNC, "AsyncLLM.sleep", values=("self.reset_prefix_cache()",)), ("0.14.1", "0.16.0")),
    # pause_generation(mode="abort"|"wait"|"keep"): 0.16 on (async_llm.py:729-735 0.16.0); 0.14.1 has
    # wait_for_inflight_requests= only (async_llm.py:565-570), deprecated but still accepted after it
    (Use(CALL, _ASYNC, "AsyncLLM.pause_generation", ("*", "mode")), _FROM_016),
    # AsyncLLM.shutdown(timeout=): 0.20 only (async_llm.py:259 0.20.2); the runtime calls shutdown()
    (Use(CALL, _ASYNC, "AsyncLLM.shutdown", ("*", "timeout")), ("0.20.2",)),
    # the native transfer path (vllm_api.py declares the surfaces per version): Worker.update_weights
    # synchronizes the device after the (asynchronous) NCCL receive only in 0.20 (gpu_worker.py:1004-1006
    # 0.20.2; not in 0.16.0 :967-1011 nor 0.17.1 :872-916)
    (Use(SOURCE, _WORKER, "Worker.update_weights", values=("synchronize()",)), ("0.20.2",)),
    # IPCWeightTransferUpdateInfo(ipc_handles_pickled=...) (the HTTP transport) refuses to unpickle without
    # VLLM_ALLOW_INSECURE_SERIALIZATION=1 only in 0.20 (ipc_engine.py:79-84 0.20.2; 0.17.1 :71-78 does not)
    (Use(SOURCE, _WTI, "IPCWeightTransferUpdateInfo.__post_init__", values=("VLLM_ALLOW_INSECURE_SERIALIZATION",)),
     ("0.20.2",)),
    # the NCCL engine's worker rank: parallel_config.data_parallel_rank up to 0.17 (nccl_engine.py:109
    # 0.16.0, :135 0.17.1), .data_parallel_index in 0.20 (:135 0.20.2) -- rank_offset is the sender's to set
    (Use(SOURCE, _WTN, "NCCLWeightTransferEngine.init_transfer_engine", values=("data_parallel_index",)),
     ("0.20.2",)),
    # GPUModelRunner.reload_weights(weights_iterator=...): 0.16 on (gpu_model_runner.py:4315 0.16.0;
    # 0.14.1's :4000 takes nothing)
    (Use(CALL, _RUNNER, "GPUModelRunner.reload_weights", ("*", "weights_iterator")), _FROM_016),
    # LLM(swap_space=...) / EngineArgs.swap_space: up to 0.17 (arg_utils.py:436 0.14.1, :435 0.16.0,
    # :447 0.17.1); EngineArgs.logits_processor_pattern: 0.14 / 0.16 (arg_utils.py:509 / :510)
    (Use(CALL, _LLM, "LLM.__init__", ("*", "model", "swap_space")), _TO_017),
    (Use(FIELD, _AU, "EngineArgs.swap_space"), _TO_017),
    (Use(FIELD, _AU, "EngineArgs.logits_processor_pattern"), ("0.14.1", "0.16.0")),
    # LLM.generate(tokenization_kwargs=..., mm_processor_kwargs=...): 0.16 on (llm.py:404 0.16.0)
    (Use(CALL, _LLM, "LLM.generate", ("prompts", "*", "tokenization_kwargs")), _FROM_016),
    # SamplingParams(logits_processors=..., truncate_prompt_tokens=...): 0.14 / 0.16 (sampling_params.py:205 /
    # :210 0.14.1, :210 / :215 0.16.0)
    (Use(FIELD, "vllm.sampling_params", "SamplingParams.logits_processors"), ("0.14.1", "0.16.0")),
    (Use(FIELD, "vllm.sampling_params", "SamplingParams.truncate_prompt_tokens"), ("0.14.1", "0.16.0")),
    # WorkerWrapperBase.execute_method: up to 0.17 (worker_base.py:328 0.14.1, :324 0.16.0, :328 0.17.1);
    # collective_rpc dispatches by name either way
    (Use(CALL, _WB, "WorkerWrapperBase.execute_method", ("method",)), _TO_017),
    # GPUModelRunner.load_model(eep_scale_up=...) (gpu_model_runner.py:3803 0.14.1, :4119 0.16.0) became
    # (load_dummy_weights=...) (:4276 0.17.1, :4772 0.20.2)
    (Use(CALL, _RUNNER, "GPUModelRunner.load_model", ("*", "eep_scale_up")), ("0.14.1", "0.16.0")),
    (Use(CALL, _RUNNER, "GPUModelRunner.load_model", ("*", "load_dummy_weights")), _FROM_017),
]


@pytest.mark.parametrize("use,present", DIFFERENCES, ids=[u.id for u, _ in DIFFERENCES])
def test_documented_differences(use: Use, present: tuple[str, ...]) -> None:
    got = tuple(v for v in VERSIONS if not check(v, use))
    assert got == present, f"{use.id}: exists in {got or 'none'}, documented as {present}"
    assert use not in USES, f"{use.id} differs between versions; the runtime must not rely on it"


_LIMITED = [u for u in USES if u.versions]


@pytest.mark.parametrize("use", _LIMITED, ids=[u.id for u in _LIMITED])
def test_a_use_limited_to_some_versions_is_absent_from_the_others(use: Use) -> None:
    """`versions=` says exactly which lines have a surface: test_use checks it holds there, this that it
    does not hold elsewhere (a split that became unnecessary, or a line that gained the surface, shows)."""
    also = [v for v in VERSIONS if not use.applies_to(v) and not check(v, use)]
    assert not also, f"{use.id} also holds in {also}: widen its versions= (or drop it)"


def test_vllm_api_module_is_plain_data() -> None:
    assert all(isinstance(u, Use) for u in vllm_api.USES)
    assert {u.kind for u in USES} <= set(vllm_api.KINDS)


def test_extra_engine_args_list_is_the_image_vllm_engine_args() -> None:
    """src/rollfleet/vllm_engine_args.txt (what `vllm.extraEngineArgs` and the chart's schema allow) lists
    exactly the public EngineArgs fields of the image's vLLM."""
    from rollfleet import vllm_args

    lock = (SRC.parents[1] / "images" / "runtime" / "requirements.lock").read_text()
    assert f"vllm=={IMAGE_VLLM} " in lock
    source = package(IMAGE_VLLM).src.read("vllm/engine/arg_utils.py")
    assert source, "vllm/engine/arg_utils.py not in the wheel"
    assert vllm_args.listed() == vllm_args.fields_in(source)


IMAGE_VLLM = "0.14.1"  # images/runtime/requirements.lock
