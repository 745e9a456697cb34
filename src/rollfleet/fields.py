"""Field types of the values. Each carries its rule, the fix its error names, and the JSON Schema that
makes `helm install` enforce the same rule (charts/rollfleet/values.schema.json is generated from them).

Patterns are full matches here (`re.fullmatch`) and `^…$` in the schema, which Helm's Go regexp reads
as the whole text: a trailing newline never passes. Integers are strict (no `"8"`, no `true`) like the
schema; a float with no fraction (`8.0`, what Helm reads for `8e0`) counts as an integer, as in JSON Schema.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

import annotated_types
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, StrictStr, WithJsonSchema,
                      model_serializer)
from pydantic.alias_generators import to_camel

INT32_MAX = 2**31 - 1  # Kubernetes stores replicas, seconds and probe fields as int32

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
# KubeRay refuses RayCluster/RayJob names that are not DNS-1035 labels (must start with a letter).
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
LABEL_KEY = rf"({DNS1123_SUBDOMAIN}/)?{_NAME}"  # a qualified name: optional DNS prefix, 63-char name
LABEL_KEY_LENGTHS = r"([^/]{1,253}/)?[^/]{1,63}"  # the prefix ≤ 253, the name ≤ 63 (a second pattern)
LABEL_VALUE = rf"({_NAME})?"
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
SECRET_KEY = r"[-._a-zA-Z0-9]+"
# The Docker reference grammar (distribution/reference): [host[:port]/]path, lowercase path components.
_HOST = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(\.([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
_PATH = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REPOSITORY = rf"({_HOST}(:[0-9]+)?/)?{_PATH}(/{_PATH})*"
IMAGE_TAG = r"[\w][\w.-]{0,127}"
DIGEST = r"sha256:[0-9a-f]{64}"
QUANTITY = r"([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"
BYTES = r"([0-9]+(\.[0-9]+)?)(k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"  # no milli-bytes
SUFFIX = {"m": Decimal("0.001"), None: Decimal(1), **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
          **{s + "i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}}


def full(pattern: str) -> str:
    """A pattern for JSON Schema that must match the whole string."""
    return f"^({pattern})$"


def schema_of(annotated: Any) -> dict[str, Any]:
    """The JSON Schema a field type of this module declares."""
    return [m.json_schema for m in annotated.__metadata__ if isinstance(m, WithJsonSchema)][-1]


def text(pattern: str, fix: str, *, max_length: int | None = None, extra: tuple[str, ...] = ()) -> Any:
    """A string that fully matches `pattern` (and the `extra` patterns), at most `max_length` characters."""
    patterns = [re.compile(p) for p in (pattern, *extra)]

    def check(value: str) -> str:
        if any(p.fullmatch(value) is None for p in patterns) or (max_length and len(value) > max_length):
            raise ValueError(fix)
        return value

    schema: dict[str, Any] = {"type": "string", "pattern": full(pattern)}
    if extra:
        schema = {"type": "string", "allOf": [{"pattern": full(p)} for p in (pattern, *extra)]}
    if max_length:
        schema["maxLength"] = max_length
    return Annotated[StrictStr, AfterValidator(check), WithJsonSchema(schema)]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(ge: int = 0, le: int = INT32_MAX) -> Any:
    """A strict integer in [ge, le] (int32 unless told otherwise)."""
    return Annotated[int, Strict(), annotated_types.Ge(ge), annotated_types.Le(le), BeforeValidator(_integral)]


def mapping(key: Any, value: Any) -> Any:
    """dict[key, value] whose schema checks every key (propertyNames) and value, not only matching ones."""
    return Annotated[dict[key, value], WithJsonSchema(
        {"type": "object", "propertyNames": schema_of(key), "additionalProperties": schema_of(value)})]


# --- names -----------------------------------------------------------------------------------------

FleetName = text(DNS1035_LABEL, "not a DNS-1035 label; start with a lowercase letter, then use lowercase "
                 "letters, digits and '-', at most 40 characters (KubeRay appends suffixes)", max_length=40)
Namespace = text(DNS1123_LABEL, "not a DNS-1123 label; use lowercase letters, digits and '-', "
                 "at most 63 characters", max_length=63)
ObjectName = text(DNS1123_SUBDOMAIN, "not a Kubernetes object name (DNS-1123 subdomain); use lowercase "
                  "letters, digits, '-' and '.', at most 253 characters", max_length=253)
SecretKey = text(SECRET_KEY, "not a Secret key; use letters, digits, '-', '_' and '.'", max_length=253)
LabelKey = text(LABEL_KEY, "not a Kubernetes label key; write [prefix/]name: an optional DNS prefix (at most "
                "253 characters) and a name of at most 63 letters, digits, '-', '_' or '.' that starts and ends "
                "with a letter or digit", extra=(LABEL_KEY_LENGTHS,))
LabelValue = text(LABEL_VALUE, "not a Kubernetes label value; use at most 63 letters, digits, '-', '_' or '.', "
                  "starting and ending with a letter or digit", max_length=63)
NonEmptyLabelValue = text(_NAME, "not a Kubernetes label value; use 1 to 63 letters, digits, '-', '_' or '.', "
                          "starting and ending with a letter or digit", max_length=63)
Labels = mapping(LabelKey, LabelValue)
AnyText = Annotated[StrictStr, WithJsonSchema({"type": "string"})]
Annotations = mapping(LabelKey, AnyText)  # their total size is a rule the schema cannot express (spec.py)

# --- image -----------------------------------------------------------------------------------------

ImageRepository = text(IMAGE_REPOSITORY, "not an image repository; write [registry[:port]/]path in lowercase, "
                       "without a tag or digest (those are image.tag and image.digest)", max_length=255)
ImageTag = text(IMAGE_TAG, "not an image tag; use letters, digits, '_', '.' and '-' (not first), at most 128 "
                "characters, and quote it so YAML keeps it a string (e.g. '1.10')")
Digest = text(DIGEST, "not an image digest; write sha256: and 64 lowercase hex digits")

# --- resources -------------------------------------------------------------------------------------


def _quantity_type(value: Any) -> Any:
    """One error for a non-string, non-integer quantity (not one per member of `str | int`)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("not a Kubernetes quantity; quote it, e.g. '8', '500m', '0.5', '64Gi'")
    return value


def _quantity(pattern: str, fix: str) -> Any:
    compiled = re.compile(pattern)

    def check(value: str | int) -> str:
        if isinstance(value, int) and value < 0 or not compiled.fullmatch(str(value)):
            raise ValueError(fix)
        return str(value)

    # The pattern is in the JSON Schema too, so `helm install` rejects a bad quantity before rendering.
    return Annotated[str | int, BeforeValidator(_quantity_type), AfterValidator(check), WithJsonSchema(
        {"anyOf": [{"type": "string", "pattern": full(pattern)}, {"type": "integer", "minimum": 0}]})]


Quantity = _quantity(QUANTITY, "not a Kubernetes quantity; write e.g. '8', '500m', '64Gi'")
Bytes = _quantity(BYTES, "not a size in bytes; write e.g. '64Gi' or '500M' (an 'm' suffix means milli-bytes)")


def parse_quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity ('64Gi', '500m', '8') as a number."""
    m = re.fullmatch(QUANTITY, str(value))
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    return Decimal(m[1]) * SUFFIX[m[3]]


# RDMA devices: an extended resource is a qualified name with a domain, outside kubernetes.io, and none
# that rollfleet already sets (a duplicate key in `limits` would silently replace it).
_RESOURCE_NAME = rf"({DNS1123_SUBDOMAIN})/{_NAME}"
_NATIVE_RESOURCE = r"nvidia\.com/gpu|([^/]*\.)?kubernetes\.io/.*"


def _not_native(value: str) -> str:
    if re.fullmatch(_NATIVE_RESOURCE, value):
        raise ValueError("a resource rollfleet or Kubernetes already sets; name the RDMA device plugin's "
                         "resource, e.g. rdma/ib or nvidia.com/hostdev")
    return value


ExtendedResource = Annotated[
    text(_RESOURCE_NAME, "not an extended resource name; write domain/name, e.g. rdma/ib or nvidia.com/hostdev",
         extra=(LABEL_KEY_LENGTHS,)),
    AfterValidator(_not_native),
    WithJsonSchema({"type": "string", "allOf": [{"pattern": full(_RESOURCE_NAME)}, {"pattern": full(LABEL_KEY_LENGTHS)},
                                                {"not": {"pattern": full(_NATIVE_RESOURCE)}}]})]

# --- environment -----------------------------------------------------------------------------------

# Ray sets the visible devices per worker from the GPU limit; a value here breaks its GPU accounting.
VISIBLE_DEVICES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
HF_TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_API_TOKEN")
CREDENTIAL = r"(?i:.*_(TOKEN|KEY|SECRET)|.*PASSWORD.*)"


def env_name(refuse: tuple[tuple[str, str], ...], name: str = ENV_NAME,
             fix: str = "not a valid environment variable name; use letters, digits and '_'") -> Any:
    """An environment variable name matching `name`, with `refuse`: (pattern, fix) pairs checked in order."""
    compiled = [(re.compile(p), why) for p, why in refuse]

    def check(value: str) -> str:
        if not re.fullmatch(name, value):
            raise ValueError(fix)
        for pattern, why in compiled:
            if pattern.fullmatch(value):
                raise ValueError(why)
        return value

    return Annotated[StrictStr, AfterValidator(check), WithJsonSchema({"type": "string", "allOf": [
        {"pattern": full(name)}, *({"not": {"pattern": full(p)}} for p, _ in refuse)]})]


def _names(names: tuple[str, ...]) -> str:
    return "|".join(names)


_DEVICES = (_names(VISIBLE_DEVICES), "Ray sets the visible devices from the GPU limit; remove it")
_HF = (_names(HF_TOKEN_NAMES), "a Hugging Face token goes through a Secret: set model.hfTokenSecret")
_NCCL = ("NCCL_.*", "NCCL variables go in ncclEnv so both pools get the same value; move it there")
EnvName = env_name((
    _DEVICES, _HF, _NCCL,
    (CREDENTIAL, "looks like a credential; put it in a Secret and reference it from secretEnv"),
))
NcclName = env_name((), name="NCCL_[A-Za-z0-9_]*", fix="only NCCL_* variables belong here; move it to env")
SecretEnvName = env_name((_DEVICES, _HF, _NCCL))


class Model(BaseModel):
    """A values section: camelCase keys (the values format), unknown keys refused, types strict."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True,
        use_attribute_docstrings=True,
    )


class Fragment(Model):
    """A piece of a Kubernetes object the values carry as such (a toleration, an affinity term): keys left
    out stay out (None is not dumped), as Helm leaves them out, so the chart and the model agree."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: Any) -> Any:
        return {k: v for k, v in handler(self).items() if v is not None}
