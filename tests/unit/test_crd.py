"""The ShardedCheckpoint CRD: its openAPIV3Schema, descriptions, printer columns,
agreement with preshard.core, and its CEL transition rules against old/new object pairs.

The schema is applied by the API emulator's structural-schema code
(``preshard_dev.emulator.schema.StructuralSchema``), the one implementation of what the API
server does with a body: pruning, defaulting, OpenAPI validation (jsonschema) and CEL
(cel-python). What jsonschema alone cannot judge is said where it matters: unknown fields
are not *rejected* by a structural schema but *pruned* by the API server (there is no
``additionalProperties: false`` and no ``x-kubernetes-preserve-unknown-fields``).
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from preshard import GROUP, KIND, PLURAL, VERSION
from preshard.core.envpolicy import ENV_NAME_PATTERN
from preshard.core.errors import SpecError
from preshard.core.plan import DTYPES, MAX_PARALLEL, QUANTIZATIONS
from preshard.core.progress import STAGES, ProgressRecord, Result
from preshard.core.quantity import QUANTITY_PATTERN
from preshard.core.spec import (
    ENDPOINT_PATTERN,
    MAX_LIST,
    MAX_URI,
    NAME_PATTERN,
    CheckpointSpec,
    EnvVar,
    Resources,
    Toleration,
    parse_spec,
)
from preshard.core.status import (
    DELETING,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    derive_status,
    status_for_conflict,
    status_for_spec_error,
)
from preshard.core.uris import OUTPUT_URI_PATTERN, SOURCE_URI_PATTERN
from preshard_dev.emulator.errors import field_path
from preshard_dev.emulator.schema import StructuralSchema

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "shardedcheckpoints.preshard.io.yaml"
CHART_CRD_FILE = ROOT / "charts" / "preshard" / "crds" / "shardedcheckpoints.preshard.io.yaml"
RESHARD = "create a new ShardedCheckpoint to re-shard"


@cache
def crd() -> dict[str, Any]:
    return typing.cast(dict[str, Any], yaml.safe_load(CRD_FILE.read_text()))


def version() -> dict[str, Any]:
    versions = crd()["spec"]["versions"]
    assert len(versions) == 1
    return typing.cast(dict[str, Any], versions[0])


def schema() -> dict[str, Any]:
    return typing.cast(dict[str, Any], version()["schema"]["openAPIV3Schema"])


def spec_schema() -> dict[str, Any]:
    return typing.cast(dict[str, Any], schema()["properties"]["spec"])


def prop(*path: str) -> dict[str, Any]:
    node = schema()
    for p in path:
        node = node["properties"][p]
    return node


@cache
def structural() -> StructuralSchema:
    """The schema as the API server (here: the emulator) applies it to every write."""
    jsonschema.Draft202012Validator.check_schema(schema())
    return StructuralSchema(schema())


def walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with a readable path (properties, items, additionalProperties, anyOf)."""
    yield path or "<root>", node
    for name, sub in (node.get("properties") or {}).items():
        yield from walk_schema(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}{{*}}")
    for i, sub in enumerate(node.get("anyOf") or []):
        yield from walk_schema(sub, f"{path}<anyOf{i}>")


MINIMAL: dict[str, Any] = {
    "source": {"uri": "s3://models/llama/"},
    "tensorParallelSize": 2,
    "output": {"uri": "s3://checkpoints/llama/tp2/"},
}
FULL: dict[str, Any] = {
    "source": {
        "uri": "s3://models/llama-70b/",
        "credentialsSecret": "src-creds",
        "endpoint": "https://s3.src.example.com",
        "region": "eu-west-1",
    },
    "tensorParallelSize": 8,
    "pipelineParallelSize": 2,
    "quantization": "fp8",
    "dtype": "bfloat16",
    "output": {
        "uri": "s3://checkpoints/llama-70b/tp8-pp2-fp8/",
        "credentialsSecret": "s3-credentials",
        "endpoint": "http://minio.storage:9000",
        "region": "us-east-1",
        "maxFileSize": "2Gi",
    },
    "verify": False,
    "deletionPolicy": "Delete",
    "converter": {
        "image": "registry.example.com/preshard-converter:1",
        "imagePullPolicy": "Always",
        "resources": {
            "requests": {"cpu": 16, "memory": "400Gi"},
            "limits": {"memory": "500Gi"},
        },
        "gpuResourceName": "nvidia.com/gpu",
        "nodeSelector": {"gpu.example.com/class": "h100"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "x", "operator": "Equal", "value": "y", "effect": "", "tolerationSeconds": 5},
        ],
        "backoffLimit": 0,
        "activeDeadlineSeconds": 604800,
        "ttlSecondsAfterFinished": 0,
        "serviceAccountName": "sharder",
        "priorityClassName": "gpu-batch",
        "workDirSize": "1Ti",
        "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}, {"name": "VLLM_EMPTY"}],
    },
}
HF: dict[str, Any] = {
    "source": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct@main", "credentialsSecret": "hf"},
    "tensorParallelSize": 1,
    "output": {"uri": "s3://models/llama-8b/tp1", "maxFileSize": 1048576},
}
PVC: dict[str, Any] = {
    "source": {"uri": "pvc://model-store/llama"},
    "tensorParallelSize": 4,
    "quantization": "awq",
    "output": {"uri": "s3://models/llama/tp4-awq/", "maxFileSize": 5368709120},
}
VALID_SPECS = {"minimal": MINIMAL, "full": FULL, "hf": HF, "pvc": PVC}


def resource(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "llama", "namespace": "ml"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def changed(spec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy with dotted-path changes; the value DROP removes the key."""
    out = copy.deepcopy(spec)
    for path, value in changes.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


DROP = object()


def errors(obj: dict[str, Any]) -> list[jsonschema.ValidationError]:
    return list(structural().validator.iter_errors(obj))


# ------------------------------------------------------------------------- identity


def test_names_and_scope() -> None:
    doc = crd()
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert doc["spec"]["group"] == GROUP
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"] == {
        "kind": KIND,
        "listKind": f"{KIND}List",
        "plural": PLURAL,
        "singular": "shardedcheckpoint",
        "shortNames": ["sckpt"],
        "categories": ["preshard"],
    }
    v = version()
    assert (v["name"], v["served"], v["storage"]) == (VERSION, True, True)
    assert v["subresources"] == {"status": {}}


def test_chart_copy_is_byte_identical() -> None:
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), "run 'make crd-sync'"


# ------------------------------------------------------------------- printer columns


def test_printer_columns() -> None:
    cols = version()["additionalPrinterColumns"]
    default = [(c["name"], c["type"], c["jsonPath"]) for c in cols if c.get("priority", 0) == 0]
    assert default == [
        ("Phase", "string", ".status.phase"),
        ("TP", "integer", ".spec.tensorParallelSize"),
        ("Quantization", "string", ".spec.quantization"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("Output", "string", ".spec.output.uri"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    wide = [(c["name"], c["priority"], c["jsonPath"]) for c in cols if c.get("priority", 0) != 0]
    assert wide == [
        ("PP", 1, ".spec.pipelineParallelSize"),
        ("Stage", 1, ".status.progress.stage"),
        ("Rate", 1, ".status.progress.rate"),
        ("ETA", 1, ".status.progress.eta"),
        ("Job", 1, ".status.jobName"),
        ("Reason", 1, '.status.conditions[?(@.type=="Ready")].reason'),
        ("Path", 1, ".status.path"),
        ("Took", 1, ".status.durationSeconds"),
        ("Engine", 1, ".status.artifact.engine"),
    ]
    for c in cols:
        if c["name"] != "Age":  # Age is the conventional, self-explanatory column
            assert c.get("description", "").strip(), c


def test_printer_column_paths_exist_in_the_schema() -> None:
    for c in version()["additionalPrinterColumns"]:
        path = c["jsonPath"]
        if path.startswith(".metadata."):
            continue
        parts = re.sub(r"\[\?\(.*\)\]", "", path).strip(".").split(".")
        node = schema()
        for p in parts:
            if node.get("type") == "array":
                node = node["items"]
            node = node["properties"][p]
        assert node["type"] == c["type"], path


# --------------------------------------------------------------- structural schema


def test_every_property_has_a_description() -> None:
    missing = []
    for path, node in walk_schema(schema()):
        for name, sub in (node.get("properties") or {}).items():
            if not str(sub.get("description", "")).strip():
                missing.append(f"{path}.{name}")
        if isinstance(node.get("items"), dict) and node["items"].get("type") == "object":
            if not str(node["items"].get("description", "")).strip():
                missing.append(f"{path}[]")
    assert missing == []


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string); nothing preserves unknown fields, so the
    API server prunes them; no additionalProperties: false (pruning, not rejection)."""
    for path, node in walk_schema(schema()):
        if "<anyOf" in path:
            continue
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        assert node.get("additionalProperties") is not False, path
        if node.get("x-kubernetes-int-or-string"):
            assert [s["type"] for s in node["anyOf"]] == ["integer", "string"], path
            assert "type" not in node, path
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "boolean"}, path
        if node.get("type") == "array":
            assert "items" in node, path
    assert schema()["required"] == ["spec"]
    assert spec_schema()["required"] == ["source", "tensorParallelSize", "output"]


def test_list_map_keys_for_conditions() -> None:
    conds = prop("status", "conditions")
    assert conds["x-kubernetes-list-type"] == "map"
    assert conds["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conds["items"]["required"]) >= {"type", "status"}


# -------------------------------------------------------- agreement with preshard.core


def test_quantization_enum_equals_core() -> None:
    assert prop("spec", "quantization")["enum"] == list(QUANTIZATIONS)


def test_dtype_enum_and_default_equal_core() -> None:
    assert prop("spec", "dtype")["enum"] == list(DTYPES)
    assert prop("spec", "dtype")["default"] == CheckpointSpec.model_fields["dtype"].default


def test_uri_patterns_equal_core() -> None:
    assert prop("spec", "source", "uri")["pattern"] == SOURCE_URI_PATTERN
    assert prop("spec", "output", "uri")["pattern"] == OUTPUT_URI_PATTERN


def test_name_endpoint_and_env_patterns_equal_core() -> None:
    for path in (
        ("spec", "source", "credentialsSecret"),
        ("spec", "output", "credentialsSecret"),
        ("spec", "converter", "serviceAccountName"),
    ):
        assert prop(*path)["pattern"] == NAME_PATTERN, path
        assert prop(*path)["maxLength"] == 253, path
    for side in ("source", "output"):
        assert prop("spec", side, "endpoint")["pattern"] == ENDPOINT_PATTERN
        assert prop("spec", side, "endpoint")["maxLength"] == MAX_URI
        assert prop("spec", side, "uri")["maxLength"] == MAX_URI
    env = prop("spec", "converter", "env")
    assert env["items"]["properties"]["name"]["pattern"] == ENV_NAME_PATTERN
    assert env["maxItems"] == prop("spec", "converter", "tolerations")["maxItems"] == MAX_LIST


def test_converter_item_types_equal_the_schema() -> None:
    conv = prop("spec", "converter")["properties"]
    tol = conv["tolerations"]["items"]["properties"]
    assert set(tol) == set(Toleration.__annotations__)
    hints = typing.get_type_hints(Toleration)
    for name in ("operator", "effect"):
        assert tol[name]["enum"] == list(typing.get_args(hints[name])), name
    assert set(conv["env"]["items"]["properties"]) == set(EnvVar.__annotations__)
    assert conv["env"]["items"]["required"] == ["name"]
    assert set(conv["resources"]["properties"]) == set(Resources.__annotations__)


def test_quantity_patterns_equal_core() -> None:
    assert prop("spec", "output", "maxFileSize")["pattern"] == QUANTITY_PATTERN
    assert prop("spec", "converter", "workDirSize")["pattern"] == QUANTITY_PATTERN
    assert prop("spec", "output", "maxFileSize")["minimum"] == 2**20


def test_enums_and_bounds_equal_core() -> None:
    spec = parse_spec(MINIMAL)
    conv = spec.converter
    assert prop("spec", "deletionPolicy")["enum"] == list(
        typing.get_args(CheckpointSpec.model_fields["deletion_policy"].annotation)
    )
    assert prop("spec", "deletionPolicy")["default"] == spec.deletion_policy
    assert prop("spec", "verify")["default"] is spec.verify
    assert prop("spec", "pipelineParallelSize")["default"] == spec.pipeline_parallel_size
    for name in ("tensorParallelSize", "pipelineParallelSize"):
        assert (prop("spec", name)["minimum"], prop("spec", name)["maximum"]) == (1, MAX_PARALLEL)
    backoff = prop("spec", "converter", "backoffLimit")
    assert (backoff["minimum"], backoff["maximum"], backoff["default"]) == (
        0,
        20,
        conv.backoff_limit,
    )
    deadline = prop("spec", "converter", "activeDeadlineSeconds")
    assert (deadline["minimum"], deadline["maximum"], deadline["default"]) == (
        60,
        7 * 24 * 3600,
        conv.active_deadline_seconds,
    )
    assert prop("spec", "converter", "imagePullPolicy")["enum"] == [
        "Always",
        "IfNotPresent",
        "Never",
    ]
    assert prop("status", "progress", "stage")["enum"] == list(STAGES)
    assert prop("status", "phase")["enum"] == [PENDING, RUNNING, SUCCEEDED, FAILED, DELETING]


def test_spec_fields_equal_the_model_fields() -> None:
    def aliases(model: type[Any]) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    assert set(prop("spec")["properties"]) == aliases(CheckpointSpec)
    for name, field in CheckpointSpec.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            assert set(prop("spec", field.alias or name)["properties"]) == aliases(sub), name


# ------------------------------------------------------------ validation: samples


@pytest.mark.parametrize("name", sorted(VALID_SPECS))
def test_valid_samples(name: str) -> None:
    assert [e.message for e in errors(resource(VALID_SPECS[name]))] == []
    parse_spec(VALID_SPECS[name])  # and the operator agrees


T0 = "2025-01-01T00:00:00Z"
ARTIFACT = {
    "uri": "s3://checkpoints/llama/tp2/",
    "manifestUri": "s3://checkpoints/llama/tp2/preshard-manifest.json",
    "files": 4,
    "totalBytes": 1000,
    "manifestSha256": "a" * 64,
    "vllmVersion": "0.32.0",
}


def operator_statuses() -> dict[str, dict[str, Any]]:
    job = {"status": {"startTime": T0, "active": 1}}
    done = {"status": {"startTime": T0, "conditions": [{"type": "Complete", "status": "True"}]}}
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "X"}]}}
    serving = {
        "loadFormat": "runai_streamer_sharded",
        "args": ["--model", ARTIFACT["uri"]],
        "env": [{"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"}],
        "configMapName": "llama-serving",
    }
    common: dict[str, Any] = {"generation": 1, "job_name": "llama-x", "now": T0}
    return {
        "running": derive_status(
            None, job=job, result=None, progress=ProgressRecord("Uploading", 1, 2, 3.0), **common
        ),
        "succeeded": derive_status(
            None,
            job=done,
            result=Result("Succeeded", artifact=ARTIFACT),
            progress=None,
            serving=serving,
            **common,
        ),
        "failed": derive_status(
            None,
            job=failed,
            result=Result("Failed", "SourceNotFound", "m"),
            progress=None,
            **common,
        ),
        "pending": derive_status(None, job=None, result=None, progress=None, **common),
        "spec-error": status_for_spec_error(None, "InvalidSpec", "bad", 1, T0),
        "conflict": status_for_conflict(None, "output s3://x/y/ overlaps another", 1, T0),
    }


@pytest.mark.parametrize("name", sorted(operator_statuses()))
def test_statuses_the_operator_writes_are_valid(name: str) -> None:
    obj = resource(MINIMAL, operator_statuses()[name])
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors(obj)] == []


INVALID: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "missing spec": ({}, []),
    "missing source": (changed(MINIMAL, source=DROP), ["spec"]),
    "missing tensorParallelSize": (changed(MINIMAL, tensorParallelSize=DROP), ["spec"]),
    "missing output": (changed(MINIMAL, output=DROP), ["spec"]),
    "missing source.uri": (changed(MINIMAL, **{"source.uri": DROP}), ["spec", "source"]),
    "missing output.uri": (changed(MINIMAL, **{"output.uri": DROP}), ["spec", "output"]),
    "source scheme": (
        changed(MINIMAL, **{"source.uri": "gs://models/x"}),
        ["spec", "source", "uri"],
    ),
    "source bucket": (
        changed(MINIMAL, **{"source.uri": "s3://Models/x"}),
        ["spec", "source", "uri"],
    ),
    "source hf": (changed(MINIMAL, **{"source.uri": "hf://org"}), ["spec", "source", "uri"]),
    "source pvc": (changed(MINIMAL, **{"source.uri": "pvc://Claim/x"}), ["spec", "source", "uri"]),
    "source too long": (
        changed(MINIMAL, **{"source.uri": "s3://models/" + "x" * 1020}),
        ["spec", "source", "uri"],
    ),
    "output bucket root": (
        changed(MINIMAL, **{"output.uri": "s3://checkpoints/"}),
        ["spec", "output", "uri"],
    ),
    "output bucket only": (
        changed(MINIMAL, **{"output.uri": "s3://checkpoints"}),
        ["spec", "output", "uri"],
    ),
    "output pvc": (changed(MINIMAL, **{"output.uri": "pvc://claim/x"}), ["spec", "output", "uri"]),
    "tp 0": (changed(MINIMAL, tensorParallelSize=0), ["spec", "tensorParallelSize"]),
    "tp 1025": (changed(MINIMAL, tensorParallelSize=1025), ["spec", "tensorParallelSize"]),
    "tp string": (changed(MINIMAL, tensorParallelSize="2"), ["spec", "tensorParallelSize"]),
    "tp boolean": (changed(MINIMAL, tensorParallelSize=True), ["spec", "tensorParallelSize"]),
    "tp fraction": (changed(MINIMAL, tensorParallelSize=2.5), ["spec", "tensorParallelSize"]),
    "pp 0": (changed(MINIMAL, pipelineParallelSize=0), ["spec", "pipelineParallelSize"]),
    "quantization": (changed(MINIMAL, quantization="int4"), ["spec", "quantization"]),
    "dtype": (changed(MINIMAL, dtype="fp16"), ["spec", "dtype"]),
    "maxFileSize small int": (
        changed(MINIMAL, **{"output.maxFileSize": 1048575}),
        ["spec", "output", "maxFileSize"],
    ),
    "maxFileSize unit": (
        changed(MINIMAL, **{"output.maxFileSize": "5GB"}),
        ["spec", "output", "maxFileSize"],
    ),
    "maxFileSize bool": (
        changed(MINIMAL, **{"output.maxFileSize": True}),
        ["spec", "output", "maxFileSize"],
    ),
    "verify string": (changed(MINIMAL, verify="yes"), ["spec", "verify"]),
    "deletionPolicy": (changed(MINIMAL, deletionPolicy="Keep"), ["spec", "deletionPolicy"]),
    "source secret name": (
        changed(MINIMAL, **{"source.credentialsSecret": "Bad_Secret"}),
        ["spec", "source", "credentialsSecret"],
    ),
    "output secret name": (
        changed(MINIMAL, **{"output.credentialsSecret": "Bad_Secret"}),
        ["spec", "output", "credentialsSecret"],
    ),
    "source endpoint": (
        changed(MINIMAL, **{"source.endpoint": "minio:9000"}),
        ["spec", "source", "endpoint"],
    ),
    "output endpoint": (
        changed(MINIMAL, **{"output.endpoint": "ftp://minio"}),
        ["spec", "output", "endpoint"],
    ),
    "region too long": (
        changed(MINIMAL, **{"output.region": "r" * 65}),
        ["spec", "output", "region"],
    ),
    "imagePullPolicy": (
        changed(MINIMAL, **{"converter.imagePullPolicy": "Sometimes"}),
        ["spec", "converter", "imagePullPolicy"],
    ),
    "backoffLimit": (
        changed(MINIMAL, **{"converter.backoffLimit": 21}),
        ["spec", "converter", "backoffLimit"],
    ),
    "activeDeadlineSeconds": (
        changed(MINIMAL, **{"converter.activeDeadlineSeconds": 59}),
        ["spec", "converter", "activeDeadlineSeconds"],
    ),
    "ttl negative": (
        changed(MINIMAL, **{"converter.ttlSecondsAfterFinished": -1}),
        ["spec", "converter", "ttlSecondsAfterFinished"],
    ),
    "serviceAccountName": (
        changed(MINIMAL, **{"converter.serviceAccountName": "Bad_SA"}),
        ["spec", "converter", "serviceAccountName"],
    ),
    "workDirSize": (
        changed(MINIMAL, **{"converter.workDirSize": "lots"}),
        ["spec", "converter", "workDirSize"],
    ),
    "nodeSelector value": (
        changed(MINIMAL, **{"converter.nodeSelector": {"gpu": 1}}),
        ["spec", "converter", "nodeSelector", "gpu"],
    ),
    "toleration operator": (
        changed(MINIMAL, **{"converter.tolerations": [{"key": "k", "operator": "Maybe"}]}),
        ["spec", "converter", "tolerations", 0, "operator"],
    ),
    "toleration effect": (
        changed(MINIMAL, **{"converter.tolerations": [{"key": "k", "effect": "Never"}]}),
        ["spec", "converter", "tolerations", 0, "effect"],
    ),
    "toleration not an object": (
        changed(MINIMAL, **{"converter.tolerations": ["gpu"]}),
        ["spec", "converter", "tolerations", 0],
    ),
    "too many tolerations": (
        changed(MINIMAL, **{"converter.tolerations": [{"key": "k"}] * 65}),
        ["spec", "converter", "tolerations"],
    ),
    "env without name": (
        changed(MINIMAL, **{"converter.env": [{"value": "x"}]}),
        ["spec", "converter", "env", 0],
    ),
    "env bad name": (
        changed(MINIMAL, **{"converter.env": [{"name": "1X", "value": "x"}]}),
        ["spec", "converter", "env", 0, "name"],
    ),
    "env value not a string": (
        changed(MINIMAL, **{"converter.env": [{"name": "VLLM_X", "value": 1}]}),
        ["spec", "converter", "env", 0, "value"],
    ),
    "resources not a quantity": (
        changed(MINIMAL, **{"converter.resources": {"requests": {"cpu": [1]}}}),
        ["spec", "converter", "resources", "requests", "cpu"],
    ),
    "bad status phase": (MINIMAL, ["status", "phase"]),
    "bad condition status": (MINIMAL, ["status", "conditions", 0, "status"]),
    "negative progress": (MINIMAL, ["status", "progress", "bytesDone"]),
}
BAD_STATUS: dict[str, dict[str, Any]] = {
    "bad status phase": {"phase": "Done"},
    "bad condition status": {"conditions": [{"type": "Ready", "status": "Yes"}]},
    "negative progress": {"progress": {"stage": "Uploading", "bytesDone": -1}},
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_samples_are_rejected_at_the_field(name: str) -> None:
    spec, path = INVALID[name]
    obj = resource(spec, BAD_STATUS.get(name))
    if name == "missing spec":
        obj.pop("spec")
    found = [list(e.absolute_path) for e in errors(obj)]
    assert found, f"{name}: accepted"
    assert path in found, found


def test_max_file_size_string_minimum_is_enforced_by_the_operator_only() -> None:
    # 'minimum' applies to the integer form only: "1Ki" passes the schema, and the operator
    # reports it as InvalidSpec.
    spec = changed(MINIMAL, **{"output.maxFileSize": "1Ki"})
    assert errors(resource(spec)) == []
    with pytest.raises(
        SpecError, match=r"^spec.output.maxFileSize: maxFileSize must be at least 1Mi$"
    ):
        parse_spec(spec)


# parse_spec re-validates every sample the schema rejects (the schema may be missing or
# another version).
SPEC_CASES = sorted(n for n in INVALID if n not in BAD_STATUS and n != "missing spec")


@pytest.mark.parametrize("name", SPEC_CASES)
def test_the_operator_rejects_what_the_schema_rejects(name: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(INVALID[name][0])


# ------------------------------------------------------------- unknown fields


def test_unknown_fields_are_pruned_not_rejected() -> None:
    spec = changed(
        FULL,
        bogus=1,
        **{
            "source.typo": "x",
            "output.maxFileSizee": "1Gi",
            "converter.resources.claims": [{"name": "gpu"}],
            "converter.tolerations": [{"key": "k", "operator": "Exists", "extra": True}],
            "converter.env": [
                {"name": "VLLM_X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
            ],
        },
    )
    # jsonschema (like the API server's validation) does not reject unknown fields...
    assert errors(resource(spec)) == []
    # ...the API server prunes them before storing the object,
    obj = resource(copy.deepcopy(spec))
    unknown = structural().prune(obj)
    pruned = obj["spec"]
    assert sorted(unknown) == [
        ".spec.bogus",
        ".spec.converter.env[0].valueFrom",
        ".spec.converter.resources.claims",
        ".spec.converter.tolerations[0].extra",
        ".spec.output.maxFileSizee",
        ".spec.source.typo",
    ]
    assert "bogus" not in pruned
    assert "typo" not in pruned["source"]
    assert "maxFileSizee" not in pruned["output"]
    assert "claims" not in pruned["converter"]["resources"]
    assert pruned["converter"]["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert pruned["converter"]["env"] == [{"name": "VLLM_X"}]
    assert pruned == changed(
        FULL,
        **{
            "converter.tolerations": [{"key": "k", "operator": "Exists"}],
            "converter.env": [{"name": "VLLM_X"}],
        },
    )
    parse_spec(pruned)
    # ...and the operator, which must not trust that the schema is installed, rejects them.
    with pytest.raises(SpecError, match=r"spec.bogus: unknown field"):
        parse_spec(spec)


def test_the_api_server_fills_in_the_defaults_the_operator_assumes() -> None:
    # defaulting runs before validation and CEL; what it fills in is what parse_spec
    # assumes for an absent field (so a defaulted object means the same conversion)
    spec = parse_spec(MINIMAL)
    defaulted = structural().default(resource(copy.deepcopy(MINIMAL)))["spec"]
    assert defaulted == {
        **MINIMAL,
        "pipelineParallelSize": spec.pipeline_parallel_size,
        "dtype": spec.dtype,
        "verify": spec.verify,
        "deletionPolicy": spec.deletion_policy,
    }
    assert parse_spec(defaulted) == spec
    # nested objects get theirs once present; set fields are kept
    conv = structural().default(resource(changed(MINIMAL, converter={"backoffLimit": 0})))
    assert conv["spec"]["converter"] == {
        "backoffLimit": 0,
        "activeDeadlineSeconds": spec.converter.active_deadline_seconds,
    }


# --------------------------------------------------------------------------- CEL


def cel_rules() -> list[tuple[str, dict[str, Any]]]:
    """(path, rule) for every x-kubernetes-validations rule in the schema."""
    return [("." + field_path(path), rule) for path, rule in structural().rules]


def cel_programs() -> list[tuple[str, str, Any]]:
    return [
        (path, rule["message"], structural().program(rule["rule"])) for path, rule in cel_rules()
    ]


def failing_rules(old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[str]:
    """Messages of the rules that reject this update (false or an evaluation error), after
    the API server's defaulting (it runs before validation and CEL)."""
    for path, _ in cel_rules():
        assert path in (".spec", ENV_RULE_PATH), (
            path
        )  # every rule sits on spec or env (see test_cel_rules_are_where_expected)
    old = structural().default(resource(copy.deepcopy(old_spec)))
    new = structural().default(resource(copy.deepcopy(new_spec)))
    return [rule["message"] for _, rule, _, _ in structural().failed_rules(new, old)]


IMMUTABLE_FIELDS = [
    "source.uri",
    "tensorParallelSize",
    "pipelineParallelSize",
    "quantization",
    "dtype",
    "output.uri",
    "output.maxFileSize",
]


def immutable_message(field: str) -> str:
    return f"spec.{field} is immutable: {RESHARD}"


ENV_RULE_PATH = ".spec.converter.env"


def test_cel_rules_are_where_expected() -> None:
    """The immutability (transition) rules on spec, and the env denylist
    (docs/security.md, "Environment") on spec.converter.env, the same rule core.spec
    applies."""
    from preshard.core.envpolicy import ENV_DENY_MESSAGE, ENV_DENY_RULE

    [env_rule] = [r for path, r in cel_rules() if path == ENV_RULE_PATH]
    assert env_rule == {"rule": ENV_DENY_RULE, "message": ENV_DENY_MESSAGE}
    rules = [(path, r) for path, r in cel_rules() if path != ENV_RULE_PATH]
    assert rules
    assert {path for path, _ in rules} == {".spec"}
    assert [r["message"] for _, r in rules] == [immutable_message(f) for f in IMMUTABLE_FIELDS]
    for _, rule in rules:
        assert "oldSelf" in rule["rule"]  # transition rules: checked on update only
        assert RESHARD in rule["message"]
        assert "&" not in rule["rule"].replace("&&", "")  # no bitwise operator in CEL


def test_immutable_fields_are_the_conversion_fields() -> None:
    def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert set(IMMUTABLE_FIELDS) == leaves(parse_spec(MINIMAL).conversion_fields())
    description = prop("spec")["description"]
    for field in IMMUTABLE_FIELDS:
        assert field in description


def test_every_rule_compiles() -> None:
    assert len(cel_programs()) == len(IMMUTABLE_FIELDS) + 1  # and the env rule


@pytest.mark.parametrize("name", sorted(VALID_SPECS))
def test_an_unchanged_update_passes(name: str) -> None:
    spec = VALID_SPECS[name]
    assert failing_rules(spec, copy.deepcopy(spec)) == []


@pytest.mark.parametrize(
    ("base", "change", "field"),
    [
        (MINIMAL, {"source.uri": "s3://models/llama-2/"}, "source.uri"),
        (HF, {"source.uri": "hf://meta-llama/Llama-3.1-8B-Instruct@v2"}, "source.uri"),
        (MINIMAL, {"tensorParallelSize": 4}, "tensorParallelSize"),
        (FULL, {"tensorParallelSize": 4}, "tensorParallelSize"),
        (MINIMAL, {"pipelineParallelSize": 2}, "pipelineParallelSize"),
        (FULL, {"pipelineParallelSize": DROP}, "pipelineParallelSize"),
        (MINIMAL, {"quantization": "fp8"}, "quantization"),
        (FULL, {"quantization": DROP}, "quantization"),
        (FULL, {"quantization": "fp8_per_tensor"}, "quantization"),
        (MINIMAL, {"dtype": "float16"}, "dtype"),
        (FULL, {"dtype": "auto"}, "dtype"),
        (FULL, {"dtype": DROP}, "dtype"),
        (MINIMAL, {"output.uri": "s3://checkpoints/llama/tp2-b/"}, "output.uri"),
        (MINIMAL, {"output.uri": "s3://checkpoints/llama/tp2"}, "output.uri"),
        (FULL, {"output.maxFileSize": "3Gi"}, "output.maxFileSize"),
        (FULL, {"output.maxFileSize": DROP}, "output.maxFileSize"),
        (MINIMAL, {"output.maxFileSize": "5Gi"}, "output.maxFileSize"),
        # int -> string: cel-python raises "no such overload", cel-go (heterogeneous
        # equality) evaluates to false; either way the update is rejected.
        (PVC, {"output.maxFileSize": "5Gi"}, "output.maxFileSize"),
    ],
)
def test_changing_a_conversion_field_is_rejected(
    base: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    assert failing_rules(base, changed(base, **change)) == [immutable_message(field)]


def test_changing_everything_reports_every_field() -> None:
    new = changed(
        FULL,
        **{
            "source.uri": "pvc://other/x",
            "tensorParallelSize": 1,
            "pipelineParallelSize": 1,
            "quantization": "awq",
            "dtype": "float32",
            "output.uri": "s3://other/x/",
            "output.maxFileSize": "1Gi",
        },
    )
    assert failing_rules(FULL, new) == [immutable_message(f) for f in IMMUTABLE_FIELDS]


@pytest.mark.parametrize(
    ("base", "change"),
    [
        (MINIMAL, {"verify": False}),
        (FULL, {"verify": True}),
        (MINIMAL, {"deletionPolicy": "Delete"}),
        (FULL, {"deletionPolicy": "Retain"}),
        (MINIMAL, {"source.credentialsSecret": "other"}),
        (FULL, {"source.credentialsSecret": DROP}),
        (FULL, {"source.endpoint": "http://new:9000", "source.region": "us-east-2"}),
        (MINIMAL, {"output.credentialsSecret": "s3-rotated"}),
        (FULL, {"output.endpoint": DROP, "output.region": DROP}),
        (MINIMAL, {"converter": {"image": "img:2", "backoffLimit": 5}}),
        (FULL, {"converter": DROP}),
        (FULL, {"converter.nodeSelector": {"gpu": "a100"}, "converter.tolerations": []}),
        (FULL, {"converter.resources.requests.memory": "800Gi"}),
        # Equivalent spellings: defaulting makes them equal.
        (MINIMAL, {"pipelineParallelSize": 1}),
        (MINIMAL, {"dtype": "auto"}),
        (FULL, {"quantization": "fp8"}),
    ],
)
def test_changing_a_mutable_field_passes(base: dict[str, Any], change: dict[str, Any]) -> None:
    new = changed(base, **change)
    assert errors(resource(new)) == []
    assert failing_rules(base, new) == []


def test_cel_rules_and_conversion_hash_agree() -> None:
    """Every update the rules accept keeps the conversion hash (so the Job name) unchanged."""
    for base in VALID_SPECS.values():
        for change in (
            {"verify": False},
            {"deletionPolicy": "Delete"},
            {"converter": {"image": "x:1"}},
            {"output.credentialsSecret": "x"},
        ):
            new = changed(base, **change)
            assert failing_rules(base, new) == []
            assert parse_spec(new).conversion_hash() == parse_spec(base).conversion_hash()


# ---------------------------------------------------------------- env that loads code

REFUSED_ENV = [
    "VLLM_LOGGING_CONFIG_PATH",  # logging.config.dictConfig can run code
    "VLLM_LOGGING_STREAM",  # ext://module.attr: an import
    "VLLM_PLUGINS",
    "VLLM_NCCL_SO_PATH",
    "VLLM_CUDART_SO_PATH",
    "VLLM_RPC_BASE_PATH",
    "VLLM_CONFIG_ROOT",
    "VLLM_USE_MODELSCOPE",
    "VLLM_TEST_FORCE_LOAD_FORMAT",
    "VLLM_ALLOW_INSECURE_SERIALIZATION",
    "VLLM_HUMMING_INPUT_QUANT_CONFIG",
    "VLLM_USAGE_STATS_SERVER",
    "VLLM_HOST_IP",
    "NCCL_NET_PLUGIN",
    "NCCL_TUNER_PLUGIN",
    "NCCL_PROFILER_PLUGIN",
    "NCCL_ENV_PLUGIN",
    "NCCL_CONF_FILE",
    "NCCL_DEBUG_FILE",
    "NCCL_COMM_ID",
    "TORCHINDUCTOR_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE",
    "TORCHINDUCTOR_REDIS_HOST",
    "TORCH_EXTENSIONS_DIR",
    "TORCH_HOME",
    "TORCH_HUB",
    "TORCH_COMPILE_DEBUG_DIR",
    "TORCH_CUSTOM_PYTHONPATH",
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
    "TORCH_LOGS_OUT",
    "PYTORCH_KERNEL_CACHE_PATH",
    "PYTORCH_NVCC",
    "CUDA_CACHE_PATH",
    "CUDA_HOME",
    "CUDA_INJECTION64_PATH",
    "OMP_TOOL_LIBRARIES",
    "KMP_DUPLICATE_LIB_OK",
]
ALLOWED_ENV = [
    "VLLM_LOGGING_LEVEL",
    "VLLM_CONFIGURE_LOGGING",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_KV_CACHE_LAYOUT",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "OMP_NUM_THREADS",
    "TORCH_CUDA_ARCH_LIST",
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUDA_LAUNCH_BLOCKING",
    "CUDA_MODULE_LOADING",
    "HF_HUB_OFFLINE",
]


@pytest.mark.parametrize("name", REFUSED_ENV)
def test_env_that_loads_code_is_refused_at_apply_time(name: str) -> None:
    from preshard.core.envpolicy import ENV_DENY_MESSAGE

    spec = changed(
        MINIMAL,
        **{
            "converter.env": [
                {"name": "OMP_NUM_THREADS", "value": "1"},
                {"name": name, "value": "/x"},
            ]
        },
    )
    assert errors(resource(spec)) == []  # the pattern (families) lets it through ...
    new = structural().default(resource(copy.deepcopy(spec)))
    failed = [rule["message"] for _, rule, _, _ in structural().failed_rules(new, None)]
    assert failed == [ENV_DENY_MESSAGE]  # ... the CEL rule refuses it on create
    with pytest.raises(SpecError, match=f"{name} may not be set"):  # and so does core (InvalidSpec)
        parse_spec(spec)


@pytest.mark.parametrize("name", ALLOWED_ENV)
def test_tuning_env_passes_the_rule(name: str) -> None:
    spec = changed(MINIMAL, **{"converter.env": [{"name": name, "value": "1"}]})
    new = structural().default(resource(copy.deepcopy(spec)))
    assert errors(resource(spec)) == []
    assert structural().failed_rules(new, None) == []
    assert parse_spec(spec).converter.env == [{"name": name, "value": "1"}]


def test_every_exact_allowed_name_passes_the_denylist() -> None:
    from preshard.core.envpolicy import ALLOWED_ENV_NAMES, env_refusal

    assert [n for n in ALLOWED_ENV_NAMES if env_refusal(n)] == []
