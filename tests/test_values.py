"""values.py: values files and --set read as Helm reads them, checked against Helm's own reader and parser
(helm-python-sdk binds the Helm v4 Go SDK)."""

from __future__ import annotations

import io

import helm_python as helm
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rollfleet.spec import DEFAULT_ENV, SpecError, load_spec
from rollfleet.values import (MAX_DEPTH, ValuesError, apply_sets, load_values, merge, parse_yaml, read_values)

SCALARS = ["2024-01-01", "2024-01-01T10:00:00Z", "1.10", "1e3", "1_000", "0x1f", "017", "0o17", "0b101", "1:20",
           "y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "True", "~", "null", "Null", "NULL", "+1", "+1.5",
           "1.", ".5", "12e03", "0", "-0", "00", "08", "09.5", "1e400", "0.1e-3", "'007'", "\"1.10\"", "=", "",
           "0x", "-0x1f", "0b", "+", ".", "1e", "e3", "yEs", "nan", "v1.2.3", "64Gi", "500m", "a: b"[:1]]


def helm_value(text: str):
    return helm.values_from_yaml(f"k: {text}\n").get("k")


@pytest.mark.parametrize("text", SCALARS)
def test_scalars_resolve_as_helm_reads_them(text):
    want, got = helm_value(text), parse_yaml(f"k: {text}\n", "v.yaml").get("k")
    assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, (got, want)
    assert got == want


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan"])
def test_numbers_helm_refuses_are_refused_with_where(text):
    with pytest.raises(helm.HelmValuesError):
        helm_value(text)
    with pytest.raises(ValuesError, match=r"^v.yaml:1:4: .*quote it"):
        parse_yaml(f"k: {text}\n", "v.yaml")


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("0123456789._+-eExXoObBaf:yYnN~TtrRuU "), min_size=1, max_size=8))
@example("0E_0").via("found by hypothesis: '_' in the exponent")
@example("._5").via("a leading '.': Go keeps the '_'")
@example("-_1")
@example("--0")
def test_property_plain_scalars_agree_with_helm(text):
    try:
        want = helm_value(text)
    except helm.HelmValuesError:
        with pytest.raises(ValuesError):
            parse_yaml(f"k: {text}\n", "v.yaml")
        return
    try:
        got = parse_yaml(f"k: {text}\n", "v.yaml").get("k")
    except ValuesError:
        pytest.fail(f"{text!r}: Helm reads {want!r}, rollfleet refused it")
    assert got == want or (isinstance(want, float) and abs(got - want) <= abs(want) * 1e-15), (text, got, want)


def test_keys_become_strings_as_in_helm():
    text = "true: 1\n1: x\n"
    assert parse_yaml(text, "v.yaml") == helm.values_from_yaml(text) == {"true": 1, "1": "x"}


@pytest.mark.parametrize(("text", "where", "fragment"), [
    ("name: a\nname: b\n", "v.yaml:2:1", "duplicate key 'name' (first at line 1)"),
    ("pools:\n  trainer: {nodes: 1, nodes: 2}\n", "v.yaml:2:23", "duplicate key 'nodes'"),
    ("name: a\n---\nname: b\n", "v.yaml:2:1", "several YAML documents"),
    ("name: [a\n", "v.yaml:2:1", "expected ',' or ']'"),
    ("name: a\n  bad: indent\n", "v.yaml:2:6", "mapping values are not allowed"),
    ("- a\n- b\n", "v.yaml", "must be a YAML mapping"),
    ("a: &a [*a]\n", "v.yaml:1:4", "recursive alias"),
    ("? [a]\n: b\n", "v.yaml:1:3", "a key must be a plain scalar"),
])
def test_yaml_problems_are_one_line_with_file_line_column(text, where, fragment):
    with pytest.raises(ValuesError) as exc:
        parse_yaml(text, "v.yaml")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(where + ": ") and fragment in message, message


def test_alias_bomb_is_refused_before_it_expands():
    anchors = "a: &a [" + ",".join(["x"] * 10) + "]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(9))
    with pytest.raises(ValuesError, match="aliases expand to more than"):
        parse_yaml(anchors, "bomb.yaml")


def test_nesting_deep_enough_for_recursion_errors_is_refused():
    with pytest.raises(ValuesError, match=f"nested 901 levels deep; .*at most {MAX_DEPTH}"):
        parse_yaml("a: " + "[" * 900 + "]" * 900, "deep.yaml")


def test_merge_keys_and_one_letter_booleans_as_helm():
    text = "base: &b {p: 1, q: 2}\nthis:\n  <<: *b\n  q: 3\ny: yes\n"  # `y` is a boolean key in Helm's YAML
    assert parse_yaml(text, "v.yaml") == helm.values_from_yaml(text)
    assert parse_yaml(text, "v.yaml")["this"] == {"p": 1, "q": 3}


# --- several -f files and stdin ---------------------------------------------------------------------------


def test_files_deep_merge_in_order_later_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: from-a\npools:\n  trainer: {nodes: 2, gpusPerNode: 8}\nimage: {pullSecrets: [x, y]}\n")
    b.write_text("pools:\n  trainer: {nodes: 3}\nimage: {pullSecrets: [z]}\n")
    values = read_values([a, b])
    assert values == {"name": "from-a", "pools": {"trainer": {"nodes": 3, "gpusPerNode": 8}},
                      "image": {"pullSecrets": ["z"]}}  # lists are replaced, as in Helm
    spec = load_values([a, b], ["pools.trainer.nodes=4"])
    assert (spec.name, spec.pools.trainer.nodes, spec.pools.trainer.gpus_per_node) == ("from-a", 4, 8)


def test_dash_reads_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("name: piped\n"))
    assert load_values(["-"]).name == "piped"


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(ValuesError, match=f"{tmp_path}/nope.yaml: cannot read the values file"):
        read_values([tmp_path / "nope.yaml"])


def test_merge_is_helms():
    assert merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"c": 3}, "d": [2], "e": None}) == {
        "a": {"b": 1, "c": 3}, "d": [2], "e": None}


def test_empty_file_and_none_give_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_values(path) == load_values(None) == load_spec({})


def test_env_merges_into_the_defaults_and_null_removes_a_default(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("env: {HF_HOME: /cache, VLLM_LOGGING_LEVEL: null}\nncclEnv: {NCCL_IB_HCA: mlx5}\n")
    spec = load_values(path)
    assert spec.env == {**{k: v for k, v in DEFAULT_ENV.items() if k != "VLLM_LOGGING_LEVEL"}, "HF_HOME": "/cache"}
    assert spec.nccl_env == {"NCCL_CUMEM_ENABLE": "0", "NCCL_IB_HCA": "mlx5"}


# --- --set and --set-string --------------------------------------------------------------------------------

SETS = ["a=1", "a=1,b=2", "a.b=c", "a=", "a=,b=1", "a={x,y}", "a={}", "a={1,true,null}", "a[0]=x", "a[1]=x",
        "a[0].b=c,a[0].d=e", "a[0][1]=x", r"a\.b=c", r"a=x\,y", "a=007", "a=0", "a=-5", "a=1.5", "a=True", "a=NULL",
        "a.b.c=d,a.b.e=f", "a==b", "a=b=c", "=3", "a=1,", "a={x,y},b=2", "a[0]={1,2}", "a=9223372036854775808",
        "a=+1", "a=1e3", "a=0x10", "a b=c", r"a\[0]=x", "name=x,name=y"]
BAD_SETS = ["a", "a.=1", "a[x]=1", "a[-1]=1", "a.b", "a=b,c", "a[0].b", "a={x,y"]


@pytest.mark.parametrize("item", SETS)
def test_set_parses_as_helm_does(item):
    assert apply_sets({}, [item]) == helm.parse_set_string(item)


@pytest.mark.parametrize("item", ["a=1", "a=true", "a={1,2}", "a[0]=5", "image.tag=1.10", "a=null"])
def test_set_string_parses_as_helm_does(item):
    assert apply_sets({}, [], [item]) == helm.parse_set_string_values(item)


@pytest.mark.parametrize("item", BAD_SETS)
def test_malformed_set_is_refused_as_helm_refuses_it(item):
    with pytest.raises(helm.HelmValuesError):
        helm.parse_set_string(item)
    with pytest.raises(ValuesError, match=r"^--set "):
        apply_sets({}, [item])


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("ab.=,[]{}0\\1 "), min_size=1, max_size=12))
@example("[0 ]").via("found by hypothesis: Go's Atoi takes no space")
def test_property_set_agrees_with_helm(item):
    try:
        want = helm.parse_set_string(item)
    except helm.HelmValuesError:
        with pytest.raises(ValuesError):
            apply_sets({}, [item])
        return
    assert apply_sets({}, [item]) == want


def test_sets_apply_over_the_files_and_set_string_last():
    values = {"pools": {"trainer": {"nodes": 1}}, "image": {"tag": "x"}}
    out = apply_sets(values, ["pools.inference.gpusPerNode=8", "image.tag=2"], ["image.tag=1.10"])
    assert out == {"pools": {"trainer": {"nodes": 1}, "inference": {"gpusPerNode": 8}}, "image": {"tag": "1.10"}}
    assert values == {"pools": {"trainer": {"nodes": 1}}, "image": {"tag": "x"}}  # not mutated


def test_set_refuses_walking_through_a_scalar():
    with pytest.raises(ValuesError, match="name is not a mapping"):
        apply_sets({"name": "x"}, ["name.first=y"])


def test_a_number_where_a_string_belongs_is_refused_like_helms_schema():
    with pytest.raises(SpecError, match="image.tag: Input should be a valid string; write it in quotes"):
        load_values(None, ["image.tag=110"])
    assert load_values(None, [], ["image.tag=110"]).image.tag == "110"
