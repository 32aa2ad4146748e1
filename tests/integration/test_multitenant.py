"""Two tenants on one operator (docs/security.md): the whole product on 127.0.0.1
(preshard_dev.stack.LocalStack: the API emulator over HTTP, ``rclone serve s3``, the real
operator as a subprocess and the local Job runner playing the Job controller and the
kubelet). Conversions use the stand-in worker (``preshard_dev.standin``: the real CLI
parser, S3 publish and termination message, small fake shards instead of vLLM); purge
Jobs run the real ``preshard purge``.

Namespace ``team-a`` owns checkpoints; namespace ``team-b`` tries to hurt it: a failed
resource squatting the parent prefix, a ``deletionPolicy: Delete`` resource on the
parent prefix that waits for a missing Secret and is then deleted, a smuggled image,
service account, priority class and toleration, and environment variables that
redirect credentials or code. Every check is on what really happened: objects in S3,
Jobs in the API, conditions, Events, and what the operator asked the API server for.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest

from preshard_dev.stack import LocalStack
from preshard_dev.standin import standin_weights

from .conftest import wait_for

STANDIN = {"preshard": [sys.executable, "-m", "preshard_dev.standin"]}
A, B = "team-a", "team-b"
BUCKET = "preshard-checkpoints"
OPERATOR_ENV = {
    # per-namespace identities; the operator's default policy otherwise (own image
    # repository, the namespace's own ServiceAccount, no priority class or toleration)
    "PRESHARD_NAMESPACE_SERVICE_ACCOUNTS": json.dumps(
        {A: "team-a-converter", B: "team-b-converter"}
    ),
    # the metadata-only Secret existence check (what the chart's namespaced mode sets)
    "PRESHARD_SECRET_CHECK": "metadata",
    "PRESHARD_CONVERTER_IMAGE": "registry.example.com/ml/preshard-converter:0.1.0",
}


def doc(name: str, output: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": {"uri": "s3://preshard-models/tiny-llama/"},
        "tensorParallelSize": 2,
        # a file size of its own gives every resource its own conversion identity, so each
        # one converts (this module is about tenancy; a copy is tests/e2e/test_steps)
        "output": {
            "uri": output,
            "credentialsSecret": "preshard-s3",
            "maxFileSize": f"{1 + zlib.crc32(name.encode()) % 4096}Mi",
        },
        "converter": {"backoffLimit": 0, "activeDeadlineSeconds": 600},
    }
    body.update(spec)
    return {
        "apiVersion": "preshard.io/v1alpha1",
        "kind": "ShardedCheckpoint",
        "metadata": {"name": name},
        "spec": body,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    st = LocalStack(
        tmp_path_factory.mktemp("multitenant"),
        operator_env=OPERATOR_ENV,
        runner_options={"command_map": STANDIN},
        namespaces=(A, B),
    )
    st.start()
    try:
        # a source for the stand-in (it only checks that the source exists)
        st.s3_client().put_object(
            Bucket="preshard-models", Key="tiny-llama/config.json", Body=b"{}"
        )
        # the preflight Job wants a config.json and *.safetensors weights
        st.s3_client().put_object(
            Bucket="preshard-models", Key="tiny-llama/model.safetensors", Body=standin_weights()
        )
        yield st
    finally:
        st.stop()


def status(stack: LocalStack, ns: str, name: str) -> dict[str, Any]:
    return dict((stack.checkpoint(ns, name) or {}).get("status") or {})


def ready(stack: LocalStack, ns: str, name: str) -> dict[str, Any]:
    conds = status(stack, ns, name).get("conditions") or []
    return next((dict(c) for c in conds if c["type"] == "Ready"), {})


def wait_ready(
    stack: LocalStack, ns: str, name: str, reason: str, timeout: float = 90
) -> dict[str, Any]:
    try:
        return dict(
            wait_for(
                lambda: (c := ready(stack, ns, name)).get("reason") == reason and c,
                timeout,
                what=f"{ns}/{name} Ready reason {reason} (now {ready(stack, ns, name)})",
            )
        )
    except AssertionError as exc:
        lines = [ln for ln in stack.operator_log().splitlines() if name in ln and "Timer" not in ln]
        now = ready(stack, ns, name)
        raise AssertionError(
            f"{exc}\nReady now: {now}\n--- operator log ({name}) ---\n" + "\n".join(lines[-30:])
        ) from None


def all_jobs(stack: LocalStack, ns: str) -> list[dict[str, Any]]:
    return [
        stack.api.sanitize_for_serialization(j) for j in stack.batch.list_namespaced_job(ns).items
    ]


def events(stack: LocalStack, ns: str, name: str) -> list[dict[str, Any]]:
    return [e for e in stack.events(ns) if (e.get("involvedObject") or {}).get("name") == name]


@pytest.fixture(scope="module")
def team_a_published(stack: LocalStack) -> dict[str, int]:
    """team-a's checkpoint at s3://preshard-checkpoints/shared/team-a-llama/ (published)."""
    stack.apply(doc("llama", f"s3://{BUCKET}/shared/team-a-llama/", deletionPolicy="Delete"), A)
    wait_ready(stack, A, "llama", "Published")
    objects = stack.list_prefix(BUCKET, "shared/team-a-llama/")
    assert "shared/team-a-llama/preshard-manifest.json" in objects
    return objects


def test_the_conversion_pod_runs_as_the_namespaces_own_identity(
    stack: LocalStack, team_a_published: dict[str, int]
) -> None:
    (job,) = [
        j
        for j in all_jobs(stack, A)
        if "llama" in j["metadata"]["name"]
        and j["metadata"]["labels"]["app.kubernetes.io/component"] == "converter"
    ]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "team-a-converter"
    assert pod["containers"][0]["image"] == OPERATOR_ENV["PRESHARD_CONVERTER_IMAGE"]


def test_a_failed_squatter_on_the_parent_prefix_blocks_nobody_and_purges_nothing(
    stack: LocalStack,
) -> None:
    # team-b claims the parent prefix first; its source does not exist, so it fails
    # (the stand-in exits 3, SourceNotFound) without ever publishing
    squat = doc(
        "squat",
        f"s3://{BUCKET}/models/",
        deletionPolicy="Delete",
        source={"uri": "s3://preshard-models/does-not-exist/"},
    )
    stack.apply(squat, B)
    wait_ready(stack, B, "squat", "SourceNotFound")
    # team-a's resource below it is not blocked by the failed claim (before: OutputConflict
    # for ever, naming team-b/squat)
    stack.apply(doc("nested", f"s3://{BUCKET}/models/team-a-nested/", deletionPolicy="Delete"), A)
    wait_ready(stack, A, "nested", "Published")
    nested = stack.list_prefix(BUCKET, "models/team-a-nested/")
    assert "models/team-a-nested/preshard-manifest.json" in nested
    # deleting the squatter (deletionPolicy: Delete) runs no purge Job: it never published
    stack.delete_checkpoint(B, "squat")
    wait_for(lambda: stack.checkpoint(B, "squat") is None, 60, what="squat gone")
    assert [j for j in all_jobs(stack, B) if "purge" in j["metadata"]["name"]] == []
    skipped = wait_for(
        lambda: [e for e in events(stack, B, "squat") if e["reason"] == "PurgeSkipped"],
        30,
        what="a PurgeSkipped event",
    )
    # it failed in its preflight (the source does not exist): it never wrote there
    assert "nothing deleted" in skipped[-1]["message"]
    assert stack.list_prefix(BUCKET, "models/team-a-nested/") == nested  # every object kept


def test_a_non_owner_on_the_parent_prefix_never_purges_the_owners_checkpoint(
    stack: LocalStack, team_a_published: dict[str, int]
) -> None:
    # team-b on the parent of team-a's published checkpoint, deletionPolicy: Delete, with a
    # Secret it does not have: before, the Secret check ran first (CredentialsSecretNotFound,
    # not OutputConflict) and deleting it ran a purge Job over s3://.../shared/
    parent = doc("parent", f"s3://{BUCKET}/shared/", deletionPolicy="Delete")
    parent["spec"]["output"]["credentialsSecret"] = "not-there"
    stack.apply(parent, B)
    cond = wait_ready(stack, B, "parent", "OutputConflict")
    # the message names no other tenant's namespace or resource
    assert "team-a" not in cond["message"] and "llama" not in cond["message"]
    assert "another namespace" in cond["message"]
    assert [j for j in all_jobs(stack, B) if "parent" in j["metadata"]["name"]] == []
    stack.delete_checkpoint(B, "parent")
    wait_for(lambda: stack.checkpoint(B, "parent") is None, 60, what="parent gone")
    assert [j for j in all_jobs(stack, B) if "purge" in j["metadata"]["name"]] == []
    wait_for(
        lambda: any(e["reason"] == "PurgeSkipped" for e in events(stack, B, "parent")),
        30,
        what="a PurgeSkipped event",
    )
    assert stack.list_prefix(BUCKET, "shared/team-a-llama/") == team_a_published
    assert ready(stack, A, "llama")["reason"] == "Published"


@pytest.mark.parametrize(
    ("converter", "field"),
    [
        ({"image": "attacker.example/miner:latest"}, "spec.converter.image"),
        ({"serviceAccountName": "team-a-converter"}, "spec.converter.serviceAccountName"),
        ({"priorityClassName": "system-node-critical"}, "spec.converter.priorityClassName"),
        ({"tolerations": [{"operator": "Exists"}]}, "spec.converter.tolerations[0]"),
        (
            {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}},
            "spec.converter.nodeSelector[node-role.kubernetes.io/control-plane]",
        ),
    ],
)
def test_a_smuggled_pod_setting_gets_a_policy_violation_and_no_job(
    stack: LocalStack, converter: dict[str, Any], field: str
) -> None:
    name = "smuggle-" + next(iter(converter)).lower()
    stack.apply(doc(name, f"s3://{BUCKET}/team-b/{name}/", converter=converter), B)
    cond = wait_ready(stack, B, name, "PolicyViolation")
    assert cond["status"] == "False"
    assert field.split("[")[0] in cond["message"]  # the message names the field
    assert cond["message"].endswith("(no Job was created)")
    assert status(stack, B, name).get("jobName") is None
    assert [j for j in all_jobs(stack, B) if name in j["metadata"]["name"]] == []
    wait_for(
        lambda: any(
            e["reason"] == "PolicyViolation" and e["type"] == "Warning"
            for e in events(stack, B, name)
        ),
        30,
        what="a PolicyViolation Warning event",
    )


def test_a_published_resource_switched_to_another_tenants_identity_purges_nothing(
    stack: LocalStack,
) -> None:
    stack.apply(doc("switch", f"s3://{BUCKET}/team-b/switch/", deletionPolicy="Delete"), B)
    wait_ready(stack, B, "switch", "Published")
    published = stack.list_prefix(BUCKET, "team-b/switch/")
    # converter fields may change in place: team-b names team-a's cloud identity, then
    # deletes, hoping the purge Job runs as team-a
    stack.custom.patch_namespaced_custom_object(
        "preshard.io",
        "v1alpha1",
        B,
        "shardedcheckpoints",
        "switch",
        {"spec": {"converter": {"serviceAccountName": "team-a-converter"}}},
    )
    wait_ready(stack, B, "switch", "PolicyViolation")
    stack.delete_checkpoint(B, "switch")
    wait_for(lambda: stack.checkpoint(B, "switch") is None, 60, what="switch gone")
    assert [
        j
        for j in all_jobs(stack, B)
        if "switch" in j["metadata"]["name"] and "purge" in j["metadata"]["name"]
    ] == []
    skipped = wait_for(
        lambda: [e for e in events(stack, B, "switch") if e["reason"] == "PurgeSkipped"],
        30,
        what="a PurgeSkipped event",
    )
    assert "serviceAccountName" in skipped[-1]["message"]
    assert stack.list_prefix(BUCKET, "team-b/switch/") == published


@pytest.mark.parametrize("var", ["AWS_CONTAINER_CREDENTIALS_FULL_URI", "LD_PRELOAD", "HF_ENDPOINT"])
def test_env_outside_the_allowlist_is_refused_at_admission(stack: LocalStack, var: str) -> None:
    body = doc("env-" + var.lower().replace("_", "-"), f"s3://{BUCKET}/team-b/env/")
    body["spec"]["converter"]["env"] = [{"name": var, "value": "http://attacker.example/"}]
    with pytest.raises(kubernetes.client.ApiException) as exc:
        stack.apply(body, B)
    assert exc.value.status == 422 and "spec.converter.env[0].name" in str(exc.value.body)


@pytest.mark.parametrize(
    "var",
    ["VLLM_LOGGING_CONFIG_PATH", "VLLM_PLUGINS", "NCCL_NET_PLUGIN", "TORCHINDUCTOR_CACHE_DIR"],
)
def test_env_that_loads_code_is_refused_at_admission(stack: LocalStack, var: str) -> None:
    """Allowed families, but the name loads code or names a path: the CRD's CEL
    rule on spec.converter.env refuses it (the emulator evaluates the CRD's rules)."""
    body = doc("env-" + var.lower().replace("_", "-"), f"s3://{BUCKET}/team-b/env/")
    body["spec"]["converter"]["env"] = [{"name": var, "value": "/work/source/x.json"}]
    with pytest.raises(kubernetes.client.ApiException) as exc:
        stack.apply(body, B)
    assert exc.value.status == 422 and "spec.converter.env" in str(exc.value.body)
    assert "loads code" in str(exc.value.body)


def test_the_operator_never_read_a_secrets_data(
    stack: LocalStack, team_a_published: dict[str, int]
) -> None:
    url = f"{stack.emulator.url}/emulator/stats?by=secret-data"  # type: ignore[union-attr]
    served = json.loads(urllib.request.urlopen(url, timeout=5).read())
    # only the Job runner (playing the kubelet, which resolves secretKeyRef) read Secret
    # data; the operator (kopf, and the kubernetes client: OpenAPI-Generator) never did
    assert set(served) <= {"preshard-jobrunner"}, served
    by_agent = json.loads(
        urllib.request.urlopen(f"{stack.emulator.url}/emulator/stats?by=agent", timeout=5).read()  # type: ignore[union-attr]
    )
    assert by_agent["OpenAPI-Generator"].get("get secrets", 0) >= 1  # it did check (metadata)
    assert not any(
        "list secrets" in k or "watch secrets" in k for k in by_agent["OpenAPI-Generator"]
    )


def test_a_serving_configmap_of_someone_else_is_never_overwritten(stack: LocalStack) -> None:
    foreign = {
        "metadata": {"name": "victim-serving", "labels": {"app": "theirs"}},
        "data": {"MODEL": "s3://theirs/model/"},
    }
    stack.core.create_namespaced_config_map(A, foreign)
    stack.apply(doc("victim", f"s3://{BUCKET}/team-a/victim/"), A)
    cond = wait_ready(stack, A, "victim", "ServingConfigMapConflict")
    assert "victim-serving" in cond["message"]
    cm = stack.configmap(A, "victim-serving")
    assert cm is not None and cm["data"] == {"MODEL": "s3://theirs/model/"}
    assert "serving" not in status(stack, A, "victim")
    # once the name is free, the operator writes its own (the retry timer)
    stack.core.delete_namespaced_config_map("victim-serving", A)
    wait_ready(stack, A, "victim", "Published")
    cm = stack.configmap(A, "victim-serving")
    assert cm is not None and cm["data"]["MODEL"] == f"s3://{BUCKET}/team-a/victim/"


def test_purge_by_the_owner_still_deletes_its_checkpoint(
    stack: LocalStack, team_a_published: dict[str, int]
) -> None:
    stack.delete_checkpoint(A, "llama")
    wait_for(lambda: stack.checkpoint(A, "llama") is None, 90, what="llama purged and gone")
    purges = [j for j in all_jobs(stack, A) if "purge" in j["metadata"]["name"]]
    assert purges, "the owner's purge Job ran"
    c = purges[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:2] == ["purge", "--output"] and "--owner" in c["args"]
    assert c["image"] == OPERATOR_ENV["PRESHARD_CONVERTER_IMAGE"]
    assert purges[0]["spec"]["template"]["spec"]["serviceAccountName"] == "team-a-converter"
    assert stack.list_prefix(BUCKET, "shared/team-a-llama/") == {}
