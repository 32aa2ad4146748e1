"""How a pod reaches storage: the Secrets it reads (never their data), the S3 endpoints
and the environment built from them, for the output and for the source."""

from __future__ import annotations

from typing import Any

from preshard.core.config import OperatorConfig
from preshard.core.spec import CheckpointSpec


def _secret_env(env_name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": env_name, "valueFrom": {"secretKeyRef": ref}}


def _aws_env(prefix: str, secret: str) -> list[dict[str, Any]]:
    return [
        _secret_env(f"{prefix}AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"),
        _secret_env(f"{prefix}AWS_SECRET_ACCESS_KEY", secret, "AWS_SECRET_ACCESS_KEY"),
        _secret_env(f"{prefix}AWS_SESSION_TOKEN", secret, "AWS_SESSION_TOKEN", optional=True),
    ]


def output_secret(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    return spec.output.credentials_secret or config.default_credentials_secret


def source_secret(spec: CheckpointSpec) -> str | None:
    """The Secret the source is read with (None: the output's credentials or none)."""
    return spec.source.credentials_secret


def output_endpoint(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    return spec.output.endpoint or config.default_s3_endpoint


def source_endpoint(spec: CheckpointSpec, config: OperatorConfig) -> str | None:
    """The S3 endpoint an ``s3://`` source is read from: its own, else the output's (the
    worker falls back to AWS_ENDPOINT_URL_S3), else the default (None: AWS)."""
    return spec.source.endpoint or output_endpoint(spec, config)


def referenced_secrets(spec: CheckpointSpec, config: OperatorConfig) -> list[str]:
    """Every Secret the conversion pod reads (the operator checks they exist)."""
    names = [s for s in (output_secret(spec, config), source_secret(spec)) if s]
    return sorted(set(names))


def output_env(spec: CheckpointSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    secret = output_secret(spec, config)
    if secret:
        env += _aws_env("", secret)
    endpoint = output_endpoint(spec, config)
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    if spec.output.region:
        env.append({"name": "AWS_REGION", "value": spec.output.region})
    return env


def source_env(spec: CheckpointSpec) -> list[dict[str, Any]]:
    src = spec.source.parsed
    env: list[dict[str, Any]] = []
    secret = spec.source.credentials_secret
    if src.scheme == "hf":
        if secret:
            env.append(_secret_env("HF_TOKEN", secret, "HF_TOKEN", optional=True))
        return env
    if src.scheme == "s3":
        if secret:
            env += _aws_env("PRESHARD_SOURCE_", secret)
        if spec.source.endpoint:
            env.append({"name": "PRESHARD_SOURCE_ENDPOINT_URL", "value": spec.source.endpoint})
        if spec.source.region:
            env.append({"name": "PRESHARD_SOURCE_REGION", "value": spec.source.region})
    return env
