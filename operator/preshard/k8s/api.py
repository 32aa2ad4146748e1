"""Kubernetes I/O for the operator (kubernetes Python client, called from kopf's sync
handlers in its thread pool). Thin wrappers: create-or-get, minimal patches, reads of
what the worker recorded (termination message, progress lines in the pod log).

:class:`KubeApi` holds the client (one per operator, built by :meth:`KubeApi.connect`
at start and kept in the service, :class:`preshard.service.Service`, in kopf's memo);
tests give it a fake client."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from preshard import GROUP, PLURAL, VERSION
from preshard.core.jobpods import newest_owned_pod, owned_by_job, result_container_statuses
from preshard.core.progress import ProgressRecord, Result, last_progress
from preshard.k8s.errors import translate_methods

LOG_TAIL_LINES = 50
LOG_LIMIT_BYTES = 64 * 1024  # the pod writes the log: never read more than this of it
SECRET_SEEN_SECONDS = 10.0
# A metadata-only read: the API server answers a PartialObjectMetadata (name, uid, labels,
# ...) without the Secret's data (Kubernetes >= 1.15).
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def termination_result(pod: dict[str, Any] | None, job: dict[str, Any]) -> Result | None:
    """The worker's Result from the termination message of the Job's container in
    ``pod`` (current or last state), parsed as tenant input (a malformed message is a
    Failed Result with reason InvalidResult, never an exception). Callers pass only a
    pod of ``job``'s own (:meth:`KubeApi.job_pod`); any other pod gives None."""
    if pod is None or not owned_by_job(pod, job):
        return None
    for cs in result_container_statuses(pod, job):
        for state_key in ("state", "lastState"):
            term = ((cs.get(state_key) or {}).get("terminated")) or None
            if isinstance(term, dict) and isinstance(term.get("message"), str) and term["message"]:
                res = Result.from_message(term["message"])
                if res is not None:
                    return res
    return None


@translate_methods
class KubeApi:
    """The operator's Kubernetes calls, on one ``kubernetes.client.ApiClient``. Every
    public method raises preshard.k8s.errors, never the client's exceptions."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        # (namespace, name) -> monotonic time a Secret was last found
        self._secrets_seen: dict[tuple[str, str], float] = {}
        self._secret_locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def connect(cls, pool_size: int | None = None) -> KubeApi:
        """Load in-cluster config, else KUBECONFIG / ~/.kube/config. ``pool_size``:
        connections kept open to the API server; as many as threads calling it (the
        client's default is 5 per CPU: more concurrent calls open and discard a
        connection each)."""
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        cfg = kubernetes.client.Configuration.get_default_copy()
        if pool_size:
            cfg.connection_pool_maxsize = max(pool_size, cfg.connection_pool_maxsize)
        return cls(kubernetes.client.ApiClient(cfg))

    def to_dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        return dict(self.client.sanitize_for_serialization(obj))

    @staticmethod
    def termination_result(pod: dict[str, Any] | None, job: dict[str, Any]) -> Result | None:
        return termination_result(pod, job)

    # secrets

    def secret_exists(
        self, namespace: str, name: str, max_age: float = SECRET_SEEN_SECONDS
    ) -> bool:
        """Whether the Secret exists, from its metadata only: the operator never asks for a
        Secret's data (the request's Accept header asks for PartialObjectMetadata), and drops
        the answer at once whatever it holds.

        A Secret found less than ``max_age`` seconds ago is not read again (resources created
        together usually share one: one read, not one each); a missing one is read every time.
        One deleted in between shows as the pod's CreateContainerConfigError (PodWaiting)."""
        key = (namespace, name)
        seen = self._secrets_seen.get(key)
        if seen is not None and time.monotonic() - seen < max_age:
            return True
        with self._secret_lock(key):  # one read at a time per Secret: the others wait
            seen = self._secrets_seen.get(key)  # for it and use its answer
            if seen is not None and time.monotonic() - seen < max_age:
                return True
            return self._read_secret_metadata(namespace, name, key)

    def _secret_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            if len(self._secret_locks) > 10_000:
                self._secret_locks.clear()
            return self._secret_locks.setdefault(key, threading.Lock())

    def _read_secret_metadata(self, namespace: str, name: str, key: tuple[str, str]) -> bool:
        try:
            resp = self.client.call_api(
                "/api/v1/namespaces/{namespace}/secrets/{name}",
                "GET",
                path_params={"namespace": namespace, "name": name},
                header_params={"Accept": METADATA_ONLY},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
            try:
                resp.drain_conn()  # read off the wire and dropped: never parsed or kept
            finally:
                resp.release_conn()
        except ApiException as exc:
            if exc.status == 404:
                self._secrets_seen.pop(key, None)
                return False
            raise
        if len(self._secrets_seen) > 10_000:  # stale entries of many namespaces: start over
            self._secrets_seen.clear()
        self._secrets_seen[key] = time.monotonic()
        return True

    # jobs

    def create_or_get_job(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the Job, or return the existing one of that name. (job, created)."""
        ns = body["metadata"]["namespace"]
        try:
            return self.to_dict(self.batch.create_namespaced_job(ns, body)), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        return self.to_dict(self.batch.read_namespaced_job(body["metadata"]["name"], ns)), False

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.to_dict(self.batch.read_namespaced_job(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_job(self, namespace: str, name: str, propagation: str = "Foreground") -> bool:
        """Delete a Job and its pods; False if it was already gone."""
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy=propagation)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    # pods

    def job_pod(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The newest of the Job's OWN pods (:func:`preshard.core.jobpods.owned_by_job`:
        its controller ownerReference is this Job, by uid, and it runs the Job's
        container). The label selector only narrows the list: a pod that merely carries
        the Job's labels is ignored."""
        meta = job.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if not ns or not name:
            return None
        # Raw JSON: only the fields we read, no client-side model validation.
        resp = self.core.list_namespaced_pod(
            ns, label_selector=f"job-name={name}", _preload_content=False
        )
        try:
            items = json.loads(resp.data).get("items") or []
        finally:
            resp.release_conn()
        return newest_owned_pod(items, job)

    def pod_progress(self, namespace: str, pod_name: str) -> ProgressRecord | None:
        try:
            # Raw bytes: the client's str deserialization of text/plain is not reliable.
            resp = self.core.read_namespaced_pod_log(
                pod_name,
                namespace,
                tail_lines=LOG_TAIL_LINES,
                limit_bytes=LOG_LIMIT_BYTES,
                _preload_content=False,
            )
            try:
                text = resp.data.decode("utf-8", errors="replace")
            finally:
                resp.release_conn()
        except ApiException as exc:
            if exc.status in (400, 404):  # container not started yet / pod gone
                return None
            raise
        return last_progress(text)

    # checkpoints

    def patch_checkpoint_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch .status; False if the resource is gone."""
        if not patch:
            return True
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": patch}
            )
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False  # deleted meanwhile
            raise

    def get_checkpoint(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ShardedCheckpoint (None if it does not exist)."""
        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj)

    # configmaps

    def read_configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data (None if it does not exist)."""
        try:
            obj = self.to_dict(self.core.read_namespaced_config_map(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj.get("data") or {})

    def merge_configmap_data(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Add ``data`` to a ConfigMap's (created when absent); other keys are kept."""
        try:
            self.core.patch_namespaced_config_map(name, namespace, {"data": data})
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": data,
        }
        try:
            self.core.create_namespaced_config_map(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespaced_config_map(name, namespace, {"data": data})

    def apply_configmap(self, body: dict[str, Any], owner_uid: str) -> bool:
        """Create the ConfigMap, or update it when it is ours (an ownerReference with
        ``owner_uid``). False, and nothing written, when one of that name belongs to
        something else: never overwrite a ConfigMap this resource does not own."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        # create first: a new resource's ConfigMap costs one request (a 409 reads it)
        try:
            self.core.create_namespaced_config_map(ns, body)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = self.to_dict(self.core.read_namespaced_config_map(name, ns))
        refs = (current.get("metadata") or {}).get("ownerReferences") or []
        if not any(r.get("uid") == owner_uid for r in refs):
            return False
        if (
            current.get("data") != body["data"]
            or (current["metadata"].get("labels") or {}) != body["metadata"]["labels"]
        ):
            self.core.patch_namespaced_config_map(
                name,
                ns,
                {"metadata": {"labels": body["metadata"]["labels"]}, "data": body["data"]},
            )
        return True
