"""preshard.core.config: OperatorConfig from PRESHARD_* environment variables."""

from __future__ import annotations

import dataclasses
import math

import pytest

from preshard import __version__
from preshard.core.config import DEFAULT_CONVERTER_IMAGE, OperatorConfig

DEFAULTS = {
    "converter_image": f"ghcr.io/preshard/preshard-converter:{__version__}",
    "converter_cpu_image": f"ghcr.io/preshard/preshard-converter-cpu:{__version__}",
    "default_accelerator": "gpu",
    "default_engine": "auto",
    "image_pull_policy": "IfNotPresent",
    "gpu_resource_name": "nvidia.com/gpu",
    "job_service_account": "preshard-converter",
    "default_s3_endpoint": None,
    "default_credentials_secret": None,
    "job_ttl_seconds": 86400,
    "namespaces": (),
    "metrics_port": 8080,
    "liveness_endpoint": "http://0.0.0.0:8081/healthz",
    "progress_poll_seconds": 10.0,
    "retry_seconds": 10.0,
    "step_retry_seconds": 300.0,
    "preflight": True,
    "work_dir_size": "200Gi",
    "default_node_selector": (),
    "default_tolerations": (),
    "allowed_images": (),
    "allowed_service_accounts": (),
    "namespace_service_accounts": (),
    "allowed_priority_classes": (),
    "allowed_tolerations": (),
    "allowed_node_selector": (),
    "output_prefixes": (),
    "check_secrets": True,
    "default_cpu_node_selector": (),
    "default_cpu_tolerations": (),
    "copy_trust": (),
    "operator_namespace": None,
}


def test_defaults() -> None:
    assert DEFAULT_CONVERTER_IMAGE == DEFAULTS["converter_image"]
    assert dataclasses.asdict(OperatorConfig()) == DEFAULTS
    assert OperatorConfig().cluster_wide is True


def test_from_empty_env_is_the_default() -> None:
    assert OperatorConfig.from_env({}) == OperatorConfig()


def test_unrelated_variables_are_ignored() -> None:
    assert OperatorConfig.from_env({"PATH": "/bin", "PRESHARD_UNKNOWN": "x"}) == OperatorConfig()


def test_blank_values_mean_default() -> None:
    env = {
        name: "  "
        for name in (
            "PRESHARD_CONVERTER_IMAGE",
            "PRESHARD_CONVERTER_CPU_IMAGE",
            "PRESHARD_DEFAULT_ACCELERATOR",
            "PRESHARD_DEFAULT_ENGINE",
            "PRESHARD_CONVERTER_IMAGE_PULL_POLICY",
            "PRESHARD_GPU_RESOURCE_NAME",
            "PRESHARD_JOB_SERVICE_ACCOUNT",
            "PRESHARD_S3_ENDPOINT",
            "PRESHARD_CREDENTIALS_SECRET",
            "PRESHARD_JOB_TTL_SECONDS",
            "PRESHARD_NAMESPACES",
            "PRESHARD_METRICS_PORT",
            "PRESHARD_LIVENESS_ENDPOINT",
            "PRESHARD_PROGRESS_POLL_SECONDS",
            "PRESHARD_RETRY_SECONDS",
            "PRESHARD_PREFLIGHT",
            "PRESHARD_WORK_DIR_SIZE",
            "PRESHARD_CONVERTER_NODE_SELECTOR",
            "PRESHARD_CONVERTER_TOLERATIONS",
            "PRESHARD_ALLOWED_IMAGES",
            "PRESHARD_ALLOWED_SERVICE_ACCOUNTS",
            "PRESHARD_NAMESPACE_SERVICE_ACCOUNTS",
            "PRESHARD_ALLOWED_PRIORITY_CLASSES",
            "PRESHARD_ALLOWED_TOLERATIONS",
            "PRESHARD_ALLOWED_NODE_SELECTOR",
            "PRESHARD_OUTPUT_PREFIXES",
            "PRESHARD_SECRET_CHECK",
            "PRESHARD_CONVERTER_CPU_NODE_SELECTOR",
            "PRESHARD_CONVERTER_CPU_TOLERATIONS",
        )
    }
    assert OperatorConfig.from_env(env) == OperatorConfig()


FULL_ENV = {
    "PRESHARD_CONVERTER_IMAGE": " registry.example.com/conv@sha256:" + "ab" * 32 + " ",
    "PRESHARD_CONVERTER_CPU_IMAGE": "registry.example.com/conv-cpu:1.0",
    "PRESHARD_DEFAULT_ACCELERATOR": "cpu",
    "PRESHARD_DEFAULT_ENGINE": "none",
    "PRESHARD_CONVERTER_IMAGE_PULL_POLICY": "Always",
    "PRESHARD_GPU_RESOURCE_NAME": "amd.com/gpu",
    "PRESHARD_JOB_SERVICE_ACCOUNT": "sharder",
    "PRESHARD_S3_ENDPOINT": "http://minio.storage:9000",
    "PRESHARD_CREDENTIALS_SECRET": "s3-creds",
    "PRESHARD_JOB_TTL_SECONDS": "3600",
    "PRESHARD_NAMESPACES": " team-a, team-b,,team-c ,",
    "PRESHARD_METRICS_PORT": "9090",
    "PRESHARD_LIVENESS_ENDPOINT": "http://0.0.0.0:9091/healthz",
    "PRESHARD_PROGRESS_POLL_SECONDS": "2.5",
    "PRESHARD_RETRY_SECONDS": "4",
    "PRESHARD_STEP_RETRY_SECONDS": "120",
    "PRESHARD_PREFLIGHT": "0",
    "PRESHARD_WORK_DIR_SIZE": "500Gi",
    "PRESHARD_CONVERTER_NODE_SELECTOR": '{"gpu.example.com/class": "h100", "a": "b", "n": "1"}',
    "PRESHARD_CONVERTER_TOLERATIONS": (
        '[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},'
        ' {"key": "x", "operator": "Equal", "value": "y"}]'
    ),
    "PRESHARD_ALLOWED_IMAGES": '["registry.example.com/ml/"]',
    "PRESHARD_ALLOWED_SERVICE_ACCOUNTS": '["shared"]',
    "PRESHARD_NAMESPACE_SERVICE_ACCOUNTS": '{"team-b": "b-conv", "team-a": "a-conv"}',
    "PRESHARD_ALLOWED_PRIORITY_CLASSES": '["gpu-batch"]',
    "PRESHARD_ALLOWED_TOLERATIONS": '[{"key": "spot", "operator": "Exists"}]',
    "PRESHARD_ALLOWED_NODE_SELECTOR": '{"zone": ["*"], "class": ["h100", "a100"]}',
    "PRESHARD_OUTPUT_PREFIXES": '{"team-a": ["s3://models/team-a"]}',
    "PRESHARD_SECRET_CHECK": "off",
    "PRESHARD_CONVERTER_CPU_NODE_SELECTOR": '{"pool": "highmem"}',
    "PRESHARD_CONVERTER_CPU_TOLERATIONS": '[{"key": "highmem", "operator": "Exists"}]',
    "PRESHARD_COPY_TRUST": '[["team-b", "team-a", "team-b"], ["team-c", "team-d"]]',
    "PRESHARD_OPERATOR_NAMESPACE": "preshard-system",
}


def test_from_env_reads_every_variable() -> None:
    cfg = OperatorConfig.from_env(FULL_ENV)
    assert dataclasses.asdict(cfg) == {
        "converter_image": "registry.example.com/conv@sha256:" + "ab" * 32,
        "converter_cpu_image": "registry.example.com/conv-cpu:1.0",
        "default_accelerator": "cpu",
        "default_engine": "none",
        "image_pull_policy": "Always",
        "gpu_resource_name": "amd.com/gpu",
        "job_service_account": "sharder",
        "default_s3_endpoint": "http://minio.storage:9000",
        "default_credentials_secret": "s3-creds",
        "job_ttl_seconds": 3600,
        "namespaces": ("team-a", "team-b", "team-c"),
        "metrics_port": 9090,
        "liveness_endpoint": "http://0.0.0.0:9091/healthz",
        "progress_poll_seconds": 2.5,
        "retry_seconds": 4.0,
        "step_retry_seconds": 120.0,
        "preflight": False,
        "work_dir_size": "500Gi",
        # sorted by key
        "default_node_selector": (("a", "b"), ("gpu.example.com/class", "h100"), ("n", "1")),
        "default_tolerations": (
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "x", "operator": "Equal", "value": "y"},
        ),
        "allowed_images": ("registry.example.com/ml/",),
        "allowed_service_accounts": ("shared",),
        "namespace_service_accounts": (("team-a", "a-conv"), ("team-b", "b-conv")),
        "allowed_priority_classes": ("gpu-batch",),
        "allowed_tolerations": ({"key": "spot", "operator": "Exists"},),
        "allowed_node_selector": (("class", ("h100", "a100")), ("zone", ("*",))),
        "output_prefixes": (("team-a", ("s3://models/team-a/",)),),
        "check_secrets": False,
        "default_cpu_node_selector": (("pool", "highmem"),),
        "default_cpu_tolerations": ({"key": "highmem", "operator": "Exists"},),
        "copy_trust": (("team-a", "team-b"), ("team-c", "team-d")),
        "operator_namespace": "preshard-system",
    }
    assert cfg.cluster_wide is False
    # Frozen and hashable-by-value where it matters: same env, equal config.
    assert OperatorConfig.from_env(FULL_ENV) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.metrics_port = 1  # type: ignore[misc]


@pytest.mark.parametrize("policy", ["Always", "IfNotPresent", "Never"])
def test_pull_policies(policy: str) -> None:
    cfg = OperatorConfig.from_env({"PRESHARD_CONVERTER_IMAGE_PULL_POLICY": policy})
    assert cfg.image_pull_policy == policy


@pytest.mark.parametrize("raw", ["null", "{}", " null "])
def test_empty_json_node_selector(raw: str) -> None:
    cfg = OperatorConfig.from_env({"PRESHARD_CONVERTER_NODE_SELECTOR": raw})
    assert cfg.default_node_selector == ()


@pytest.mark.parametrize("raw", ["null", "[]"])
def test_empty_json_tolerations(raw: str) -> None:
    assert (
        OperatorConfig.from_env({"PRESHARD_CONVERTER_TOLERATIONS": raw}).default_tolerations == ()
    )


@pytest.mark.parametrize("port", ["0", "1", "65535"])
def test_integer_bounds(port: str) -> None:
    assert OperatorConfig.from_env({"PRESHARD_METRICS_PORT": port}).metrics_port == int(port)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PRESHARD_JOB_TTL_SECONDS": "a day"},
            "PRESHARD_JOB_TTL_SECONDS='a day' is not an integer",
        ),
        ({"PRESHARD_JOB_TTL_SECONDS": "1.5"}, "PRESHARD_JOB_TTL_SECONDS='1.5' is not an integer"),
        ({"PRESHARD_JOB_TTL_SECONDS": "-1"}, "PRESHARD_JOB_TTL_SECONDS=-1 must be >= 0"),
        ({"PRESHARD_METRICS_PORT": "http"}, "PRESHARD_METRICS_PORT='http' is not an integer"),
        ({"PRESHARD_METRICS_PORT": "-8080"}, "PRESHARD_METRICS_PORT=-8080 must be >= 0"),
        (
            {"PRESHARD_PROGRESS_POLL_SECONDS": "often"},
            "PRESHARD_PROGRESS_POLL_SECONDS='often' is not a number",
        ),
        ({"PRESHARD_PROGRESS_POLL_SECONDS": "0"}, "PRESHARD_PROGRESS_POLL_SECONDS=0.0 must be > 0"),
        (
            {"PRESHARD_PROGRESS_POLL_SECONDS": "-3"},
            "PRESHARD_PROGRESS_POLL_SECONDS=-3.0 must be > 0",
        ),
        (
            {"PRESHARD_CONVERTER_IMAGE_PULL_POLICY": "always"},
            "PRESHARD_CONVERTER_IMAGE_PULL_POLICY='always' must be Always, IfNotPresent or Never",
        ),
        (
            {"PRESHARD_S3_ENDPOINT": "minio.storage:9000"},
            "PRESHARD_S3_ENDPOINT='minio.storage:9000' must start with http:// or https://",
        ),
        (
            {"PRESHARD_CONVERTER_NODE_SELECTOR": "gpu=h100"},
            "PRESHARD_CONVERTER_NODE_SELECTOR is not valid JSON",
        ),
        (
            {"PRESHARD_CONVERTER_NODE_SELECTOR": '[["gpu", "h100"]]'},
            "PRESHARD_CONVERTER_NODE_SELECTOR must be a JSON dict",
        ),
        (
            {"PRESHARD_CONVERTER_NODE_SELECTOR": '"gpu"'},
            "PRESHARD_CONVERTER_NODE_SELECTOR must be a JSON dict",
        ),
        (
            {"PRESHARD_CONVERTER_TOLERATIONS": "{bad"},
            "PRESHARD_CONVERTER_TOLERATIONS is not valid JSON",
        ),
        (
            {"PRESHARD_CONVERTER_TOLERATIONS": '{"key": "gpu"}'},
            "PRESHARD_CONVERTER_TOLERATIONS must be a JSON list",
        ),
        (
            {"PRESHARD_CONVERTER_CPU_TOLERATIONS": '[{"operator": "Sometimes"}]'},
            "PRESHARD_CONVERTER_CPU_TOLERATIONS[0].operator: Input should be 'Exists' or 'Equal'",
        ),
        (
            {"PRESHARD_CONVERTER_CPU_NODE_SELECTOR": '{"a": 1}'},
            "PRESHARD_CONVERTER_CPU_NODE_SELECTOR values must be strings ('a': 1)",
        ),
        (
            {"PRESHARD_DEFAULT_ACCELERATOR": "tpu"},
            "PRESHARD_DEFAULT_ACCELERATOR='tpu' must be gpu or cpu",
        ),
        (
            {"PRESHARD_DEFAULT_ENGINE": "engine"},
            "PRESHARD_DEFAULT_ENGINE='engine' must be auto, none or vllm",
        ),
        (
            {"PRESHARD_WORK_DIR_SIZE": "lots"},
            "PRESHARD_WORK_DIR_SIZE='lots' is not a quantity such as 200Gi",
        ),
        (
            {"PRESHARD_WORK_DIR_SIZE": "200GB"},
            "PRESHARD_WORK_DIR_SIZE='200GB' is not a quantity such as 200Gi",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        OperatorConfig.from_env(env)
    assert str(exc.value) == message


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e400"])
def test_poll_seconds_must_be_finite(raw: str) -> None:
    with pytest.raises(ValueError, match="PRESHARD_PROGRESS_POLL_SECONDS"):
        cfg = OperatorConfig.from_env({"PRESHARD_PROGRESS_POLL_SECONDS": raw})
        assert math.isfinite(cfg.progress_poll_seconds)
    with pytest.raises(ValueError) as exc:
        OperatorConfig.from_env({"PRESHARD_PROGRESS_POLL_SECONDS": raw})
    assert str(exc.value) == f"PRESHARD_PROGRESS_POLL_SECONDS={raw!r} is not a finite number"


def test_tolerations_must_be_objects() -> None:
    with pytest.raises(ValueError, match="PRESHARD_CONVERTER_TOLERATIONS"):
        OperatorConfig.from_env({"PRESHARD_CONVERTER_TOLERATIONS": '[1, "gpu"]'})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('[1, "gpu"]', "[0]: Input should be a valid dictionary"),
        (
            '[{"key": "k"}, {"operator": "Maybe"}]',
            "[1].operator: Input should be 'Exists' or 'Equal'",
        ),
        ('[{"key": "k", "bogus": 1}]', "[0].bogus: unknown field"),
        ('[{"tolerationSeconds": "5"}]', "[0].tolerationSeconds: Input should be a valid integer"),
    ],
)
def test_tolerations_follow_the_spec_rules(raw: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        OperatorConfig.from_env({"PRESHARD_CONVERTER_TOLERATIONS": raw})
    assert str(exc.value) == "PRESHARD_CONVERTER_TOLERATIONS" + message


def test_node_selector_null_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="PRESHARD_CONVERTER_NODE_SELECTOR"):
        OperatorConfig.from_env({"PRESHARD_CONVERTER_NODE_SELECTOR": '{"gpu": null}'})


@pytest.mark.parametrize(("raw", "shown"), [("null", "None"), ("1", "1"), ("true", "True")])
def test_node_selector_values_must_be_strings(raw: str, shown: str) -> None:
    with pytest.raises(ValueError) as exc:
        OperatorConfig.from_env({"PRESHARD_CONVERTER_NODE_SELECTOR": f'{{"a": "b", "n": {raw}}}'})
    assert str(exc.value) == (
        f"PRESHARD_CONVERTER_NODE_SELECTOR values must be strings ('n': {shown})"
    )


def test_with_overrides_skips_none() -> None:
    base = OperatorConfig.from_env(FULL_ENV)
    same = base.with_overrides(metrics_port=None, namespaces=None)
    assert same == base
    changed = base.with_overrides(metrics_port=1234, namespaces=("x",), liveness_endpoint=None)
    assert changed.metrics_port == 1234
    assert changed.namespaces == ("x",)
    assert changed.liveness_endpoint == base.liveness_endpoint
    assert base.metrics_port == 9090  # the original is untouched


def test_with_overrides_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError):
        OperatorConfig().with_overrides(bogus=1)


def test_copy_trust_groups() -> None:
    cfg = OperatorConfig.from_env({"PRESHARD_COPY_TRUST": '[["a", "b"], ["b", "c"], ["d"]]'})
    assert cfg.copy_sources_for("a") == {"b"}
    assert cfg.copy_sources_for("b") == {"a", "c"}  # trust is per group, not transitive
    assert cfg.copy_sources_for("c") == {"b"}
    assert cfg.copy_sources_for("d") == frozenset() and cfg.copy_sources_for("x") == frozenset()
    assert OperatorConfig().copy_sources_for("a") == frozenset()  # default: own namespace only
    every = OperatorConfig.from_env({"PRESHARD_COPY_TRUST": '[["*"]]'})
    assert every.copy_sources_for("a") == {"*"}


@pytest.mark.parametrize("raw", ['{"a": "b"}', '["a"]', '[["Bad_Name"]]', "[[1]]", "x"])
def test_copy_trust_refuses_malformed_values(raw: str) -> None:
    with pytest.raises(ValueError, match="PRESHARD_COPY_TRUST"):
        OperatorConfig.from_env({"PRESHARD_COPY_TRUST": raw})
