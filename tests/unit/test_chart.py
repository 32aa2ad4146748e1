"""The Helm chart, rendered and linted by the real Helm v4 Go SDK (helm-python-sdk, no helm
binary), every object validated against the Kubernetes 1.29 and 1.33 OpenAPI schemas in
strict mode (kubernetes-validate), and cross-checked against the code it configures:
`preshard operator`'s argument parser, OperatorConfig.from_env, REQUIRED_RBAC and the CRD.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from preshard.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "preshard"
CRD_NAME = "shardedcheckpoints.preshard.io.yaml"
RELEASE = "preshard"
NAMESPACE = "preshard-system"
KUBE_VERSIONS = ("1.29", "1.33")

CUSTOM_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/preshard-operator", "tag": "0.1.0-rc1"},
    "converter": {
        "image": {
            "repository": "registry.example.com/ml/preshard-converter",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "cpuImage": {"repository": "registry.example.com/ml/preshard-converter-cpu", "tag": "7.1"},
        "accelerator": "cpu",
        "engine": "none",
        "cpuNodeSelector": {"pool": "highmem"},
        "cpuTolerations": [{"key": "highmem", "operator": "Exists", "effect": "NoSchedule"}],
        "gpuResourceName": "amd.com/gpu",
        "nodeSelector": {"gpu.example.com/class": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "workDirSize": "500Gi",
        "progressPollSeconds": 5,
        "serviceAccount": {
            "name": "sharder",
            # one cloud identity per tenant (a shared role-arn is refused, see below)
            "perNamespace": {
                "team-a": {
                    "name": "team-a-sharder",
                    "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/team-a"},
                },
                "team-b": {
                    "name": "team-b-sharder",
                    "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/team-b"},
                },
            },
        },
        "policy": {
            "allowedImages": ["registry.example.com/ml/", "docker.io/vllm/vllm-openai:v0.32.0"],
            "allowedServiceAccounts": ["shared-reader"],
            "allowedPriorityClasses": ["gpu-batch"],
            "allowedTolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "allowedNodeSelector": {"gpu.example.com/class": ["h100", "a100"], "zone": ["*"]},
            "outputPrefixes": {"team-a": ["s3://models/team-a/"], "*": ["s3://scratch/shared/"]},
        },
    },
    "s3": {"endpoint": "http://minio.storage:9000", "credentialsSecret": "s3-creds"},
    "watchNamespaces": ["team-a", "team-b"],
    "jobTTLSeconds": 3600,
    "logLevel": "debug",
    "nodeSelector": {"kubernetes.io/os": "linux", "node-role.example.com/system": "true"},
    "tolerations": [{"key": "system", "operator": "Equal", "value": "x", "effect": "NoExecute"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                        ]
                    }
                ]
            }
        }
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "system-cluster-critical",
    "podAnnotations": {"example.com/team": "ml-platform"},
    "probes": {"port": 9091, "readiness": {"enabled": True}},
    "metrics": {
        "port": 9090,
        "serviceMonitor": {
            "enabled": True,
            "interval": "15s",
            "scrapeTimeout": "10s",
            "labels": {"release": "kps"},
        },
    },
}


# ---------------------------------------------------------------------------------------
# helpers


def _objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


class Rendered:
    def __init__(self, manifests: dict[str, str]) -> None:
        self.manifests = manifests
        self.objects = _objects(manifests)
        self.notes = next((t for p, t in manifests.items() if p.endswith("NOTES.txt")), "")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def container(self) -> dict[str, Any]:
        containers = self.deployment["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def env(self) -> dict[str, str]:
        env = self.container["env"]
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)), f"duplicate env names: {names}"
        for e in env:
            assert set(e) == {"name", "value"}, f"operator env must be plain values: {e}"
        return {e["name"]: e["value"] for e in env}


@pytest.fixture(scope="module")
def chart() -> Iterable[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Rendered:
    return Rendered(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True))


@pytest.fixture(scope="module")
def default(chart: helm.Chart) -> Rendered:
    return _render(chart)


@pytest.fixture(scope="module")
def custom(chart: helm.Chart) -> Rendered:
    return _render(chart, CUSTOM_VALUES)


def _triples(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _required_rbac(
    namespaced: bool | None = None, secrets: bool = False
) -> set[tuple[str, str, str]]:
    """required_rbac(secrets) (every API call the operator makes) as (group, resource,
    verb); ``namespaced`` selects the rules on namespaced or cluster-scoped resources."""
    from preshard.k8s.rbac import required_rbac

    return _triples(
        {"apiGroups": r.api_groups, "resources": r.resources, "verbs": r.verbs}
        for r in required_rbac(secrets)
        if namespaced is None or r.namespaced == namespaced
    )


# ---------------------------------------------------------------------------------------
# chart metadata, lint, Kubernetes schema validation


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "preshard"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES], ids=["default", "custom"])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("which", ["default", "custom"])
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(
    which: str, kube_version: str, request: pytest.FixtureRequest
) -> None:
    rendered: Rendered = request.getfixturevalue(which)
    validated = 0
    for obj in rendered.objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a custom resource: kubernetes-validate has no schema (checked below)
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        validated += 1
    expected = {"default": 6, "custom": 13}[which]  # custom: + the ledger's Role/RoleBinding
    assert validated == expected


def test_rendered_kinds(default: Rendered, custom: Rendered) -> None:
    def kinds(r: Rendered) -> list[tuple[str, str, str]]:
        return sorted(
            (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for o in r.objects
        )

    assert kinds(default) == [
        ("ClusterRole", "", "preshard"),
        ("ClusterRoleBinding", "", "preshard"),
        ("Deployment", NAMESPACE, "preshard"),
        ("Service", NAMESPACE, "preshard-metrics"),
        ("ServiceAccount", NAMESPACE, "preshard"),
        ("ServiceAccount", NAMESPACE, "preshard-converter"),
    ]
    assert kinds(custom) == [
        ("ClusterRole", "", "preshard"),
        ("ClusterRoleBinding", "", "preshard"),
        ("Deployment", NAMESPACE, "preshard"),
        ("Role", NAMESPACE, "preshard-ledger"),
        ("Role", "team-a", "preshard"),
        ("Role", "team-b", "preshard"),
        ("RoleBinding", NAMESPACE, "preshard-ledger"),
        ("RoleBinding", "team-a", "preshard"),
        ("RoleBinding", "team-b", "preshard"),
        ("Service", NAMESPACE, "preshard-metrics"),
        ("ServiceAccount", NAMESPACE, "preshard"),
        ("ServiceAccount", "team-a", "team-a-sharder"),
        ("ServiceAccount", "team-b", "team-b-sharder"),
        ("ServiceMonitor", NAMESPACE, "preshard"),
    ]


def test_names_stay_within_limits(chart: helm.Chart) -> None:
    long_release = "a-very-long-release-name-for-the-sharding-operator-x"  # 52 characters
    helm.validate_release_name(long_release)
    rendered = Rendered(chart.render({}, name=long_release, namespace=NAMESPACE))
    for obj in rendered.objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63
        kubernetes_validate.validate(obj, "1.33", strict=True)


# ---------------------------------------------------------------------------------------
# labels, security, Deployment shape


@pytest.mark.parametrize("which", ["default", "custom"])
def test_standard_labels_on_every_object(which: str, request: pytest.FixtureRequest) -> None:
    rendered: Rendered = request.getfixturevalue(which)
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "preshard"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "preshard-0.1.0"
        expected = (
            "converter"
            if obj["metadata"]["name"] in ("preshard-converter", "team-a-sharder", "team-b-sharder")
            else "operator"
        )
        assert labels["app.kubernetes.io/component"] == expected, obj["metadata"]["name"]
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    selector = rendered.deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "app.kubernetes.io/version" not in selector  # selectors are immutable


@pytest.mark.parametrize("which", ["default", "custom"])
def test_operator_pod_meets_restricted_pod_security(
    which: str, request: pytest.FixtureRequest
) -> None:
    rendered: Rendered = request.getfixturevalue(which)
    pod = rendered.deployment["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    csc = rendered.container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["runAsNonRoot"] is True
    assert not csc.get("privileged")
    # read-only root: the only writable path is an emptyDir on /tmp
    assert rendered.container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert "emptyDir" in pod["volumes"][0]
    assert all("hostPath" not in v for v in pod["volumes"])


def test_deployment_defaults(default: Rendered) -> None:
    dep = default.deployment
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "preshard"
    assert default.container["image"] == "ghcr.io/preshard/preshard-operator:0.1.0"
    assert default.container["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in default.container  # the image's ENTRYPOINT is `preshard`
    ports = {p["name"]: p["containerPort"] for p in default.container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    live = default.container["livenessProbe"]
    assert live["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "readinessProbe" not in default.container
    assert default.container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert default.container["resources"]["limits"] == {"memory": "512Mi"}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert key not in pod


def test_deployment_custom(custom: Rendered) -> None:
    pod = custom.deployment["spec"]["template"]
    spec = pod["spec"]
    assert custom.container["image"] == "registry.example.com/ml/preshard-operator:0.1.0-rc1"
    assert spec["nodeSelector"] == CUSTOM_VALUES["nodeSelector"]
    assert spec["tolerations"] == CUSTOM_VALUES["tolerations"]
    assert spec["affinity"] == CUSTOM_VALUES["affinity"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["annotations"]["example.com/team"] == "ml-platform"
    ports = {p["name"]: p["containerPort"] for p in custom.container["ports"]}
    assert ports == {"metrics": 9090, "health": 9091}
    assert custom.container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_config_change_restarts_the_operator(default: Rendered, custom: Rendered) -> None:
    def checksum(r: Rendered) -> str:
        value: str = r.deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert re.fullmatch(r"[0-9a-f]{16}", checksum(default))
    assert checksum(default) != checksum(custom)


# ---------------------------------------------------------------------------------------
# the Deployment's args and env against the operator's real interfaces


def test_default_args_parse_as_preshard_operator(default: Rendered) -> None:
    args = build_parser().parse_args(default.container["args"])
    assert args.command == "operator"
    assert args.all_namespaces is True
    assert args.namespace is None
    assert args.metrics_port == 8080
    assert args.liveness == "http://0.0.0.0:8081/healthz"
    assert args.verbose is False


def test_custom_args_parse_as_preshard_operator(custom: Rendered) -> None:
    args = build_parser().parse_args(custom.container["args"])
    assert args.command == "operator"
    assert args.namespace == ["team-a", "team-b"]
    assert args.all_namespaces is False
    assert args.metrics_port == 9090
    assert args.liveness == "http://0.0.0.0:9091/healthz"
    assert args.verbose is True  # logLevel: debug


@pytest.mark.parametrize("which", ["default", "custom"])
def test_probes_and_metrics_ports_agree_with_args(
    which: str, request: pytest.FixtureRequest
) -> None:
    rendered: Rendered = request.getfixturevalue(which)
    args = build_parser().parse_args(rendered.container["args"])
    ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert args.metrics_port == ports["metrics"]
    service = rendered.one("Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": ports["metrics"], "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_default_env_is_what_operator_config_reads(default: Rendered) -> None:
    from preshard.core.config import OperatorConfig

    cfg = OperatorConfig.from_env(default.env)
    assert cfg.converter_image == "ghcr.io/preshard/preshard-converter:0.1.0"
    assert cfg.converter_cpu_image == "ghcr.io/preshard/preshard-converter-cpu:0.1.0"
    assert cfg.default_accelerator == "gpu"
    assert cfg.default_engine == "auto"
    assert cfg.image_pull_policy == "IfNotPresent"
    assert cfg.gpu_resource_name == "nvidia.com/gpu"
    assert cfg.job_service_account == "preshard-converter"
    assert not cfg.default_s3_endpoint
    assert not cfg.default_credentials_secret
    assert tuple(cfg.namespaces) == ()
    assert cfg.job_ttl_seconds == 86400
    assert cfg.metrics_port == 8080
    assert cfg.liveness_endpoint == "http://0.0.0.0:8081/healthz"
    assert cfg.progress_poll_seconds == 10
    assert cfg.work_dir_size == "200Gi"
    assert cfg.default_node_selector == ()
    assert cfg.default_tolerations == ()
    # restrictive policy by default: the chart's own converter image and ServiceAccount,
    # no priority class, no extra toleration or node selector, no Secret permission
    assert cfg.image_allowlist == ("ghcr.io/preshard/preshard-converter",)
    assert cfg.allowed_service_accounts_for("any") == ("preshard-converter",)
    assert cfg.allowed_priority_classes == ()
    assert cfg.allowed_tolerations == ()
    assert cfg.node_selector_allowlist == {}
    assert cfg.output_prefix_policy == {}
    assert cfg.check_secrets is False  # cluster-wide: no Secret RBAC, no check


def test_chart_sets_exactly_the_variables_operator_config_reads(default: Rendered) -> None:
    from preshard.core.config import OperatorConfig

    class Recording(dict[str, str]):
        read: set[str] = set()

        def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            self.read.add(key)
            return super().__getitem__(key)

    env = Recording(default.env)
    OperatorConfig.from_env(env)
    assert Recording.read == set(default.env)


def test_custom_env_is_what_operator_config_reads(custom: Rendered) -> None:
    from preshard.core.config import OperatorConfig

    cfg = OperatorConfig.from_env(custom.env)
    assert cfg.converter_image == "registry.example.com/ml/preshard-converter@sha256:" + "ab" * 32
    assert cfg.image_pull_policy == "Always"
    assert cfg.converter_cpu_image == "registry.example.com/ml/preshard-converter-cpu:7.1"
    assert cfg.default_accelerator == "cpu"
    assert cfg.default_engine == "none"
    assert cfg.default_cpu_node_selector == (("pool", "highmem"),)
    assert list(cfg.default_cpu_tolerations) == CUSTOM_VALUES["converter"]["cpuTolerations"]
    assert cfg.gpu_resource_name == "amd.com/gpu"
    assert cfg.job_service_account == "sharder"
    assert cfg.default_s3_endpoint == "http://minio.storage:9000"
    assert cfg.default_credentials_secret == "s3-creds"
    assert tuple(cfg.namespaces) == ("team-a", "team-b")
    assert cfg.job_ttl_seconds == 3600
    assert cfg.metrics_port == 9090
    assert cfg.liveness_endpoint == "http://0.0.0.0:9091/healthz"
    assert cfg.progress_poll_seconds == 5
    assert cfg.work_dir_size == "500Gi"
    assert cfg.default_node_selector == (("gpu.example.com/class", "h100"),)
    assert list(cfg.default_tolerations) == CUSTOM_VALUES["converter"]["tolerations"]
    assert cfg.service_account_for("team-a") == "team-a-sharder"
    assert cfg.service_account_for("team-b") == "team-b-sharder"
    assert cfg.service_account_for("other") == "sharder"
    policy = CUSTOM_VALUES["converter"]["policy"]
    assert cfg.image_allowlist == tuple(policy["allowedImages"])
    assert cfg.allowed_service_accounts_for("team-a") == ("team-a-sharder", "shared-reader")
    assert cfg.allowed_priority_classes == ("gpu-batch",)
    assert list(cfg.allowed_tolerations) == policy["allowedTolerations"]
    assert cfg.node_selector_allowlist == {
        "gpu.example.com/class": ("h100", "a100"),
        "zone": ("*",),
    }
    assert cfg.output_prefix_policy == {
        "*": ("s3://scratch/shared/",),
        "team-a": ("s3://models/team-a/",),
    }
    assert cfg.check_secrets is True  # namespaced mode: the metadata-only check


def test_operator_env_carries_no_secret_material(custom: Rendered) -> None:
    for name, value in custom.env.items():
        assert "AWS_SECRET" not in name and "TOKEN" not in name, name
        assert "secretKeyRef" not in value
    assert all("valueFrom" not in e for e in custom.container["env"])


# ---------------------------------------------------------------------------------------
# RBAC


def _assert_no_wildcards(rules: Iterable[dict[str, Any]]) -> None:
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert all("*" not in item for item in rule[key]), rule
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule


def test_cluster_wide_rbac_equals_required_rbac(default: Rendered) -> None:
    role = default.one("ClusterRole")
    _assert_no_wildcards(role["rules"])
    assert _triples(role["rules"]) == _required_rbac()
    # the operator needs no Secret data: cluster-wide it holds no Secret permission at all
    assert not [t for t in _triples(role["rules"]) if t[1] == "secrets"]
    binding = default.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "preshard", "namespace": NAMESPACE}
    ]
    assert default.of_kind("Role") == [] and default.of_kind("RoleBinding") == []


def test_namespaced_rbac_equals_required_rbac(custom: Rendered) -> None:
    cluster_role = custom.one("ClusterRole")
    _assert_no_wildcards(cluster_role["rules"])
    # only the rules on cluster-scoped resources stay cluster-wide, and they only read
    assert _triples(cluster_role["rules"]) == _required_rbac(namespaced=False)
    assert all(v in ("get", "list", "watch") for _, _, v in _triples(cluster_role["rules"]))
    ledger = [r for r in custom.of_kind("Role") if r["metadata"]["name"].endswith("-ledger")]
    roles = {r["metadata"]["namespace"]: r for r in custom.of_kind("Role") if r not in ledger}
    bindings = {
        b["metadata"]["namespace"]: b
        for b in custom.of_kind("RoleBinding")
        if not b["metadata"]["name"].endswith("-ledger")
    }
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    # the ledger (service.ledger): one ConfigMap in the operator's own namespace
    (led,) = ledger
    assert led["metadata"]["namespace"] == NAMESPACE
    assert led["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["preshard-ledger"],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]  # fmt: skip
    for ns, role in roles.items():
        _assert_no_wildcards(role["rules"])
        # namespaced mode keeps the metadata-only Secret existence check, per namespace
        assert _triples(role["rules"]) == _required_rbac(namespaced=True, secrets=True)
        assert _triples(role["rules"]) | _triples(cluster_role["rules"]) == _required_rbac(
            secrets=True
        )
        assert bindings[ns]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert bindings[ns]["subjects"] == [
            {"kind": "ServiceAccount", "name": "preshard", "namespace": NAMESPACE}
        ]


def test_rbac_can_be_disabled(chart: helm.Chart) -> None:
    rendered = _render(chart, {"rbac": {"create": False}, "watchNamespaces": ["a"]})
    kinds = {o["kind"] for o in rendered.objects}
    assert kinds.isdisjoint({"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"})


@pytest.mark.parametrize("which", ["default", "custom"])
def test_converter_service_account_has_no_api_access(
    which: str, request: pytest.FixtureRequest
) -> None:
    rendered: Rendered = request.getfixturevalue(which)
    accounts = [
        o
        for o in rendered.of_kind("ServiceAccount")
        if o["metadata"]["labels"]["app.kubernetes.io/component"] == "converter"
    ]
    assert accounts
    for sa in accounts:
        assert sa["automountServiceAccountToken"] is False
    names = {sa["metadata"]["name"] for sa in accounts}
    for binding in rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding"):
        assert all(s["name"] not in names for s in binding["subjects"])
    where = sorted((sa["metadata"]["namespace"], sa["metadata"]["name"]) for sa in accounts)
    if which == "default":
        assert where == [(NAMESPACE, "preshard-converter")]
        assert "annotations" not in accounts[0]["metadata"]
    else:
        # one identity per tenant: its own ServiceAccount and its own cloud role
        assert where == [("team-a", "team-a-sharder"), ("team-b", "team-b-sharder")]
        roles = {
            sa["metadata"]["namespace"]: sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            for sa in accounts
        }
        assert roles == {
            "team-a": "arn:aws:iam::1:role/team-a",
            "team-b": "arn:aws:iam::1:role/team-b",
        }


def test_one_cloud_role_shared_by_several_tenants_is_refused(chart: helm.Chart) -> None:
    shared = {
        "watchNamespaces": ["team-a", "team-b"],
        "converter": {
            "serviceAccount": {
                "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/all"}
            }
        },
    }
    with pytest.raises(Exception, match="every tenant would act as one cloud role"):
        _render(chart, shared)
    # explicit opt-in, or one namespace only, renders
    shared["converter"]["serviceAccount"]["sharedIdentity"] = True
    assert len(_render(chart, shared).of_kind("ServiceAccount")) == 3
    one = {**shared, "watchNamespaces": ["team-a"]}
    one["converter"] = {"serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "x"}}}
    assert len(_render(chart, one).of_kind("ServiceAccount")) == 2


@pytest.mark.parametrize(
    ("values", "namespaced_secret_get", "cluster_secret_get", "env"),
    [
        ({}, False, False, "off"),
        ({"rbac": {"secretCheck": "metadata"}}, False, True, "metadata"),
        ({"watchNamespaces": ["a"]}, True, False, "metadata"),
        ({"watchNamespaces": ["a"], "rbac": {"secretCheck": "off"}}, False, False, "off"),
    ],
)
def test_secret_permission_follows_the_existence_check(
    chart: helm.Chart,
    values: dict[str, Any],
    namespaced_secret_get: bool,
    cluster_secret_get: bool,
    env: str,
) -> None:
    rendered = _render(chart, values)
    assert rendered.env["PRESHARD_SECRET_CHECK"] == env
    cluster = _triples(rendered.one("ClusterRole")["rules"])
    roles = [_triples(r["rules"]) for r in rendered.of_kind("Role")]
    assert (("", "secrets", "get") in cluster) is cluster_secret_get
    assert any(("", "secrets", "get") in r for r in roles) is namespaced_secret_get
    # never more than get, never list/watch (which would return every Secret's data)
    for rules in [cluster, *roles]:
        assert {v for _, res, v in rules if res == "secrets"} <= {"get"}


def test_converter_service_account_namespaces_override(chart: helm.Chart) -> None:
    rendered = _render(chart, {"converter": {"serviceAccount": {"namespaces": ["ml", "research"]}}})
    accounts = [
        o
        for o in rendered.of_kind("ServiceAccount")
        if o["metadata"]["name"] == "preshard-converter"
    ]
    assert sorted(a["metadata"]["namespace"] for a in accounts) == ["ml", "research"]
    none = _render(chart, {"converter": {"serviceAccount": {"create": False}}})
    assert [o["metadata"]["name"] for o in none.of_kind("ServiceAccount")] == ["preshard"]
    assert "converter.serviceAccount.create is false" in none.notes


def test_rbac_values_mirror_required_rbac(chart: helm.Chart) -> None:
    values = chart.values["rbac"]
    assert _triples(values["namespacedRules"]) == _required_rbac(namespaced=True)
    assert _triples(values["clusterRules"]) == _required_rbac(namespaced=False)
    # one values rule per REQUIRED_RBAC rule, in the same order (easy to review side by side)
    from preshard.k8s.rbac import REQUIRED_RBAC

    as_values = [
        {"apiGroups": list(r.api_groups), "resources": list(r.resources), "verbs": list(r.verbs)}
        for r in REQUIRED_RBAC
    ]
    assert values["namespacedRules"] + values["clusterRules"] == as_values


# ---------------------------------------------------------------------------------------
# metrics


def test_service_monitor(default: Rendered, custom: Rendered) -> None:
    assert default.of_kind("ServiceMonitor") == []
    sm = custom.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = custom.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert set(sm["spec"]) == {"namespaceSelector", "selector", "endpoints"}


def test_service_monitor_needs_the_service(chart: helm.Chart) -> None:
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(
        helm.HelmRenderError,
        match=r"metrics\.serviceMonitor\.enabled needs metrics\.service\.enabled",
    ):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------------
# CRD


def test_chart_crd_is_a_copy_of_the_canonical_crd(chart: helm.Chart) -> None:
    canonical = ROOT / "crds" / CRD_NAME
    copy = CHART / "crds" / CRD_NAME
    assert canonical.is_file(), f"{canonical} is missing"
    assert copy.is_file(), f"{copy} is missing: run 'make crd-sync'"
    assert copy.read_bytes() == canonical.read_bytes(), "chart CRD differs: run 'make crd-sync'"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_NAME]
    crds = chart.crds
    assert [c["filename"] for c in crds] == [f"preshard/crds/{CRD_NAME}"]
    doc = yaml.safe_load(crds[0]["data"])
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == "shardedcheckpoints.preshard.io"


def test_notes_sample_is_a_valid_sharded_checkpoint(default: Rendered) -> None:
    notes = default.notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/preshard" in notes
    match = re.search(r"<<'YAML' \| kubectl -n NAMESPACE apply -f -\n(.*?)\n\s*YAML\n", notes, re.S)
    assert match, notes
    sample = yaml.safe_load(_dedent(match.group(1)))
    assert sample["kind"] == "ShardedCheckpoint"
    crd = yaml.safe_load((ROOT / "crds" / CRD_NAME).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    jsonschema.validate(sample["spec"], version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    from preshard.core.spec import parse_spec

    parse_spec(sample["spec"])


def _dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


# ---------------------------------------------------------------------------------------
# values.yaml and values.schema.json


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"imageTag": "x"}, r"at '': additional properties 'imageTag' not allowed"),
        ({"converter": {"gpu": 1}}, r"at '/converter': additional properties 'gpu' not allowed"),
        ({"image": {"tag": 1}}, r"at '/image/tag': got number, want string"),
        ({"watchNamespaces": "team-a"}, r"at '/watchNamespaces': got string, want array"),
        ({"jobTTLSeconds": "1d"}, r"at '/jobTTLSeconds': got string, want integer"),
        ({"logLevel": "trace"}, r"at '/logLevel': value must be one of 'info', 'debug'"),
        ({"image": {"pullPolicy": "Sometimes"}}, r"at '/image/pullPolicy': value must be one of"),
        ({"converter": {"image": {"tag": "latest"}}}, r"at '/converter/image/tag'"),
        ({"watchNamespaces": ["Team_A"]}, r"at '/watchNamespaces/0'"),
        ({"metrics": {"port": 70000}}, r"at '/metrics/port'"),
        (
            {"metrics": {"serviceMonitor": {"interval": "often"}}},
            r"at '/metrics/serviceMonitor/interval'",
        ),
        (
            {
                "rbac": {
                    "clusterRules": [{"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]}]
                }
            },
            r"at '/rbac/clusterRules/0/apiGroups/0'",
        ),
        (
            {
                "rbac": {
                    "namespacedRules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]
                }
            },
            r"at '/rbac/namespacedRules/0/verbs/0'",
        ),
        (
            {"securityContext": {"runAsUserr": 1}},
            r"at '/securityContext': additional properties 'runAsUserr'",
        ),
        ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, r"at '/tolerations/0/operator'"),
        ({"s3": {"endpoint": "minio:9000"}}, r"at '/s3/endpoint'"),
    ],
)
def test_schema_rejects_bad_values(
    chart: helm.Chart, values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=expected):
        chart.validate_schema(values)
    # `helm install/upgrade/template` validate the same way before rendering
    with pytest.raises(helm.HelmValuesError, match=expected):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_defaults_and_custom(chart: helm.Chart) -> None:
    chart.validate_schema({})
    chart.validate_schema(CUSTOM_VALUES)


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        paths: set[tuple[str, ...]] = set()
        for key, value in node.items():
            paths |= _leaf_paths(value, (*prefix, key))
        return paths
    return {prefix}


def _schema_allows(schema: dict[str, Any], path: tuple[str, ...], root: dict[str, Any]) -> bool:
    node = schema
    for key in path:
        while "$ref" in node:
            node = root["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        props = node.get("properties", {})
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return False
    return True


def test_schema_is_strict_and_covers_every_value(chart: helm.Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart.values)
    for path in _leaf_paths(chart.values):
        assert _schema_allows(schema, path, schema), (
            f"values key {'.'.join(path)} not in the schema"
        )

    # every object schema either lists its properties strictly or types its values
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and where not in ("/properties/global",)
                and "properties" in node
            ):
                assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "")


def test_every_values_key_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_line = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.-]*):")
    undocumented = []
    list_item_indent: int | None = None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped.startswith("- "):
            list_item_indent = indent if list_item_indent is None else min(list_item_indent, indent)
            continue
        if list_item_indent is not None and stripped and indent > list_item_indent:
            continue  # inside a list item (e.g. an RBAC rule), documented by the list's comment
        list_item_indent = None
        match = key_line.match(line)
        if not match:
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            undocumented.append(f"line {i + 1}: {match['key']}")
    assert undocumented == []
