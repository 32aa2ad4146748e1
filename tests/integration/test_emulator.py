"""Fidelity of the Kubernetes API emulator (preshard_dev.emulator), checked with the
official ``kubernetes`` client and raw HTTP: the behaviour the operator and kubectl rely
on must match a real API server, or integration tests pass against a cluster that does
not exist.

Known differences that remain are listed in the emulator's module docstring; a test
marked ``xfail(strict=True)`` would record one (an XPASS means it was fixed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3

from preshard_dev.emulator import EmulatorServer

from .conftest import CRD, GROUP, PLURAL, VERSION, K8s, wait_for

TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"
ApiException = kubernetes.client.ApiException
HTTP = urllib3.PoolManager()


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def ns(k8s_api: K8s) -> str:
    return k8s_api.namespace()


def api_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Call ``fn``, expect an ApiException; return (HTTP status, decoded Status body)."""
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    exc = info.value
    body = json.loads(exc.body) if exc.body else {}
    return int(exc.status), body


def cr_spec(tp: int = 2, **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": tp,
        "output": {"uri": f"s3://out/{uuid.uuid4().hex[:8]}/tp{tp}/"},
    }
    s.update(extra)
    return s


def cr_body(name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ShardedCheckpoint",
        "metadata": {"name": name, **meta},
        "spec": spec,
    }


def cm(name: str, data: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, **meta}, "data": data or {}}


def raw(
    k8s: K8s, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    r = k8s.http.request(
        method,
        k8s.url + path,
        body=None if body is None else json.dumps(body).encode(),
        headers=hdrs,
        retries=False,
    )
    try:
        return r.status, json.loads(r.data)
    except ValueError:
        return r.status, r.data.decode()


def collect_watch(
    base: str, path: str, count: int, timeout: float = 10, **params: str
) -> list[tuple[str, dict[str, Any]]]:
    """The first ``count`` events of ``GET path?watch=true`` as (type, object); fewer if the
    server ends the watch first. Raw HTTP with ``watch=true`` as kopf and kubectl send it
    (the Python client's ``watch=True`` is tested apart)."""
    query = urllib.parse.urlencode({"watch": "true", "timeoutSeconds": str(int(timeout)), **params})
    r = HTTP.request("GET", f"{base}{path}?{query}", preload_content=False, retries=False)
    try:
        if r.status != 200:
            raise ApiException(status=r.status, reason=r.read().decode())
        out: list[tuple[str, dict[str, Any]]] = []
        buf = b""
        for chunk in r.stream(1024, decode_content=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    ev = json.loads(line)
                    out.append((ev["type"], ev["object"]))
                    if len(out) >= count:
                        return out
        return out
    finally:
        r.close()  # a watch never ends by itself: drop the connection, do not reuse it
        r.release_conn()


def cm_path(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/configmaps"


def cr_path(ns: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"


# ------------------------------------------------------------------------------ discovery


def test_discovery_lists_builtin_and_crd_resources(k8s_api: K8s) -> None:
    groups = kubernetes.client.ApisApi(k8s_api.api).get_api_versions()
    by_name = {g.name: g for g in groups.groups}
    assert by_name[GROUP].preferred_version.group_version == f"{GROUP}/{VERSION}"
    assert "batch" in by_name
    res = kubernetes.client.CustomObjectsApi(k8s_api.api).get_api_resources(GROUP, VERSION)
    names = {r.name: r for r in res.resources}
    sckpt = names[PLURAL]
    assert sckpt.kind == "ShardedCheckpoint"
    assert sckpt.namespaced is True
    assert sckpt.short_names == ["sckpt"]
    assert set(sckpt.verbs) >= {"create", "get", "list", "watch", "patch", "update", "delete"}
    assert f"{PLURAL}/status" in names
    core = {r.name for r in kubernetes.client.CoreV1Api(k8s_api.api).get_api_resources().resources}
    assert {"pods", "pods/log", "pods/status", "configmaps", "secrets", "namespaces"} <= core
    crd = kubernetes.client.ApiextensionsV1Api(k8s_api.api).read_custom_resource_definition(
        f"{PLURAL}.{GROUP}"
    )
    established = {c.type: c.status for c in crd.status.conditions}
    assert established["Established"] == "True"


# ----------------------------------------------------------------------------------- CRUD


def test_create_get_list_sets_identity_and_namespace(k8s_api: K8s, ns: str) -> None:
    created = k8s_api.core.create_namespaced_config_map(ns, cm("one", {"a": "1"}))
    meta = created.metadata
    assert meta.namespace == ns  # taken from the URL
    assert uuid.UUID(meta.uid)
    assert int(meta.resource_version) > 0
    assert meta.creation_timestamp is not None
    got = k8s_api.core.read_namespaced_config_map("one", ns)
    assert got.metadata.uid == meta.uid
    assert got.metadata.resource_version == meta.resource_version
    assert got.data == {"a": "1"}

    k8s_api.core.create_namespaced_config_map(ns, cm("two"))
    lst = k8s_api.core.list_namespaced_config_map(ns)
    assert sorted(i.metadata.name for i in lst.items) == ["one", "two"]
    assert int(lst.metadata.resource_version) >= int(meta.resource_version)
    # other namespaces are not listed; the cluster-wide list has both
    other = k8s_api.namespace()
    k8s_api.core.create_namespaced_config_map(other, cm("three"))
    assert [i.metadata.name for i in k8s_api.core.list_namespaced_config_map(other).items] == [
        "three"
    ]
    everywhere = {
        (i.metadata.namespace, i.metadata.name)
        for i in k8s_api.core.list_config_map_for_all_namespaces().items
    }
    assert {(ns, "one"), (ns, "two"), (other, "three")} <= everywhere


def test_generate_name_and_namespace_mismatch(k8s_api: K8s, ns: str) -> None:
    obj = k8s_api.core.create_namespaced_config_map(
        ns, {"metadata": {"generateName": "gen-"}, "data": {}}
    )
    assert obj.metadata.name.startswith("gen-") and len(obj.metadata.name) > len("gen-")
    status, body = api_error(
        k8s_api.core.create_namespaced_config_map, ns, cm("x", namespace="somewhere-else")
    )
    assert status == 400
    assert body["kind"] == "Status" and body["reason"] == "BadRequest"


def test_merge_json_and_strategic_patches(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("p", {"a": "1", "b": "2"}))
    rv0 = int(k8s_api.core.read_namespaced_config_map("p", ns).metadata.resource_version)

    # merge patch (RFC 7386): null removes a key, others are merged
    merged = k8s_api.core.patch_namespaced_config_map(
        "p",
        ns,
        {"data": {"a": None, "c": "3"}, "metadata": {"labels": {"x": "y"}}},
        _content_type="application/merge-patch+json",
    )
    assert merged.data == {"b": "2", "c": "3"}
    assert merged.metadata.labels == {"x": "y"}
    rv1 = int(merged.metadata.resource_version)
    assert rv1 > rv0

    # JSON patch (RFC 6902): a list body
    patched = k8s_api.core.patch_namespaced_config_map(
        "p",
        ns,
        [
            {"op": "test", "path": "/data/b", "value": "2"},
            {"op": "replace", "path": "/data/b", "value": "22"},
            {"op": "add", "path": "/metadata/labels/z", "value": "w"},
            {"op": "remove", "path": "/data/c"},
        ],
    )
    assert patched.data == {"b": "22"}
    assert patched.metadata.labels == {"x": "y", "z": "w"}
    assert int(patched.metadata.resource_version) > rv1

    # a failing "test" op rejects the whole patch
    status, body = api_error(
        k8s_api.core.patch_namespaced_config_map,
        "p",
        ns,
        [
            {"op": "replace", "path": "/data/b", "value": "never"},
            {"op": "test", "path": "/data/b", "value": "not-it"},
        ],
    )
    assert status == 422 and body["reason"] == "Invalid"
    assert k8s_api.core.read_namespaced_config_map("p", ns).data == {"b": "22"}

    # strategic merge (the client's default for a dict body on core types): maps merge
    smp = k8s_api.core.patch_namespaced_config_map("p", ns, {"data": {"d": "4"}})
    assert smp.data == {"b": "22", "d": "4"}

    # a patch that changes nothing keeps the resourceVersion (no write, no watch event)
    same = k8s_api.core.patch_namespaced_config_map("p", ns, {"data": {"d": "4"}})
    assert same.metadata.resource_version == smp.metadata.resource_version


def test_custom_object_merge_and_json_patch(k8s_api: K8s, ns: str) -> None:
    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("cr", cr_spec())
    )
    out = k8s_api.custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "cr", {"spec": {"converter": {"backoffLimit": 5}}}
    )
    assert out["spec"]["converter"]["backoffLimit"] == 5
    assert out["spec"]["tensorParallelSize"] == 2  # merged, not replaced
    out = k8s_api.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "cr",
        [{"op": "replace", "path": "/spec/converter/backoffLimit", "value": 7}],
        _content_type="application/json-patch+json",
    )
    assert out["spec"]["converter"]["backoffLimit"] == 7


def test_strategic_merge_merges_lists_by_key(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "smp"},
            "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
        },
    )
    pod = k8s_api.core.patch_namespaced_pod(
        "smp", ns, {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}
    )
    assert [(c.name, c.image) for c in pod.spec.containers] == [("a", "a:1"), ("b", "b:2")]


def smp(k8s: K8s, path: str, patch: dict[str, Any]) -> tuple[int, Any]:
    return raw(
        k8s,
        "PATCH",
        path,
        patch,
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )


def test_strategic_merge_directives_and_order(k8s_api: K8s, ns: str) -> None:
    """apimachinery's strategicpatch semantics for the lists preshard's kinds carry."""
    path = f"/api/v1/namespaces/{ns}/pods/dir"
    k8s_api.core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "dir", "finalizers": ["x/a", "x/b"], "labels": {"k": "v"}},
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "image": "a:1",
                        "args": ["--one", "--two"],
                        "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}],
                        "volumeMounts": [{"name": "v", "mountPath": "/data"}],
                    },
                    {"name": "b", "image": "b:1"},
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
        },
    )
    # nested merge by key (env by name, volumeMounts by mountPath); args has no strategy
    status, pod = smp(
        k8s_api,
        path,
        {
            "spec": {
                "containers": [
                    {
                        "name": "a",
                        "args": ["--three"],
                        "env": [{"name": "E2", "value": "22"}, {"name": "E3", "value": "3"}],
                        "volumeMounts": [{"mountPath": "/data", "readOnly": True}],
                    }
                ]
            }
        },
    )
    assert status == 200, pod
    a = pod["spec"]["containers"][0]
    assert a["args"] == ["--three"]  # replaced
    # E2 merged in place, E3 added after it (the patch's order)
    assert [(e["name"], e["value"]) for e in a["env"]] == [("E1", "1"), ("E2", "22"), ("E3", "3")]
    assert a["volumeMounts"] == [{"name": "v", "mountPath": "/data", "readOnly": True}]
    assert a["image"] == "a:1" and [c["name"] for c in pod["spec"]["containers"]] == ["a", "b"]
    # a new container alone goes before the ones the patch does not name
    _, pod = smp(k8s_api, path, {"spec": {"containers": [{"name": "c", "image": "c:1"}]}})
    assert [c["name"] for c in pod["spec"]["containers"]] == ["c", "a", "b"]
    # $patch: delete removes one entry by key; $patch: replace replaces the list
    _, pod = smp(k8s_api, path, {"spec": {"containers": [{"name": "c", "$patch": "delete"}]}})
    assert [c["name"] for c in pod["spec"]["containers"]] == ["a", "b"]
    _, pod = smp(
        k8s_api,
        path,
        {
            "spec": {
                "containers": [
                    {"name": "a", "env": [{"name": "ONLY", "value": "x"}, {"$patch": "replace"}]}
                ]
            }
        },
    )
    assert pod["spec"]["containers"][0]["env"] == [{"name": "ONLY", "value": "x"}]
    # $setElementOrder reorders
    _, pod = smp(
        k8s_api,
        path,
        {"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}},
    )
    assert [c["name"] for c in pod["spec"]["containers"]] == ["b", "a"]
    # finalizers: a set; new ones first, duplicates dropped
    _, pod = smp(k8s_api, path, {"metadata": {"finalizers": ["x/c", "x/a"]}})
    assert pod["metadata"]["finalizers"] == ["x/c", "x/a", "x/b"]
    # an empty list changes nothing on a merge list; $deleteFromPrimitiveList removes
    _, same = smp(k8s_api, path, {"metadata": {"finalizers": []}})
    assert same["metadata"]["finalizers"] == ["x/c", "x/a", "x/b"]
    assert same["metadata"]["resourceVersion"] == pod["metadata"]["resourceVersion"]
    _, pod = smp(
        k8s_api, path, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["x/a", "x/c"]}}
    )
    assert pod["metadata"]["finalizers"] == ["x/b"]
    # null deletes a field; a map merges
    _, pod = smp(k8s_api, path, {"metadata": {"finalizers": None, "labels": {"n": "m"}}})
    assert "finalizers" not in pod["metadata"] and pod["metadata"]["labels"] == {"k": "v", "n": "m"}
    # $patch: replace on a map
    _, pod = smp(k8s_api, path, {"metadata": {"labels": {"only": "this", "$patch": "replace"}}})
    assert pod["metadata"]["labels"] == {"only": "this"}
    # a merge list entry without its key is refused, as apimachinery does
    status, body = smp(k8s_api, path, {"spec": {"containers": [{"image": "nokey"}]}})
    assert status == 500 and "does not contain declared merge key: name" in body["message"]


def test_strategic_merge_of_status_merges_conditions_by_type(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_pod(
        ns, {"metadata": {"name": "st"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    )
    k8s_api.core.patch_namespaced_pod_status(
        "st",
        ns,
        {
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "Initialized", "status": "True"},
                ],
                "containerStatuses": [
                    {"name": "c", "image": "x", "imageID": "", "ready": False, "restartCount": 0}
                ],
            }
        },
    )
    pod = k8s_api.core.patch_namespaced_pod_status(
        "st",
        ns,
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {"name": "c", "image": "x", "imageID": "", "ready": True, "restartCount": 0}
                ],
            }
        },
    )
    conds = [(c.type, c.status) for c in pod.status.conditions]
    assert conds == [("Ready", "True"), ("Initialized", "True")]
    assert [c.ready for c in pod.status.container_statuses] == [True]  # no strategy: replaced
    assert pod.status.phase == "Running"

    k8s_api.batch.create_namespaced_job(ns, _job("stj"))
    k8s_api.batch.patch_namespaced_job_status(
        "stj", ns, {"status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}}
    )
    job = k8s_api.batch.patch_namespaced_job_status(
        "stj", ns, {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    )
    assert [c.type for c in job.status.conditions] == ["Failed", "FailureTarget"]


def test_strategic_merge_owner_references_by_uid(k8s_api: K8s, ns: str) -> None:
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "o1", "uid": "u-1"}
    k8s_api.core.create_namespaced_config_map(ns, cm("refs", ownerReferences=[ref]))
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "o2", "uid": "u-2"}
    out = k8s_api.core.patch_namespaced_config_map(
        "refs", ns, {"metadata": {"ownerReferences": [other]}}
    )
    assert [r.uid for r in out.metadata.owner_references] == ["u-2", "u-1"]
    # a merge patch replaces the list
    out = k8s_api.core.patch_namespaced_config_map(
        "refs",
        ns,
        {"metadata": {"ownerReferences": [other]}},
        _content_type="application/merge-patch+json",
    )
    assert [r.uid for r in out.metadata.owner_references] == ["u-2"]


def test_strategic_merge_of_custom_resource_is_refused(k8s_api: K8s, ns: str) -> None:
    """CRs take JSON and merge patches only, as `kubectl patch` without --type=merge shows."""
    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("smp", cr_spec())
    )
    status, body = api_error(
        k8s_api.custom.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "smp",
        {"spec": {"verify": False}},
        _content_type="application/strategic-merge-patch+json",
    )
    assert status == 415
    assert body["reason"] == "UnsupportedMediaType"
    assert body["message"] == (
        "the body of the request was in an unknown format - accepted media types include: "
        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
    )
    # an unknown patch type is refused for every kind
    status, body = raw(
        k8s_api,
        "PATCH",
        f"{cm_path(ns)}/none",
        {"data": {}},
        headers={"Content-Type": "application/json"},
    )
    assert status == 415 and "application/strategic-merge-patch+json" in body["message"]


def test_delete_then_404_not_found_status(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("gone"))
    k8s_api.core.delete_namespaced_config_map("gone", ns)
    status, body = api_error(k8s_api.core.read_namespaced_config_map, "gone", ns)
    assert status == 404
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["reason"] == "NotFound" and body["code"] == 404
    assert body["details"]["name"] == "gone"
    assert '"gone" not found' in body["message"]
    # deleting, patching or replacing a missing object: 404 as well
    assert api_error(k8s_api.core.delete_namespaced_config_map, "gone", ns)[0] == 404
    assert api_error(k8s_api.core.patch_namespaced_config_map, "gone", ns, {"data": {}})[0] == 404
    assert api_error(k8s_api.core.replace_namespaced_config_map, "gone", ns, cm("gone"))[0] == 404
    # custom objects and a namespace that does not exist
    assert (
        api_error(k8s_api.custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "no")[0]
        == 404
    )
    status, body = api_error(
        k8s_api.core.create_namespaced_config_map, "no-such-namespace", cm("x")
    )
    assert status == 404 and body["reason"] == "NotFound"
    assert "no-such-namespace" in body["message"]
    # an unknown resource type
    status, body = raw(k8s_api, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/nothings")
    assert status == 404 and body["reason"] == "NotFound"


def test_create_twice_409_already_exists(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("dup"))
    status, body = api_error(k8s_api.core.create_namespaced_config_map, ns, cm("dup"))
    assert status == 409
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == 409
    assert body["reason"] == "AlreadyExists"
    assert body["details"]["name"] == "dup" and body["details"]["kind"] == "configmaps"
    assert '"dup" already exists' in body["message"]

    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("dup", cr_spec())
    )
    status, body = api_error(
        k8s_api.custom.create_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("dup", cr_spec()),
    )
    assert status == 409 and body["reason"] == "AlreadyExists"
    assert body["message"] == f'{PLURAL}.{GROUP} "dup" already exists'  # as the API says it
    assert body["details"]["group"] == GROUP


def test_core_group_messages_use_bare_resource(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("msg"))
    _, body = api_error(k8s_api.core.create_namespaced_config_map, ns, cm("msg"))
    assert body["message"] == 'configmaps "msg" already exists'
    _, body = api_error(k8s_api.core.read_namespaced_config_map, "nope", ns)
    assert body["message"] == 'configmaps "nope" not found'
    assert body["details"] == {"name": "nope", "kind": "configmaps"}  # no group for core
    # other groups: resource.group
    _, body = api_error(k8s_api.batch.read_namespaced_job, "nope", ns)
    assert body["message"] == 'jobs.batch "nope" not found'
    assert body["details"] == {"name": "nope", "group": "batch", "kind": "jobs"}
    # a stale resourceVersion names the qualified resource too
    obj = k8s_api.core.read_namespaced_config_map("msg", ns)
    k8s_api.core.patch_namespaced_config_map("msg", ns, {"data": {"a": "b"}})
    _, body = api_error(k8s_api.core.replace_namespaced_config_map, "msg", ns, obj)
    assert body["message"] == (
        'Operation cannot be fulfilled on configmaps "msg": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("msg", cr_spec())
    )
    status, body = api_error(
        k8s_api.custom.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "msg",
        {"metadata": {"resourceVersion": "1"}, "spec": {"verify": False}},
    )
    assert status == 409 and body["reason"] == "Conflict"
    assert body["message"].startswith(f'Operation cannot be fulfilled on {PLURAL}.{GROUP} "msg"')


# ------------------------------------------------------------------ resourceVersion conflicts


def test_update_with_stale_resource_version_conflicts(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("rv", {"n": "0"}))
    first = k8s_api.core.read_namespaced_config_map("rv", ns)
    second = k8s_api.core.read_namespaced_config_map("rv", ns)
    first.data = {"n": "1"}
    updated = k8s_api.core.replace_namespaced_config_map("rv", ns, first)
    assert int(updated.metadata.resource_version) > int(first.metadata.resource_version)
    second.data = {"n": "2"}
    status, body = api_error(k8s_api.core.replace_namespaced_config_map, "rv", ns, second)
    assert status == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]
    assert k8s_api.core.read_namespaced_config_map("rv", ns).data == {"n": "1"}
    # a merge patch carrying a stale resourceVersion is a precondition too
    status, body = api_error(
        k8s_api.core.patch_namespaced_config_map,
        "rv",
        ns,
        {"metadata": {"resourceVersion": first.metadata.resource_version}, "data": {"n": "3"}},
        _content_type="application/merge-patch+json",
    )
    assert status == 409 and body["reason"] == "Conflict"
    # the current resourceVersion passes
    ok = k8s_api.core.patch_namespaced_config_map(
        "rv",
        ns,
        {"metadata": {"resourceVersion": updated.metadata.resource_version}, "data": {"n": "3"}},
        _content_type="application/merge-patch+json",
    )
    assert ok.data == {"n": "3"}


def test_custom_object_replace_conflict(k8s_api: K8s, ns: str) -> None:
    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("put", cr_spec())
    )
    obj = k8s_api.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "put")
    obj["spec"]["verify"] = False
    new = k8s_api.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "put", obj)
    assert new["spec"]["verify"] is False
    assert new["metadata"]["generation"] == 2
    obj["spec"]["verify"] = True  # still the old resourceVersion
    status, body = api_error(
        k8s_api.custom.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "put", obj
    )
    assert status == 409 and body["reason"] == "Conflict"


# -------------------------------------------------------------- generation and status subresource


def test_generation_counts_spec_changes_only(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    obj = c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("gen", cr_spec()))
    assert obj["metadata"]["generation"] == 1
    rv = int(obj["metadata"]["resourceVersion"])

    obj = c.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "gen", {"spec": {"converter": {"backoffLimit": 4}}}
    )
    assert obj["metadata"]["generation"] == 2
    assert int(obj["metadata"]["resourceVersion"]) > rv
    rv = int(obj["metadata"]["resourceVersion"])

    obj = c.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "gen", {"status": {"phase": "Running", "observedGeneration": 2}}
    )
    assert obj["metadata"]["generation"] == 2  # status is not the spec
    assert obj["status"]["phase"] == "Running"
    assert int(obj["metadata"]["resourceVersion"]) > rv
    rv = int(obj["metadata"]["resourceVersion"])

    obj = c.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "gen",
        {"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}},
    )
    assert obj["metadata"]["generation"] == 2  # neither is metadata
    assert int(obj["metadata"]["resourceVersion"]) > rv

    # the client cannot set generation, uid or creationTimestamp
    before = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gen")["metadata"]
    obj = c.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "gen",
        {"metadata": {"generation": 99, "uid": "x", "creationTimestamp": "2000-01-01T00:00:00Z"}},
    )
    for k in ("generation", "uid", "creationTimestamp"):
        assert obj["metadata"][k] == before[k]


def test_status_subresource_separates_spec_and_status(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    # status sent on create is dropped for a resource with a status subresource
    created = c.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        {**cr_body("sub", cr_spec(tp=2)), "status": {"phase": "Succeeded"}},
    )
    assert "status" not in created

    # the main endpoint ignores status
    obj = c.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "sub",
        {"spec": {"verify": False}, "status": {"phase": "Failed"}},
    )
    assert obj["spec"]["verify"] is False
    assert "status" not in obj

    # the status subresource ignores spec and metadata
    obj = c.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "sub",
        {
            "spec": {"verify": True, "converter": {"backoffLimit": 9}},
            "metadata": {"labels": {"from": "status"}},
            "status": {"phase": "Running"},
        },
    )
    assert obj["status"] == {"phase": "Running"}
    assert obj["spec"]["verify"] is False
    assert "converter" not in obj["spec"]
    assert not (obj["metadata"].get("labels") or {}).get("from")

    # PUT on the main endpoint with another status keeps the stored status
    cur = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "sub")
    cur["status"] = {"phase": "Failed"}
    cur["spec"]["verify"] = True
    out = c.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "sub", cur)
    assert out["status"] == {"phase": "Running"}
    assert out["spec"]["verify"] is True
    # PUT on /status with another spec keeps the stored spec
    out["status"] = {"phase": "Succeeded"}
    out["spec"]["verify"] = False
    out2 = c.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "sub", out)
    assert out2["status"] == {"phase": "Succeeded"}
    assert out2["spec"]["verify"] is True


def test_create_drops_status_of_kinds_with_a_status_subresource(k8s_api: K8s, ns: str) -> None:
    """PrepareForCreate resets status for Pods (Pending + QoS class), Jobs (empty) and
    Namespaces (Active); it is written through /status afterwards."""
    pod = k8s_api.core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "st0"},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Succeeded", "message": "made up"},
        },
    )
    assert pod.status.phase == "Pending" and pod.status.message is None
    assert pod.status.qos_class == "BestEffort"
    pod = k8s_api.core.patch_namespaced_pod_status("st0", ns, {"status": {"phase": "Running"}})
    assert pod.status.phase == "Running"
    # the main endpoint does not write status
    pod = k8s_api.core.patch_namespaced_pod(
        "st0", ns, {"status": {"phase": "Failed"}, "metadata": {"labels": {"a": "b"}}}
    )
    assert pod.status.phase == "Running" and pod.metadata.labels == {"a": "b"}

    job_body = _job("st0")
    job_body["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    k8s_api.batch.create_namespaced_job(ns, job_body)
    status, raw_job = raw(k8s_api, "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/st0")
    assert status == 200 and raw_job["status"] == {}
    job = k8s_api.batch.patch_namespaced_job_status("st0", ns, {"status": {"active": 1}})
    assert job.status.active == 1 and job.status.succeeded is None

    name = k8s_api.namespace()
    got = k8s_api.core.read_namespace(name)
    assert got.status.phase == "Active" and got.spec.finalizers == ["kubernetes"]


@pytest.mark.parametrize(
    ("resources", "qos"),
    [
        ({}, "BestEffort"),
        ({"requests": {"cpu": "100m"}}, "Burstable"),
        ({"limits": {"cpu": "1", "memory": "1Gi"}}, "Guaranteed"),  # requests default to limits
        (
            {
                "requests": {"cpu": "1000m", "memory": "1Gi"},
                "limits": {"cpu": 1, "memory": "1024Mi"},
            },
            "Guaranteed",
        ),
        (
            {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
            "Burstable",
        ),
        ({"limits": {"nvidia.com/gpu": 1}}, "BestEffort"),  # only cpu and memory count
    ],
)
def test_pod_qos_class(k8s_api: K8s, ns: str, resources: dict[str, Any], qos: str) -> None:
    pod = k8s_api.core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "qos"},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": resources}]},
        },
    )
    assert pod.status.qos_class == qos


def test_put_without_resource_version(k8s_api: K8s, ns: str) -> None:
    """Custom resources (and CRDs, Leases) refuse unconditional updates; ConfigMaps, Pods,
    Jobs accept them."""
    c = k8s_api.custom
    c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("norv", cr_spec()))
    obj = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "norv")
    del obj["metadata"]["resourceVersion"]
    obj["spec"]["verify"] = False
    status, body = api_error(
        c.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "norv", obj
    )
    assert status == 422 and body["reason"] == "Invalid"
    assert body["message"] == (
        f'{PLURAL}.{GROUP} "norv" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
        "must be specified for an update"
    )
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: 0x0: must be specified for an update",
            "field": "metadata.resourceVersion",
        }
    ]
    # the status subresource too
    obj["status"] = {"phase": "Running"}
    assert (
        api_error(
            c.replace_namespaced_custom_object_status, GROUP, VERSION, ns, PLURAL, "norv", obj
        )[0]
        == 422
    )
    # a patch needs no resourceVersion
    assert (
        c.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, "norv", {"spec": {"verify": False}}
        )["spec"]["verify"]
        is False
    )
    # a ConfigMap may be replaced unconditionally
    k8s_api.core.create_namespaced_config_map(ns, cm("norv", {"a": "1"}))
    out = k8s_api.core.replace_namespaced_config_map("norv", ns, cm("norv", {"a": "2"}))
    assert out.data == {"a": "2"}


def test_status_subresource_is_validated_against_the_schema(k8s_api: K8s, ns: str) -> None:
    k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("badstatus", cr_spec())
    )
    status, body = api_error(
        k8s_api.custom.patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "badstatus",
        {"status": {"phase": "Bogus"}},
    )
    assert status == 422 and "status.phase" in body["message"]
    assert body["message"] == (
        f'ShardedCheckpoint.{GROUP} "badstatus" is invalid: status.phase: Unsupported value: '
        '"Bogus": supported values: "Pending", "Running", "Succeeded", "Failed", "Deleting"'
    )
    # unknown status fields are pruned, defaults and the rest kept
    out = k8s_api.custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "badstatus",
        {"status": {"phase": "Running", "bogus": 1, "progress": {"stage": "Converting", "x": 2}}},
    )
    assert out["status"] == {"phase": "Running", "progress": {"stage": "Converting"}}
    # conditions are a map keyed by type (x-kubernetes-list-type: map): no duplicates
    status, body = api_error(
        k8s_api.custom.patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "badstatus",
        {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "Ready", "status": "False"},
                ]
            }
        },
    )
    assert status == 422
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueDuplicate",
            "message": 'Duplicate value: map[string]interface {}{"type":"Ready"}',
            "field": "status.conditions[1]",
        }
    ]
    # a PUT of /status is validated as well
    obj = k8s_api.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "badstatus")
    obj["status"]["progress"]["bytesDone"] = -1
    status, body = api_error(
        k8s_api.custom.replace_namespaced_custom_object_status,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "badstatus",
        obj,
    )
    assert status == 422
    assert "status.progress.bytesDone: Invalid value: -1: status.progress.bytesDone in body "
    "should be greater than or equal to 0" in body["message"]


# ------------------------------------------------------------------ schema and CEL admission


def test_schema_rejects_invalid_values_with_422_and_field_path(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    cases = [
        ("tp0", cr_spec(tp=0), "spec.tensorParallelSize"),
        ("quant", cr_spec(quantization="int3"), "spec.quantization"),
        ("src", cr_spec(source={"uri": "ftp://nope"}), "spec.source.uri"),
        ("kind", cr_spec(verify="yes"), "spec.verify"),
    ]
    for name, spec, field in cases:
        status, body = api_error(
            c.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, cr_body(name, spec)
        )
        assert status == 422, (name, body)
        assert body["kind"] == "Status" and body["reason"] == "Invalid"
        assert field in body["message"], (name, body["message"])
        assert field in [cause["field"] for cause in body["details"]["causes"]], body
        assert c.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"] == []
    # updates are validated as well
    c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("ok", cr_spec()))
    status, body = api_error(
        c.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "ok",
        {"spec": {"converter": {"backoffLimit": 99}}},
    )
    assert status == 422 and "spec.converter.backoffLimit" in body["message"]


def test_missing_required_field_names_the_field(k8s_api: K8s, ns: str) -> None:
    spec = cr_spec()
    del spec["output"]
    _, body = api_error(
        k8s_api.custom.create_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("req", spec),
    )
    assert "spec.output" in [c["field"] for c in body["details"]["causes"]]
    assert (
        body["message"]
        == f'ShardedCheckpoint.{GROUP} "req" is invalid: spec.output: Required value'
    )
    assert body["details"] == {
        "name": "req",
        "group": GROUP,
        "kind": "ShardedCheckpoint",
        "causes": [
            {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.output"}
        ],
    }
    # several errors: in brackets, as apimachinery's aggregate prints them
    spec = cr_spec(tp=0)
    del spec["output"]
    _, body = api_error(
        k8s_api.custom.create_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("req2", spec),
    )
    assert body["message"] == (
        f'ShardedCheckpoint.{GROUP} "req2" is invalid: [spec.output: Required value, '
        "spec.tensorParallelSize: Invalid value: 0: spec.tensorParallelSize in body should be "
        "greater than or equal to 1]"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            cr_spec(verify="yes"),
            'spec.verify: Invalid value: "string": spec.verify in body must be of type '
            'boolean: "string"',
        ),
        (
            cr_spec(quantization="int3"),
            'spec.quantization: Unsupported value: "int3": supported values: ',
        ),
        (
            cr_spec(tp=0),
            "spec.tensorParallelSize: Invalid value: 0: spec.tensorParallelSize in body should "
            "be greater than or equal to 1",
        ),
    ],
)
def test_schema_error_wording(k8s_api: K8s, ns: str, spec: dict[str, Any], message: str) -> None:
    """Worded as apiextensions' validator reports (field.Error)."""
    _, body = api_error(
        k8s_api.custom.create_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("words", spec),
    )
    assert body["message"].startswith(f'ShardedCheckpoint.{GROUP} "words" is invalid: {message}')
    # a create without a name
    status, body = raw(k8s_api, "POST", cm_path(ns), {"metadata": {}, "data": {}})
    assert status == 422
    assert body["message"] == (
        'ConfigMap "" is invalid: metadata.name: Required value: name or generateName is required'
    )


def test_schema_defaults_pruning_and_strict_field_validation(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    spec = cr_spec()
    spec["bogusField"] = 1
    obj = c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("prune", spec))
    assert "bogusField" not in obj["spec"]  # pruned
    assert obj["spec"]["pipelineParallelSize"] == 1  # defaults
    assert obj["spec"]["dtype"] == "auto"
    assert obj["spec"]["verify"] is True
    assert obj["spec"]["deletionPolicy"] == "Retain"
    status, body = api_error(
        c.create_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("strict", spec),
        field_validation="Strict",
    )
    # the decoder refuses it: 400 BadRequest, as `kubectl apply --validate=strict` shows
    assert status == 400 and body["reason"] == "BadRequest"
    assert body["message"] == (
        'ShardedCheckpoint in version "v1alpha1" cannot be handled as a ShardedCheckpoint: '
        'strict decoding error: unknown field "spec.bogusField"'
    )


def test_cel_immutable_fields(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("cel", cr_spec(tp=2)))
    for patch, field in [
        ({"spec": {"tensorParallelSize": 4}}, "spec.tensorParallelSize"),
        ({"spec": {"source": {"uri": "s3://models/other/"}}}, "spec.source.uri"),
        ({"spec": {"quantization": "fp8"}}, "spec.quantization"),  # adding counts too
        ({"spec": {"dtype": "bfloat16"}}, "spec.dtype"),
    ]:
        status, body = api_error(
            c.patch_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "cel", patch
        )
        assert status == 422, (patch, body)
        assert body["reason"] == "Invalid"
        assert f"{field} is immutable" in body["message"], body["message"]
    obj = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "cel")
    assert obj["spec"]["tensorParallelSize"] == 2 and "quantization" not in obj["spec"]
    assert obj["metadata"]["generation"] == 1
    # the same value, or a mutable field, passes
    ok = c.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "cel",
        {"spec": {"tensorParallelSize": 2, "converter": {"image": "other:1"}}},
    )
    assert ok["spec"]["converter"]["image"] == "other:1"
    assert ok["metadata"]["generation"] == 2
    # dtype: auto is the default, so setting it explicitly is no change
    ok = c.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "cel", {"spec": {"dtype": "auto"}}
    )
    assert ok["spec"]["dtype"] == "auto"


# ------------------------------------------------------------------------------ watches


def test_watch_delivers_events_in_order_and_resumes(k8s_api: K8s, ns: str) -> None:
    start_rv = k8s_api.core.list_namespaced_config_map(ns).metadata.resource_version
    events: list[tuple[str, dict[str, Any]]] = []

    def watch() -> None:
        events.extend(collect_watch(k8s_api.url, cm_path(ns), 3, resourceVersion=start_rv))

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.2)
    k8s_api.core.create_namespaced_config_map(ns, cm("w", {"v": "1"}))
    k8s_api.core.patch_namespaced_config_map("w", ns, {"data": {"v": "2"}})
    k8s_api.core.delete_namespaced_config_map("w", ns)
    t.join(15)
    assert [e[0] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e[1]["data"]["v"] for e in events] == ["1", "2", "2"]
    rvs = [int(e[1]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    assert all(e[1]["metadata"]["name"] == "w" for e in events)

    # resume after the ADDED event: only what came later
    resumed = collect_watch(k8s_api.url, cm_path(ns), 2, resourceVersion=str(rvs[0]))
    assert [(t, int(o["metadata"]["resourceVersion"])) for t, o in resumed] == [
        ("MODIFIED", rvs[1]),
        ("DELETED", rvs[2]),
    ]


def test_watch_without_resource_version_starts_with_current_objects(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("a"))
    k8s_api.core.create_namespaced_config_map(ns, cm("b"))
    evs = collect_watch(k8s_api.url, cm_path(ns), 2)
    assert sorted((t, o["metadata"]["name"]) for t, o in evs) == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_of_custom_objects_with_label_selector(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    rv = c.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["metadata"]["resourceVersion"]
    c.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("skip", cr_spec(), labels={"team": "b"})
    )
    c.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("keep", cr_spec(), labels={"team": "a"})
    )
    c.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "keep", {"status": {"phase": "Pending"}}
    )
    evs = collect_watch(k8s_api.url, cr_path(ns), 2, labelSelector="team=a", resourceVersion=rv)
    assert [(t, o["metadata"]["name"]) for t, o in evs] == [("ADDED", "keep"), ("MODIFIED", "keep")]
    assert evs[1][1]["status"] == {"phase": "Pending"}


def test_watch_too_old_resource_version_is_410_gone(tmp_path: Path) -> None:
    server = EmulatorServer().start()
    try:
        # a short event history, so that an old resourceVersion falls out of it
        server.emulator.store.events = deque(maxlen=3)
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            str(server.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg
        )
        core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
        first = core.create_namespaced_config_map("default", cm("c0"))
        for i in range(1, 6):
            core.create_namespaced_config_map("default", cm(f"c{i}"))
        (ev,) = collect_watch(
            server.url, cm_path("default"), 1, resourceVersion=first.metadata.resource_version
        )
        assert ev[0] == "ERROR"
        assert ev[1]["kind"] == "Status" and ev[1]["code"] == 410
        assert ev[1]["reason"] == "Expired"
        # a recent resourceVersion still resumes
        last = core.list_namespaced_config_map("default").metadata.resource_version
        core.delete_namespaced_config_map("c5", "default")
        evs = collect_watch(server.url, cm_path("default"), 1, resourceVersion=last)
        assert [(t, o["metadata"]["name"]) for t, o in evs] == [("DELETED", "c5")]
    finally:
        server.stop()


def test_python_client_watch_stream(k8s_api: K8s, ns: str) -> None:
    """The official client sends ``watch=True`` (``str(True)``)."""
    k8s_api.core.create_namespaced_config_map(ns, cm("pyw"))
    w = kubernetes.watch.Watch()
    events = []
    for ev in w.stream(k8s_api.core.list_namespaced_config_map, ns, timeout_seconds=1):
        events.append((ev["type"], ev["object"].metadata.name))
        w.stop()
        break
    assert events == [("ADDED", "pyw")]
    # and with bookmarks allowed, as kopf and informers ask for them
    w = kubernetes.watch.Watch()
    events = []
    for ev in w.stream(
        k8s_api.core.list_namespaced_config_map,
        ns,
        timeout_seconds=1,
        allow_watch_bookmarks=True,
    ):
        events.append((ev["type"], ev["object"].metadata.name))
        w.stop()
        break
    assert events == [("ADDED", "pyw")]


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "t", "yes", ""])
def test_watch_flag_true_forms(k8s_api: K8s, ns: str, value: str) -> None:
    """The API server reads the flag with apimachinery's Convert_Slice_string_To_bool:
    anything but ``0`` and ``false`` (any case) is true, the empty string included."""
    k8s_api.core.create_namespaced_config_map(ns, cm("flag"))
    r = HTTP.request(
        "GET",
        f"{k8s_api.url}{cm_path(ns)}?watch={value}&timeoutSeconds=1",
        retries=False,
    )
    lines = [json.loads(line) for line in r.data.splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "flag")]


@pytest.mark.parametrize("value", ["false", "False", "FALSE", "0"])
def test_watch_flag_false_forms_list(k8s_api: K8s, ns: str, value: str) -> None:
    k8s_api.core.create_namespaced_config_map(ns, cm("flag"))
    status, body = raw(k8s_api, "GET", f"{cm_path(ns)}?watch={value}")
    assert status == 200 and body["kind"] == "ConfigMapList"
    assert [i["metadata"]["name"] for i in body["items"]] == ["flag"]


# ------------------------------------------------------------------------------ selectors


def test_label_and_field_selectors(k8s_api: K8s, ns: str) -> None:
    labels = {
        "a1": {"app": "a", "tier": "web"},
        "a2": {"app": "a"},
        "b1": {"app": "b", "tier": "db"},
        "c1": {"app": "c"},
        "none": {},
    }
    for name, lab in labels.items():
        k8s_api.core.create_namespaced_config_map(ns, cm(name, labels=lab))

    def names(**kw: Any) -> list[str]:
        return sorted(
            i.metadata.name for i in k8s_api.core.list_namespaced_config_map(ns, **kw).items
        )

    assert names(label_selector="app=a") == ["a1", "a2"]
    assert names(label_selector="app==a") == ["a1", "a2"]
    assert names(label_selector="app!=a") == ["b1", "c1", "none"]  # no label matches !=
    assert names(label_selector="app in (a, b)") == ["a1", "a2", "b1"]
    assert names(label_selector="app notin (a,b)") == ["c1", "none"]
    assert names(label_selector="tier") == ["a1", "b1"]
    assert names(label_selector="!tier") == ["a2", "c1", "none"]
    assert names(label_selector="app=a,tier") == ["a1"]
    assert names(label_selector="app in (a,b),tier!=db") == ["a1", "a2"]
    assert names(label_selector="app=zzz") == []
    assert names(field_selector="metadata.name=b1") == ["b1"]
    assert names(field_selector="metadata.name!=b1", label_selector="app") == ["a1", "a2", "c1"]
    assert names(field_selector=f"metadata.namespace={ns}") == sorted(labels)
    # custom objects too
    c = k8s_api.custom
    c.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("x", cr_spec(), labels={"env": "prod"})
    )
    c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("y", cr_spec()))
    got = c.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, label_selector="env=prod")
    assert [o["metadata"]["name"] for o in got["items"]] == ["x"]
    # a malformed selector is a 400
    status, body = api_error(
        k8s_api.core.list_namespaced_config_map, ns, label_selector="app in (a"
    )
    assert status == 400 and body["reason"] == "BadRequest"


# ----------------------------------------------------------------------------- finalizers


def test_finalizer_keeps_object_until_removed(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_config_map(
        ns, cm("fin", finalizers=["example.com/keep", "example.com/other"])
    )
    rv = k8s_api.core.list_namespaced_config_map(ns).metadata.resource_version
    k8s_api.core.delete_namespaced_config_map("fin", ns)
    obj = k8s_api.core.read_namespaced_config_map("fin", ns)
    assert obj.metadata.deletion_timestamp is not None
    assert obj.metadata.finalizers == ["example.com/keep", "example.com/other"]
    # a second delete changes nothing
    k8s_api.core.delete_namespaced_config_map("fin", ns)
    again = k8s_api.core.read_namespaced_config_map("fin", ns)
    assert again.metadata.resource_version == obj.metadata.resource_version
    # removing one finalizer keeps it, removing the last deletes it
    k8s_api.core.patch_namespaced_config_map(
        "fin",
        ns,
        {"metadata": {"finalizers": ["example.com/other"]}},
        _content_type="application/merge-patch+json",
    )
    assert k8s_api.core.read_namespaced_config_map("fin", ns).metadata.deletion_timestamp
    k8s_api.core.patch_namespaced_config_map(
        "fin", ns, [{"op": "remove", "path": "/metadata/finalizers"}]
    )
    assert api_error(k8s_api.core.read_namespaced_config_map, "fin", ns)[0] == 404
    evs = collect_watch(k8s_api.url, cm_path(ns), 4, timeout=1, resourceVersion=rv)
    # deletionTimestamp set, one finalizer removed, then gone (no MODIFIED for the last
    # removal, no event for the repeated delete)
    assert [t for t, _ in evs] == ["MODIFIED", "MODIFIED", "DELETED"]
    assert evs[1][1]["metadata"]["finalizers"] == ["example.com/other"]
    assert evs[-1][0] == "DELETED" and evs[0][1]["metadata"]["deletionTimestamp"]


def test_deletion_with_finalizer_bumps_generation(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    c.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("delgen", cr_spec(), finalizers=["example.com/f"])
    )
    c.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "delgen")
    obj = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "delgen")
    assert obj["metadata"]["deletionTimestamp"]
    assert obj["metadata"]["generation"] == 2
    # once only: a repeated delete changes nothing
    c.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "delgen")
    again = c.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "delgen")
    assert again["metadata"]["generation"] == 2
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    # kinds without a generation (ConfigMaps) get none
    k8s_api.core.create_namespaced_config_map(ns, cm("delgen", finalizers=["example.com/f"]))
    k8s_api.core.delete_namespaced_config_map("delgen", ns)
    gone = k8s_api.core.read_namespaced_config_map("delgen", ns)
    assert gone.metadata.deletion_timestamp and gone.metadata.generation is None


def test_generation_only_for_kinds_that_track_it(k8s_api: K8s, ns: str) -> None:
    """ConfigMaps, Secrets, ServiceAccounts, Namespaces have no metadata.generation; Pods
    (Kubernetes 1.33+), Jobs, CRDs and custom resources start at 1 and count spec changes."""
    made = k8s_api.core.create_namespaced_config_map(ns, cm("g", {"a": "1"}, generation=5))
    assert made.metadata.generation is None
    changed = k8s_api.core.patch_namespaced_config_map("g", ns, {"data": {"a": "2"}})
    assert changed.metadata.generation is None
    assert k8s_api.core.read_namespace(ns).metadata.generation is None

    pod = k8s_api.core.create_namespaced_pod(
        ns, {"metadata": {"name": "g"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}
    )
    assert pod.metadata.generation == 1
    pod = k8s_api.core.patch_namespaced_pod(
        "g", ns, {"spec": {"containers": [{"name": "c", "image": "x:2"}]}}
    )
    assert pod.metadata.generation == 2
    pod = k8s_api.core.patch_namespaced_pod_status("g", ns, {"status": {"phase": "Running"}})
    assert pod.metadata.generation == 2
    job = k8s_api.batch.create_namespaced_job(ns, _job("g"))
    assert job.metadata.generation == 1


# ------------------------------------------------------------------ garbage collection


def _owner_ref(kind: str, api_version: str, obj: Any) -> dict[str, Any]:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    name = meta["name"] if isinstance(meta, dict) else meta.name
    uid = meta["uid"] if isinstance(meta, dict) else meta.uid
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "blockOwnerDeletion": True,
    }


def _job(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}
            }
        },
    }


def _pod(
    name: str,
    owner: dict[str, Any],
    finalizers: list[str] | None = None,
    extra_owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "ownerReferences": [owner, *([extra_owner] if extra_owner else [])],
    }
    if finalizers:
        meta["finalizers"] = finalizers
    return {"metadata": meta, "spec": {"containers": [{"name": "c", "image": "x"}]}}


def _exists(read: Callable[..., Any], *args: Any) -> bool:
    try:
        read(*args)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def test_background_cascade_through_owner_chain(k8s_api: K8s, ns: str) -> None:
    """CR -> Job -> Pod and CR -> ConfigMap: deleting the CR removes the whole tree."""
    cr = k8s_api.custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, cr_body("owner", cr_spec())
    )
    ref = _owner_ref("ShardedCheckpoint", f"{GROUP}/{VERSION}", cr)
    job_body = _job("owned-job")
    job_body["metadata"]["ownerReferences"] = [ref]
    job = k8s_api.batch.create_namespaced_job(ns, job_body)
    k8s_api.core.create_namespaced_pod(ns, _pod("owned-pod", _owner_ref("Job", "batch/v1", job)))
    k8s_api.core.create_namespaced_config_map(ns, cm("owned-cm", ownerReferences=[ref]))
    k8s_api.core.create_namespaced_config_map(ns, cm("bystander"))

    k8s_api.custom.delete_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "owner", propagation_policy="Background"
    )
    wait_for(
        lambda: (
            not any(
                (
                    _exists(k8s_api.batch.read_namespaced_job, "owned-job", ns),
                    _exists(k8s_api.core.read_namespaced_pod, "owned-pod", ns),
                    _exists(k8s_api.core.read_namespaced_config_map, "owned-cm", ns),
                )
            )
        ),
        5,
        what="dependents garbage-collected",
    )
    assert _exists(k8s_api.core.read_namespaced_config_map, "bystander", ns)
    assert not _exists(
        k8s_api.custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "owner"
    )


def test_foreground_cascade_waits_for_dependents(k8s_api: K8s, ns: str) -> None:
    job = k8s_api.batch.create_namespaced_job(ns, _job("fg"))
    ref = _owner_ref("Job", "batch/v1", job)
    k8s_api.core.create_namespaced_pod(ns, _pod("fg-a", ref))
    k8s_api.core.create_namespaced_pod(ns, _pod("fg-b", ref, finalizers=["example.com/hold"]))

    k8s_api.batch.delete_namespaced_job("fg", ns, propagation_policy="Foreground")
    # the owner stays, marked for deletion, while a dependent remains
    owner = k8s_api.batch.read_namespaced_job("fg", ns)
    assert owner.metadata.deletion_timestamp is not None
    assert "foregroundDeletion" in owner.metadata.finalizers
    assert not _exists(k8s_api.core.read_namespaced_pod, "fg-a", ns)
    held = k8s_api.core.read_namespaced_pod("fg-b", ns)
    assert held.metadata.deletion_timestamp is not None
    # releasing the last dependent releases the owner
    k8s_api.core.patch_namespaced_pod(
        "fg-b",
        ns,
        {"metadata": {"finalizers": None}},
        _content_type="application/merge-patch+json",
    )
    wait_for(
        lambda: not _exists(k8s_api.batch.read_namespaced_job, "fg", ns), 5, what="owner deleted"
    )

    # Foreground with no dependents deletes at once
    k8s_api.batch.create_namespaced_job(ns, _job("fg-alone"))
    k8s_api.batch.delete_namespaced_job("fg-alone", ns, propagation_policy="Foreground")
    assert not _exists(k8s_api.batch.read_namespaced_job, "fg-alone", ns)


def test_orphan_keeps_dependents(k8s_api: K8s, ns: str) -> None:
    job = k8s_api.batch.create_namespaced_job(ns, _job("orph"))
    k8s_api.core.create_namespaced_pod(ns, _pod("orph-pod", _owner_ref("Job", "batch/v1", job)))
    k8s_api.batch.delete_namespaced_job("orph", ns, propagation_policy="Orphan")
    assert not _exists(k8s_api.batch.read_namespaced_job, "orph", ns)
    time.sleep(0.2)
    assert _exists(k8s_api.core.read_namespaced_pod, "orph-pod", ns)


def test_orphan_removes_owner_reference(k8s_api: K8s, ns: str) -> None:
    job = k8s_api.batch.create_namespaced_job(ns, _job("orph2"))
    k8s_api.core.create_namespaced_pod(ns, _pod("orph2-pod", _owner_ref("Job", "batch/v1", job)))
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "keep", "uid": "keep-uid"}
    k8s_api.core.create_namespaced_pod(
        ns, _pod("orph2-pod2", _owner_ref("Job", "batch/v1", job), extra_owner=other)
    )
    k8s_api.batch.delete_namespaced_job("orph2", ns, propagation_policy="Orphan")
    pod = k8s_api.core.read_namespaced_pod("orph2-pod", ns)
    assert not pod.metadata.owner_references
    # other owners stay
    pod2 = k8s_api.core.read_namespaced_pod("orph2-pod2", ns)
    assert [r.uid for r in pod2.metadata.owner_references] == ["keep-uid"]


def test_job_deletion_defaults_to_orphan(k8s_api: K8s, ns: str) -> None:
    """batch/v1 Jobs orphan their pods unless told otherwise (DefaultGarbageCollectionPolicy),
    with a warning; kubectl and preshard pass propagationPolicy explicitly."""
    job = k8s_api.batch.create_namespaced_job(ns, _job("dflt"))
    k8s_api.core.create_namespaced_pod(ns, _pod("dflt-pod", _owner_ref("Job", "batch/v1", job)))
    r = k8s_api.http.request(
        "DELETE", f"{k8s_api.url}/apis/batch/v1/namespaces/{ns}/jobs/dflt", retries=False
    )
    assert r.status == 200
    assert "child pods are preserved by default" in r.headers["Warning"]
    assert not _exists(k8s_api.batch.read_namespaced_job, "dflt", ns)
    assert not k8s_api.core.read_namespaced_pod("dflt-pod", ns).metadata.owner_references
    # the deprecated orphanDependents=false means Background
    job = k8s_api.batch.create_namespaced_job(ns, _job("dflt2"))
    k8s_api.core.create_namespaced_pod(ns, _pod("dflt2-pod", _owner_ref("Job", "batch/v1", job)))
    k8s_api.batch.delete_namespaced_job("dflt2", ns, orphan_dependents=False)
    wait_for(
        lambda: not _exists(k8s_api.core.read_namespaced_pod, "dflt2-pod", ns),
        5,
        what="pod garbage-collected",
    )


# ------------------------------------------------------------------------------ Table


def test_table_output_has_crd_printer_columns(k8s_api: K8s, ns: str) -> None:
    c = k8s_api.custom
    c.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("tbl", cr_spec(tp=4, quantization="fp8", output={"uri": "s3://out/tbl/tp4/"})),
    )
    c.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, cr_body("tbl2", cr_spec(tp=1)))
    c.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "tbl",
        {
            "status": {
                "phase": "Running",
                "jobName": "tbl-abc",
                "progress": {
                    "stage": "Uploading",
                    "bytesDone": 1,
                    "bytesTotal": 2,
                    "rate": "210.3 MiB/s",
                    "eta": "3m12s",
                },
                "conditions": [
                    {"type": "SpecValid", "status": "True", "reason": "Valid"},
                    {"type": "Ready", "status": "False", "reason": "Converting"},
                ],
            }
        },
    )
    status, table = raw(
        k8s_api,
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}",
        headers={"Accept": TABLE},
    )
    assert status == 200
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    cols = [col["name"] for col in table["columnDefinitions"]]
    assert cols == [
        "Name",
        "Phase",
        "TP",
        "Quantization",
        "Ready",
        "Output",
        "Age",
        "PP",
        "Stage",
        "Rate",
        "ETA",
        "Job",
        "Reason",
        "Path",
        "Took",
        "Engine",
    ]
    prio = {col["name"]: col["priority"] for col in table["columnDefinitions"]}
    assert prio["Phase"] == 0 and prio["PP"] == 1 and prio["Reason"] == 1
    types = {col["name"]: col["type"] for col in table["columnDefinitions"]}
    assert types["TP"] == "integer" and types["Age"] == "date"
    rows = {r["cells"][0]: dict(zip(cols, r["cells"], strict=True)) for r in table["rows"]}
    assert rows["tbl"] | {"Age": None} == {
        "Name": "tbl",
        "Phase": "Running",
        "TP": 4,
        "Quantization": "fp8",
        "Ready": "False",
        "Output": "s3://out/tbl/tp4/",
        "Age": None,
        "PP": 1,
        "Stage": "Uploading",
        "Rate": "210.3 MiB/s",
        "ETA": "3m12s",
        "Job": "tbl-abc",
        "Reason": "Converting",
        "Path": None,
        "Took": None,
        "Engine": None,
    }
    assert rows["tbl"]["Age"].endswith("s")
    assert rows["tbl2"]["Phase"] is None and rows["tbl2"]["TP"] == 1
    # rows carry the object's metadata (PartialObjectMetadata) by default
    obj = table["rows"][0]["object"]
    assert obj["kind"] == "PartialObjectMetadata" and obj["metadata"]["namespace"] == ns

    # a single object, with includeObject=Object
    status, one = raw(
        k8s_api,
        "GET",
        f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/tbl?includeObject=Object",
        headers={"Accept": TABLE},
    )
    assert status == 200 and len(one["rows"]) == 1
    assert one["rows"][0]["cells"][:3] == ["tbl", "Running", 4]
    assert one["rows"][0]["object"]["spec"]["tensorParallelSize"] == 4
    # a plain Accept still gets the object
    status, plain = raw(k8s_api, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/tbl")
    assert plain["kind"] == "ShardedCheckpoint"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_get_prints_printer_columns(k8s_api: K8s, ns: str) -> None:
    k8s_api.custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        cr_body("kc", cr_spec(tp=8, quantization="fp8", output={"uri": "s3://out/kc/tp8/"})),
    )

    def kubectl(*args: str) -> str:
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(k8s_api.kubeconfig_path), "-n", ns, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    out = kubectl("get", "sckpt").splitlines()
    assert out[0].split() == ["NAME", "PHASE", "TP", "QUANTIZATION", "READY", "OUTPUT", "AGE"]
    # Phase and Ready are unset (null cells, printed blank)
    assert out[1].split()[:4] == ["kc", "8", "fp8", "s3://out/kc/tp8/"]
    wide = kubectl("get", "sckpt", "-o", "wide").splitlines()
    assert wide[0].split()[-9:] == [
        "PP", "STAGE", "RATE", "ETA", "JOB", "REASON", "PATH", "TOOK", "ENGINE",
    ]  # fmt: skip


# ------------------------------------------------------------------------------ pod logs


def test_pod_log_and_tail_lines(k8s_api: K8s, ns: str) -> None:
    k8s_api.core.create_namespaced_pod(
        ns, {"metadata": {"name": "logs"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    )
    k8s_api.append_log(ns, "logs", "one\ntwo\n")
    k8s_api.append_log(ns, "logs", "three\n")
    r = k8s_api.core.read_namespaced_pod_log("logs", ns, _preload_content=False)
    assert r.data.decode() == "one\ntwo\nthree\n"
    r = k8s_api.core.read_namespaced_pod_log("logs", ns, tail_lines=2, _preload_content=False)
    assert r.data.decode() == "two\nthree\n"
    assert api_error(k8s_api.core.read_namespaced_pod_log, "nopod", ns)[0] == 404


# ------------------------------------------------------------------------------ stats


def test_stats_count_requests_per_user_agent(k8s_api: K8s, ns: str) -> None:
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(k8s_api.kubeconfig_path), client_configuration=cfg)
    client = kubernetes.client.ApiClient(cfg)
    agent = f"stats-probe-{uuid.uuid4().hex[:6]}"
    client.user_agent = f"{agent}/0.1 (test)"
    core = kubernetes.client.CoreV1Api(client)
    before_total = k8s_api.stats()["total"]

    core.create_namespaced_config_map(ns, cm("s1"))
    for _ in range(3):
        core.read_namespaced_config_map("s1", ns)
    core.list_namespaced_config_map(ns)
    core.patch_namespaced_config_map("s1", ns, {"data": {"a": "b"}})
    core.delete_namespaced_config_map("s1", ns)
    assert api_error(core.read_namespaced_secret, "missing", ns)[0] == 404  # errors count too

    mine = k8s_api.stats(by_agent=True)[agent]
    assert mine == {
        "create configmaps": 1,
        "get configmaps": 3,
        "list configmaps": 1,
        "patch configmaps": 1,
        "delete configmaps": 1,
        "get secrets": 1,
    }
    assert k8s_api.stats()["total"] - before_total == 8
    # subresources are counted apart
    core.create_namespaced_pod(
        ns, {"metadata": {"name": "sp"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    )
    core.patch_namespaced_pod_status("sp", ns, {"status": {"phase": "Running"}})
    core.read_namespaced_pod_log("sp", ns, _preload_content=False)
    mine = k8s_api.stats(by_agent=True)[agent]
    assert mine["patch pods/status"] == 1 and mine["get pods/log"] == 1
    # the test client is counted under its own agent, not ours
    assert k8s_api.stats(by_agent=True)["preshard-tests"]["create namespaces"] >= 1


def test_metadata_only_reads_and_secret_data_counters(k8s_api: K8s, ns: str) -> None:
    """``Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`` answers
    metadata only (as a real API server does); Secret objects served with their data are
    counted per user agent (GET /emulator/stats?by=secret-data)."""
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(k8s_api.kubeconfig_path), client_configuration=cfg)
    client = kubernetes.client.ApiClient(cfg)
    agent = f"secret-probe-{uuid.uuid4().hex[:6]}"
    client.user_agent = f"{agent}/0.1"
    k8s_api.secret(ns, "meta", {"AWS_SECRET_ACCESS_KEY": "do-not-show"})

    def get(path: str) -> dict[str, Any]:
        resp = client.call_api(
            path,
            "GET",
            header_params={
                "Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
            },
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        return dict(json.loads(resp.data))

    one = get(f"/api/v1/namespaces/{ns}/secrets/meta")
    assert one["kind"] == "PartialObjectMetadata" and one["apiVersion"] == "meta.k8s.io/v1"
    assert one["metadata"]["name"] == "meta" and "data" not in one
    listed = get(f"/api/v1/namespaces/{ns}/secrets")
    assert listed["kind"] == "PartialObjectMetadataList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["meta"]
    assert "do-not-show" not in json.dumps(listed) and "data" not in listed["items"][0]

    def served() -> int:
        url = f"{k8s_api.url}/emulator/stats?by=secret-data"
        return int(json.loads(k8s_api.http.request("GET", url).data).get(agent, 0))

    assert served() == 0
    kubernetes.client.CoreV1Api(client).read_namespaced_secret("meta", ns)
    kubernetes.client.CoreV1Api(client).list_namespaced_secret(ns)
    assert served() == 2  # one full read, one list of one Secret


# ------------------------------------------------------------------------------ faults


def inject(k8s: K8s, **fault: Any) -> None:
    status, body = raw(k8s, "POST", "/emulator/faults", fault)
    assert status == 200 and body == {"ok": True}


def test_fault_injection_fails_the_next_requests(k8s_api: K8s, ns: str) -> None:
    sa = k8s_api.core
    sa.create_namespaced_service_account(ns, {"metadata": {"name": "f"}})
    inject(k8s_api, verb="get", resource="serviceaccounts", code=503, count=2, message="boom")
    for _ in range(2):
        status, body = api_error(sa.read_namespaced_service_account, "f", ns)
        assert status == 503
        assert body["kind"] == "Status" and body["message"] == "boom"
        assert body["reason"] == "ServiceUnavailable"
    assert sa.read_namespaced_service_account("f", ns).metadata.name == "f"  # count used up
    # other verbs and resources were never affected
    inject(k8s_api, verb="patch", resource="serviceaccounts", code=409, count=1)
    assert sa.list_namespaced_service_account(ns).items
    status, body = api_error(sa.patch_namespaced_service_account, "f", ns, {"metadata": {}})
    assert status == 409 and body["reason"] == "Conflict"
    assert sa.patch_namespaced_service_account("f", ns, {"metadata": {"labels": {"a": "b"}}})
    # the fault fires before the write: nothing was stored
    inject(k8s_api, verb="create", resource="serviceaccounts", code=500)
    assert (
        api_error(sa.create_namespaced_service_account, ns, {"metadata": {"name": "g"}})[0] == 500
    )
    assert not _exists(sa.read_namespaced_service_account, "g", ns)
    # wildcards: any verb on serviceaccounts
    inject(k8s_api, resource="serviceaccounts", code=500, count=1)
    assert api_error(sa.list_namespaced_service_account, ns)[0] == 500
    assert sa.list_namespaced_service_account(ns).items


def test_fault_injection_on_watch(k8s_api: K8s, ns: str) -> None:
    inject(k8s_api, verb="watch", resource="configmaps", code=500, count=1)
    with pytest.raises(ApiException) as info:
        collect_watch(k8s_api.url, cm_path(ns), 1, timeout=2)
    assert info.value.status == 500
    # a list is not a watch
    assert k8s_api.core.list_namespaced_config_map(ns).items == []


def test_fault_injection_429_is_too_many_requests(k8s_api: K8s, ns: str) -> None:
    inject(k8s_api, verb="list", resource="serviceaccounts", code=429, count=1)
    r = k8s_api.http.request(
        "GET", f"{k8s_api.url}/api/v1/namespaces/{ns}/serviceaccounts", retries=False
    )
    body = json.loads(r.data)
    assert r.status == 429 and body["reason"] == "TooManyRequests"
    assert r.headers["Retry-After"] == "1"
    assert body["details"]["retryAfterSeconds"] == 1
    # an explicit retryAfter
    inject(k8s_api, verb="list", resource="serviceaccounts", code=429, count=1, retryAfter=7)
    r = k8s_api.http.request(
        "GET", f"{k8s_api.url}/api/v1/namespaces/{ns}/serviceaccounts", retries=False
    )
    assert r.status == 429 and r.headers["Retry-After"] == "7"
    # the official client (urllib3) honours Retry-After on a 429 and retries by itself
    inject(k8s_api, verb="list", resource="serviceaccounts", code=429, count=1)
    started = time.monotonic()
    assert k8s_api.core.list_namespaced_service_account(ns).kind == "ServiceAccountList"
    assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (400, "BadRequest"),
        (403, "Forbidden"),
        (404, "NotFound"),
        (409, "Conflict"),
        (410, "Expired"),
        (422, "Invalid"),
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
        (504, "Timeout"),
        (418, ""),  # no Kubernetes reason: StatusReasonUnknown
    ],
)
def test_fault_injection_reasons(k8s_api: K8s, ns: str, code: int, reason: str) -> None:
    inject(k8s_api, verb="get", resource="configmaps", code=code, count=1)
    status, body = api_error(k8s_api.core.read_namespaced_config_map, "any", ns)
    assert status == code and body["reason"] == reason and body["code"] == code


# ---------------------------------------------------------------------------- CRD lifecycle


def test_crd_installed_through_the_api_serves_its_resource(k8s_api: K8s) -> None:
    """A CRD created over HTTP (not the setup helper) is served at once, with its schema."""
    import yaml

    doc = yaml.safe_load(CRD.read_text())
    doc["metadata"]["name"] = "widgets.example.com"
    doc["spec"]["group"] = "example.com"
    doc["spec"]["names"] = {
        "kind": "Widget",
        "listKind": "WidgetList",
        "plural": "widgets",
        "singular": "widget",
    }
    ext = kubernetes.client.ApiextensionsV1Api(k8s_api.api)
    status, _ = raw(k8s_api, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
    assert status == 201
    assert ext.read_custom_resource_definition("widgets.example.com").spec.group == "example.com"
    obj = k8s_api.custom.create_namespaced_custom_object(
        "example.com",
        VERSION,
        "default",
        "widgets",
        {
            "apiVersion": f"example.com/{VERSION}",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": cr_spec(),
        },
    )
    assert obj["kind"] == "Widget" and obj["metadata"]["namespace"] == "default"
    status, _ = api_error(
        k8s_api.custom.create_namespaced_custom_object,
        "example.com",
        VERSION,
        "default",
        "widgets",
        {"apiVersion": f"example.com/{VERSION}", "kind": "Widget", "metadata": {"name": "bad"}},
    )
    assert status == 422  # spec is required by the schema


@pytest.fixture(autouse=True)
def _no_leftover_faults(k8s_api: K8s) -> Iterator[None]:
    yield
    faults = k8s_api.server.emulator.store.faults
    left = [f for f in faults if f.count > 0]
    for f in faults:  # never leak a fault into the next test
        f.count = 0
    assert not left, f"injected faults not used up: {left}"


def test_generate_name_retries_a_taken_name(
    k8s_api: K8s, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the API server since 1.32: a generated name that is taken is generated again
    # (kopf posts Events with generateName; a 409 lost an Event under load).
    import preshard_dev.emulator.objects as emulator_module

    calls = {"n": 0}

    def choice(seq: str) -> str:
        calls["n"] += 1
        return seq[0] if calls["n"] <= 10 else seq[1]

    monkeypatch.setattr(emulator_module.random, "choice", choice)
    first = k8s_api.core.create_namespaced_config_map(ns, {"metadata": {"generateName": "g-"}})
    second = k8s_api.core.create_namespaced_config_map(ns, {"metadata": {"generateName": "g-"}})
    assert first.metadata.name == "g-bbbbb"
    assert second.metadata.name == "g-ccccc"
