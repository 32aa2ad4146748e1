"""core.jobpods: only a Job's own pods speak for it (docs/security.md, "Job results": a
tenant who may create pods forged a pod with only the ``job-name`` label and decided the
resource's status), and core.progress: termination messages and progress lines are
bounded tenant input."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from preshard.core.jobpods import newest_owned_pod, owned_by_job
from preshard.core.progress import (
    MAX_RESULT_BYTES,
    PROGRESS_PREFIX,
    Result,
    parse_progress_line,
)
from preshard.k8s.api import termination_result

JOB: dict[str, Any] = {
    "metadata": {"name": "llama-preflight-0123456789", "namespace": "ml", "uid": "job-uid"},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "convert",
                        "image": "registry.example/preshard-converter:1",
                        "command": ["preshard"],
                        "args": ["preflight", "--source", "s3://m/llama/"],
                    }
                ]
            }
        }
    },
}
GOOD = json.dumps({"result": "Succeeded", "artifact": {"files": 3, "totalBytes": 300}})


def pod(name: str = "llama-preflight-0123456789-abcde", created: str = "2026-12-06T07:00:00Z",
        message: str = GOOD, **meta: Any) -> dict[str, Any]:  # fmt: skip
    container = copy.deepcopy(JOB["spec"]["template"]["spec"]["containers"][0])
    out: dict[str, Any] = {
        "metadata": {
            "name": name,
            "namespace": "ml",
            "creationTimestamp": created,
            "labels": {"job-name": JOB["metadata"]["name"]},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": JOB["metadata"]["name"],
                    "uid": "job-uid",
                    "controller": True,
                }
            ],
            **meta,
        },
        "spec": {"containers": [container]},
        "status": {
            "containerStatuses": [
                {"name": "convert", "state": {"terminated": {"exitCode": 0, "message": message}}}
            ]
        },
    }
    return out


def test_the_jobs_own_pod_is_read() -> None:
    p = pod()
    assert owned_by_job(p, JOB)
    res = termination_result(p, JOB)
    assert res is not None and res.result == "Succeeded"
    assert res.artifact == {"files": 3, "totalBytes": 300}


def _ref(p: dict[str, Any]) -> dict[str, Any]:
    return dict(p["metadata"]["ownerReferences"][0])


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda p: p["metadata"].pop("ownerReferences"), id="label-only"),
        pytest.param(
            lambda p: p["metadata"]["ownerReferences"][0].update(uid="other-uid"), id="other-uid"
        ),
        pytest.param(
            lambda p: p["metadata"]["ownerReferences"][0].pop("controller"), id="not-controller"
        ),
        pytest.param(
            lambda p: p["metadata"]["ownerReferences"][0].update(kind="ReplicaSet"), id="kind"
        ),
        pytest.param(
            lambda p: p["metadata"]["ownerReferences"][0].update(name="other-job"), id="job-name"
        ),
        pytest.param(lambda p: p["metadata"].update(namespace="other"), id="namespace"),
        pytest.param(
            lambda p: p["metadata"]["ownerReferences"].append({**_ref(p), "uid": "x"}),
            id="two-controllers",
        ),
        pytest.param(
            lambda p: p["spec"]["containers"][0].update(image="evil.example/forge:1"), id="image"
        ),
        pytest.param(
            lambda p: p["spec"]["containers"][0].update(command=["sh", "-c", "echo forged"]),
            id="command",
        ),
        pytest.param(lambda p: p["spec"]["containers"][0]["args"].append("--x"), id="args"),
        pytest.param(lambda p: p["spec"]["containers"][0].update(name="other"), id="container"),
    ],
)
def test_a_forged_pod_is_never_read(forge: Any) -> None:
    """One changed element of the rule is enough to ignore the pod, even when it is the
    newest one and carries every label of the Job."""
    forged = pod(name="forged", created="2026-12-06T08:00:00Z", message=json.dumps(
        {"result": "Succeeded", "artifact": {"manifestSha256": "f" * 64, "files": 1}}
    ))  # fmt: skip
    forge(forged)
    assert not owned_by_job(forged, JOB)
    assert termination_result(forged, JOB) is None
    genuine = pod()
    assert newest_owned_pod([genuine, forged], JOB) == genuine
    assert newest_owned_pod([forged], JOB) is None


def test_the_newest_own_pod_wins() -> None:
    old, new = (
        pod(name="a", created="2026-12-06T07:00:00Z"),
        pod(name="b", created="2026-12-06T07:05:00Z"),
    )
    assert newest_owned_pod([new, old], JOB) == new


def test_a_job_without_uid_owns_nothing() -> None:
    job = copy.deepcopy(JOB)
    del job["metadata"]["uid"]
    assert not owned_by_job(pod(), job)


def test_only_the_jobs_container_status_is_read() -> None:
    p = pod()
    p["status"]["containerStatuses"].insert(
        0, {"name": "sidecar", "state": {"terminated": {"message": '{"result":"Failed"}'}}}
    )
    res = termination_result(p, JOB)
    assert res is not None and res.result == "Succeeded"


# ----------------------------------------------------------- bounded termination messages


def _invalid(text: str) -> str:
    res = Result.from_message(text)
    assert res is not None and res.result == "Failed" and res.reason == "InvalidResult", res
    assert res.artifact is None
    return str(res.message)


def test_nested_json_of_3_8_kib_is_an_invalid_result_not_a_recursion_error() -> None:
    """The issue's message: 3.8 KiB of nested JSON raised an uncaught RecursionError."""
    text = '{"result":"Succeeded","artifact":' + "[" * 1900 + "]" * 1900 + "}"
    assert 3700 < len(text) <= MAX_RESULT_BYTES
    assert "nests deeper" in _invalid(text)
    # through the pod reader too
    res = termination_result(pod(message=text), JOB)
    assert res is not None and res.reason == "InvalidResult"


def test_nesting_in_strings_does_not_count() -> None:
    text = json.dumps({"result": "Failed", "reason": "X", "message": "[" * 2000 + '\\"{'})
    res = Result.from_message(text)
    assert res is not None and res.reason == "X" and res.message == "[" * 2000 + '\\"{'


@pytest.mark.parametrize(
    "value, why",
    [
        ("1" * 300, "300 digits"),
        (str(2**63), "int64"),
        ("-" + str(2**63 + 1), "int64"),
        ("1e400", "finite"),
        ("NaN", "not a JSON number"),
        ("Infinity", "not a JSON number"),
    ],
)
def test_huge_numbers_are_an_invalid_result(value: str, why: str) -> None:
    text = '{"result":"Succeeded","artifact":{"kind":"preflight","config":{"hidden_size":%s}}}'
    assert why in _invalid(text % value)


def test_the_largest_int64_is_a_number() -> None:
    text = json.dumps({"result": "Succeeded", "artifact": {"totalBytes": 2**63 - 1}})
    res = Result.from_message(text)
    assert res is not None and res.artifact == {"totalBytes": 2**63 - 1}


def test_an_oversized_message_is_an_invalid_result() -> None:
    text = json.dumps({"result": "Failed", "reason": "X", "message": "m" * MAX_RESULT_BYTES})
    assert "larger than 4096 bytes" in _invalid(text)
    # a message the worker writes always fits (Result.to_message truncates)
    ok = Result("Failed", "X", "m" * 10_000).to_message()
    assert Result.from_message(ok) is not None
    assert Result.from_message(ok).reason == "X"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "artifact, field",
    [
        ([1, 2], '"artifact" is not an object'),
        ("s3://x/", '"artifact" is not an object'),
        ({"totalBytes": "300"}, "artifact.totalBytes"),
        ({"files": -1}, "artifact.files"),
        ({"files": True}, "artifact.files"),
        ({"manifestSha256": "F" * 64}, "artifact.manifestSha256"),
        ({"manifestSha256": "a" * 63}, "artifact.manifestSha256"),
        ({"vllmVersion": {"x": 1}}, "artifact.vllmVersion"),
        ({"uri": "u" * 1025}, "artifact.uri"),
        ({"origin": "s3://x/"}, "artifact.origin"),
        ({"origin": {"uri": "s3://x/", "manifestSha256": "a" * 64, "x": 1}}, "artifact.origin"),
        ({"origin": {"uri": 7, "manifestSha256": "a" * 64}}, "artifact.origin.uri"),
        ({"origin": {"uri": "s3://x/", "manifestSha256": "z"}}, "artifact.origin.manifestSha256"),
    ],
)
def test_a_mistyped_artifact_is_an_invalid_result(artifact: Any, field: str) -> None:
    text = json.dumps({"result": "Succeeded", "artifact": artifact})
    assert field in _invalid(text)


def test_a_well_typed_copy_artifact_is_kept() -> None:
    artifact = {
        "uri": "s3://out/x/",
        "files": 3,
        "totalBytes": 300,
        "manifestSha256": "a" * 64,
        "origin": {"uri": "s3://out/y/", "manifestSha256": "b" * 64},
        "config": {"anything": [1, 2.5, "x"]},
    }
    res = Result.from_message(json.dumps({"result": "Succeeded", "artifact": artifact}))
    assert res is not None and res.artifact == artifact


def test_a_log_tail_is_no_result() -> None:
    """FallbackToLogsOnError: a crashed worker's message is its log tail (not JSON): no
    result, the Job's own failure reason stands."""
    assert Result.from_message("Traceback (most recent call last):\n  ...") is None


@pytest.mark.parametrize(
    "payload",
    ["[" * 5000, '{"stage":"Uploading","bytesDone":' + "9" * 400 + "}", "x" * 20000, "[1]"],
)
def test_a_hostile_progress_line_is_dropped(payload: str) -> None:
    assert parse_progress_line(PROGRESS_PREFIX + payload) is None
