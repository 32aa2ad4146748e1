"""The operator's pod policy (preshard.core.policy) and its configuration
(OperatorConfig.from_env): what a ShardedCheckpoint may ask of its conversion pod."""

from __future__ import annotations

import json
from typing import Any

import pytest

from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.purge import build_purge_job
from preshard.core.config import OperatorConfig
from preshard.core.images import image_allowed, parse_image
from preshard.core.policy import check_policy, policy_message, toleration_covered
from preshard.core.spec import parse_spec

IMAGE = "registry.example.com/ml/preshard-converter:1.2.3"
CONFIG = OperatorConfig(converter_image=IMAGE)


def spec(**converter: Any) -> Any:
    return parse_spec(
        {
            "source": {"uri": "s3://models/llama/"},
            "tensorParallelSize": 2,
            "output": {"uri": "s3://out/llama/", "credentialsSecret": "s3"},
            "converter": converter,
        }
    )


def fields(ns: str, s: Any, config: OperatorConfig = CONFIG) -> list[str]:
    return [v.field for v in check_policy(ns, s, config)]


# ------------------------------------------------------------------------------ images


def test_by_default_only_the_operators_own_converter_repository() -> None:
    assert fields("ml", spec()) == []
    assert fields("ml", spec(image=IMAGE)) == []
    assert fields("ml", spec(image="registry.example.com/ml/preshard-converter:9.9")) == []
    assert (
        fields("ml", spec(image="registry.example.com/ml/preshard-converter@sha256:" + "a" * 64))
        == []
    )
    for smuggled in (
        "attacker.io/miner:latest",
        "registry.example.com/ml/preshard-converter-evil:1",
        "registry.example.com/ml/preshard-converter/../evil:1",
        "registry.example.com/ml/other:1",
        "registry.example.com.attacker.io/ml/preshard-converter:1",
        "Registry.example.com/ml/PRESHARD-converter:1",
    ):
        assert fields("ml", spec(image=smuggled)) == ["spec.converter.image"], smuggled


@pytest.mark.parametrize(
    ("image", "entry", "ok"),
    [
        ("registry.example.com/ml/x:1", "registry.example.com/ml/", True),
        ("registry.example.com/mlx/x:1", "registry.example.com/ml/", False),
        ("registry.example.com/ml/team/x:1", "registry.example.com/ml/", True),
        ("registry.example.com/ml", "registry.example.com/ml/", False),
        ("vllm/vllm-openai:v0.32.0", "docker.io/vllm/vllm-openai:v0.32.0", True),
        ("docker.io/vllm/vllm-openai:v0.32.0", "vllm/vllm-openai", True),
        ("vllm/vllm-openai:latest", "vllm/vllm-openai:v0.32.0", False),
        ("vllm/vllm-openai", "vllm/vllm-openai:latest", True),  # no tag is :latest
        ("python:3.11", "library/", True),  # Docker Hub's official images
        ("python:3.11", "docker.io/library/python", True),
        ("localhost:5000/x:1", "localhost:5000/", True),
        ("r.io/x@sha256:" + "b" * 64, "r.io/x@sha256:" + "b" * 64, True),
        ("r.io/x:1@sha256:" + "b" * 64, "r.io/x:1", False),  # a digest is not the tag
        ("r.io/x@sha256:" + "c" * 64, "r.io/x@sha256:" + "b" * 64, False),
        ("anything.io/at/all:1", "*", True),
        ("not an image", "*", False),
        ("r.io/x:1", "r.io/x:1,r.io/y:1", False),
    ],
)
def test_image_allowlist_entries(image: str, entry: str, ok: bool) -> None:
    assert image_allowed(image, [entry]) is ok


def test_parse_image_normalises_docker_hub() -> None:
    assert parse_image("python") == ("docker.io/library/python", "latest", None)
    assert parse_image("a/b:1") == ("docker.io/a/b", "1", None)
    assert parse_image("R.io/a/b:1") == ("r.io/a/b", "1", None)
    assert parse_image("a b") is None and parse_image("") is None


# --------------------------------------------------------------- accounts and priority


def test_service_account_must_be_the_namespaces_own_or_listed() -> None:
    assert fields("ml", spec(serviceAccountName="preshard-converter")) == []
    assert fields("ml", spec(serviceAccountName="default")) == ["spec.converter.serviceAccountName"]
    assert fields("ml", spec(serviceAccountName="cluster-admin-sa")) == [
        "spec.converter.serviceAccountName"
    ]
    cfg = OperatorConfig(
        converter_image=IMAGE,
        namespace_service_accounts=(("team-a", "team-a-conv"), ("team-b", "team-b-conv")),
        allowed_service_accounts=("shared-reader",),
    )
    assert fields("team-a", spec(serviceAccountName="team-a-conv"), cfg) == []
    assert fields("team-a", spec(serviceAccountName="shared-reader"), cfg) == []
    # another tenant's identity is not this namespace's
    assert fields("team-a", spec(serviceAccountName="team-b-conv"), cfg) == [
        "spec.converter.serviceAccountName"
    ]
    assert fields("team-a", spec(serviceAccountName="preshard-converter"), cfg) == [
        "spec.converter.serviceAccountName"
    ]
    # the Job runs as the namespace's own account by default
    job = build_conversion_job("m", "team-a", "u", spec(), cfg)
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "team-a-conv"
    other = build_conversion_job("m", "other", "u", spec(), cfg)
    assert other["spec"]["template"]["spec"]["serviceAccountName"] == "preshard-converter"
    purge = build_purge_job("m", "team-b", "u", spec(), cfg)
    assert purge["spec"]["template"]["spec"]["serviceAccountName"] == "team-b-conv"


def test_priority_classes_none_by_default() -> None:
    assert fields("ml", spec(priorityClassName="system-node-critical")) == [
        "spec.converter.priorityClassName"
    ]
    cfg = OperatorConfig(converter_image=IMAGE, allowed_priority_classes=("gpu-batch",))
    assert fields("ml", spec(priorityClassName="gpu-batch"), cfg) == []
    assert fields("ml", spec(priorityClassName="system-cluster-critical"), cfg) == [
        "spec.converter.priorityClassName"
    ]


# ------------------------------------------------------------------ tolerations, nodes


def test_no_toleration_beyond_what_the_admin_lists() -> None:
    everything = {"operator": "Exists"}
    control_plane = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
    assert fields("ml", spec(tolerations=[everything])) == ["spec.converter.tolerations[0]"]
    assert fields("ml", spec(tolerations=[control_plane])) == ["spec.converter.tolerations[0]"]
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    cfg = OperatorConfig(converter_image=IMAGE, default_tolerations=(gpu,))
    assert fields("ml", spec(tolerations=[gpu]), cfg) == []
    assert fields("ml", spec(tolerations=[]), cfg) == []
    assert fields("ml", spec(tolerations=[gpu, control_plane]), cfg) == [
        "spec.converter.tolerations[1]"
    ]


@pytest.mark.parametrize(
    ("want", "allowed", "ok"),
    [
        ({"key": "k", "operator": "Equal", "value": "v"}, {"key": "k", "operator": "Exists"}, True),
        (
            {"key": "k", "operator": "Exists"},
            {"key": "k", "operator": "Equal", "value": "v"},
            False,
        ),
        ({"key": "k", "value": "v"}, {"key": "k", "value": "w"}, False),
        ({"key": "k", "value": "v"}, {"key": "k", "operator": "Equal", "value": "v"}, True),
        ({"operator": "Exists"}, {"key": "k", "operator": "Exists"}, False),
        ({"key": "k", "operator": "Exists"}, {"operator": "Exists"}, True),
        (
            {"key": "k", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "k", "operator": "Exists"},
            True,
        ),
        (
            {"key": "k", "operator": "Exists"},
            {"key": "k", "operator": "Exists", "effect": "NoSchedule"},
            False,
        ),
        (
            {"key": "k", "operator": "Exists", "effect": "NoExecute"},
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
            False,
        ),
        (
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
            True,
        ),
        (
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 90},
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60},
            False,
        ),
        (
            {"key": "k", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "k", "operator": "Exists", "tolerationSeconds": 60},
            True,
        ),
    ],
)
def test_toleration_coverage(want: dict[str, Any], allowed: dict[str, Any], ok: bool) -> None:
    assert toleration_covered(want, allowed) is ok


def test_node_selector_on_top_of_the_admins_default() -> None:
    cfg = OperatorConfig(
        converter_image=IMAGE,
        default_node_selector=(("pool", "gpu"),),
        allowed_node_selector=(("gpu.example.com/class", ("h100", "a100")), ("zone", ("*",))),
    )
    assert (
        fields("ml", spec(nodeSelector={"gpu.example.com/class": "h100", "zone": "z1"}), cfg) == []
    )
    assert fields("ml", spec(nodeSelector={"pool": "gpu"}), cfg) == []
    assert fields("ml", spec(nodeSelector={"node-role.kubernetes.io/control-plane": ""}), cfg) == [
        "spec.converter.nodeSelector[node-role.kubernetes.io/control-plane]"
    ]
    assert fields("ml", spec(nodeSelector={"pool": "system"}), cfg) == [
        "spec.converter.nodeSelector[pool]"
    ]
    assert fields("ml", spec(nodeSelector={"gpu.example.com/class": "t4"}), cfg) == [
        "spec.converter.nodeSelector[gpu.example.com/class]"
    ]
    # the admin's default always applies: an empty spec selector does not remove it
    pod = build_conversion_job("m", "ml", "u", spec(nodeSelector={}), cfg)["spec"]["template"][
        "spec"
    ]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    pod = build_conversion_job("m", "ml", "u", spec(nodeSelector={"zone": "z1"}), cfg)["spec"][
        "template"
    ]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu", "zone": "z1"}


def test_output_prefix_policy() -> None:
    cfg = OperatorConfig(
        converter_image=IMAGE, output_prefixes=(("team-a", ("s3://out/team-a/",)),)
    )
    assert fields("team-a", spec(), cfg) == ["spec.output.uri"]
    assert fields("team-b", spec(), cfg) == ["spec.output.uri"]  # not listed, no "*"


def test_every_violation_is_named_in_one_message() -> None:
    vs = check_policy(
        "ml",
        spec(
            image="attacker.io/x:1",
            serviceAccountName="admin",
            priorityClassName="system-node-critical",
            tolerations=[{"operator": "Exists"}],
            nodeSelector={"node-role.kubernetes.io/control-plane": ""},
        ),
        CONFIG,
    )
    msg = policy_message(vs)
    for name in (
        "image",
        "serviceAccountName",
        "priorityClassName",
        "tolerations[0]",
        "nodeSelector",
    ):
        assert f"spec.converter.{name}" in msg
    assert "attacker.io/x:1" in msg and msg.endswith("(no Job was created)")


# ----------------------------------------------------------------------- from the env


def test_policy_from_env() -> None:
    cfg = OperatorConfig.from_env(
        {
            "PRESHARD_CONVERTER_IMAGE": IMAGE,
            "PRESHARD_ALLOWED_IMAGES": json.dumps(["registry.example.com/ml/"]),
            "PRESHARD_ALLOWED_SERVICE_ACCOUNTS": json.dumps(["shared"]),
            "PRESHARD_NAMESPACE_SERVICE_ACCOUNTS": json.dumps({"team-a": "team-a-conv"}),
            "PRESHARD_ALLOWED_PRIORITY_CLASSES": json.dumps(["gpu-batch"]),
            "PRESHARD_ALLOWED_TOLERATIONS": json.dumps([{"key": "spot", "operator": "Exists"}]),
            "PRESHARD_ALLOWED_NODE_SELECTOR": json.dumps({"zone": ["*"]}),
            "PRESHARD_OUTPUT_PREFIXES": json.dumps({"team-a": ["s3://out/team-a"]}),
            "PRESHARD_SECRET_CHECK": "off",
        }
    )
    assert cfg.image_allowlist == ("registry.example.com/ml/",)
    assert cfg.allowed_service_accounts_for("team-a") == ("team-a-conv", "shared")
    assert cfg.allowed_priority_classes == ("gpu-batch",)
    assert cfg.allowed_tolerations == ({"key": "spot", "operator": "Exists"},)
    assert cfg.node_selector_allowlist == {"zone": ("*",)}
    assert cfg.output_prefix_policy == {"team-a": ("s3://out/team-a/",)}
    assert cfg.check_secrets is False
    dflt = OperatorConfig.from_env({"PRESHARD_CONVERTER_IMAGE": IMAGE})
    assert dflt.image_allowlist == ("registry.example.com/ml/preshard-converter",)
    assert dflt.check_secrets is True


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("PRESHARD_ALLOWED_IMAGES", '"x"', "must be a JSON list"),
        ("PRESHARD_ALLOWED_IMAGES", '[""]', "non-empty strings"),
        ("PRESHARD_ALLOWED_SERVICE_ACCOUNTS", '["Bad_Name"]', "not a valid object name"),
        ("PRESHARD_NAMESPACE_SERVICE_ACCOUNTS", '{"a": "Bad"}', "not a valid ServiceAccount"),
        (
            "PRESHARD_ALLOWED_TOLERATIONS",
            '[{"operator": "Maybe"}]',
            r"PRESHARD_ALLOWED_TOLERATIONS\[0\]",
        ),
        ("PRESHARD_ALLOWED_NODE_SELECTOR", '{"zone": "z1"}', "must be a list"),
        ("PRESHARD_OUTPUT_PREFIXES", '{"a": ["s3://bucket-only"]}', "bucket root"),
        ("PRESHARD_SECRET_CHECK", "full", "metadata or off"),
    ],
)
def test_bad_policy_env_is_refused_naming_the_variable(name: str, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OperatorConfig.from_env({name: value})
