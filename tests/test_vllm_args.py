"""vllm_args.py: the `vllm.extraEngineArgs` keys vLLM takes, from the installed vLLM or the image's list."""

from __future__ import annotations

import ast
import importlib.util
import types
from pathlib import Path

import pytest

from rollfleet import vllm_args

ROOT = Path(__file__).resolve().parents[1]

SOURCE = '''
class EngineArgs:
    model: str = "m"
    kv_cache_dtype: str = "auto"
    only_in_this_version: bool = False
    _private: int = 0
    def method(self): pass
'''


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """A stand-in vLLM 'installed' at tmp_path/vllm, whose engine/arg_utils.py is SOURCE."""
    (tmp_path / "vllm" / "engine").mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (tmp_path / "vllm" / "engine" / "arg_utils.py").write_text(SOURCE)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        origin=str(tmp_path / "vllm" / "__init__.py")) if name == "vllm" else real(name, *a))
    vllm_args.known.cache_clear()
    yield
    vllm_args.known.cache_clear()


def test_fields_are_the_public_annotated_ones():
    assert vllm_args.fields_in(SOURCE) == ["kv_cache_dtype", "model", "only_in_this_version"]


def test_without_vllm_the_image_list_is_used(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    vllm_args.known.cache_clear()
    assert vllm_args.known() == frozenset(vllm_args.listed())
    assert vllm_args.problem("only_in_this_version") == "not an engine argument of vLLM"
    vllm_args.known.cache_clear()


def test_the_installed_vllm_decides(installed):
    assert vllm_args.problem("only_in_this_version") is None
    assert vllm_args.problem("load_format") == "not an engine argument of vLLM"


@pytest.mark.parametrize(("key", "fragment"), [
    ("kvCacheDtype", "snake_case"), ("--kv-cache-dtype", "kv_cache_dtype"), ("max-num-batched-tokens", "snake_case"),
    ("model", "set model.name instead"), ("worker_extension_cls", "remove it"),
    ("hf_token", "model.hfTokenSecret"), ("enable_sleep_mode", "colocated"),
    ("distributed_executor_backend", "never ray inside a Ray actor"), ("kv_cache_dtyp", "did you mean kv_cache_dtype"),
])
def test_problems_name_the_fix(key, fragment):
    assert fragment in vllm_args.problem(key)


def test_the_schema_lists_the_image_list_minus_what_rollfleet_sets():
    names = vllm_args.schema_names()
    assert "kv_cache_dtype" in names and "model" not in names and "tensor_parallel_size" not in names
    assert names == sorted(set(vllm_args.listed()) - set(vllm_args.OWNED))


def test_every_engine_argument_the_runtime_sets_is_owned():
    """A key rollfleet passes itself would be passed twice (a TypeError at engine start) if
    extraEngineArgs could carry it too; disable_log_stats is a default extraEngineArgs may change."""
    tree = ast.parse((ROOT / "src/rollfleet/runtime/engine.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "AsyncEngineArgs")
    optional = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "optional")
    passed = {k.arg for k in call.keywords if k.arg} | {k.value for k in optional.keys}
    assert len(passed) > 10
    assert passed - set(vllm_args.OWNED) == set()
