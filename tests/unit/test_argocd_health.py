"""The Argo CD health check (charts/preshard/files/argocd-health.lua), run by a real Lua
interpreter (lupa) against statuses built by the operator's own status code, and the
properties kstatus (Flux) reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lupa import LuaRuntime

from preshard.core import status as st
from preshard.core.progress import Result

LUA = Path(__file__).resolve().parents[2] / "charts" / "preshard" / "files" / "argocd-health.lua"
NOW = "2026-01-01T00:00:00Z"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(v: Any) -> Any:
        if isinstance(v, dict):
            return lua.table_from({k: to_lua(x) for k, x in v.items()})
        if isinstance(v, list):
            return lua.table_from([to_lua(x) for x in v])
        return v

    fn = lua.eval("function(obj) " + LUA.read_text() + " end")
    hs = fn(to_lua(obj))
    return str(hs["status"]), str(hs["message"])


def resource(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "m", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


def job(conditions: list[dict[str, Any]], **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m-abc"}, "status": {"conditions": conditions, **status}}


SERVING = {
    "loadFormat": "runai_streamer_sharded",
    "args": [],
    "env": [],
    "configMapName": "m-serving",
}


def derived(job_obj: dict[str, Any] | None, result: Result | None = None) -> dict[str, Any]:
    return st.derive_status(
        None,
        generation=1,
        job_name="m-abc",
        job=job_obj,
        result=result,
        progress=None,
        now=NOW,
        serving=SERVING if result is not None and result.artifact else None,
    )


ARTIFACT = {
    "uri": "s3://b/m/",
    "manifestUri": "s3://b/m/preshard-manifest.json",
    "files": 3,
    "totalBytes": 10,
    "manifestSha256": "0" * 64,
    "vllmVersion": "0.32.0",
}


def test_ready_is_healthy() -> None:
    s = derived(
        job([{"type": "Complete", "status": "True"}], succeeded=1),
        Result(result="Succeeded", artifact=ARTIFACT),
    )
    assert st.get_condition(s, "Ready")["status"] == "True"  # type: ignore[index]
    status, message = health(resource(s))
    assert status == "Healthy" and "s3://b/m/" in message


def test_running_and_pending_are_progressing() -> None:
    assert health(resource(derived(job([]))))[0] == "Progressing"
    running = derived(job([], active=1, startTime=NOW))
    assert running["phase"] == "Running"
    assert health(resource(running))[0] == "Progressing"
    assert health(resource(None)) == ("Progressing", "Waiting for the preshard operator")


def test_failures_and_waiting_for_a_person_are_degraded() -> None:
    failed = derived(
        job([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}], failed=1),
        Result(result="Failed", reason="SourceNotFound", message="source s3://x/y/ not found"),
    )
    status, message = health(resource(failed))
    assert status == "Degraded" and "SourceNotFound" in message
    invalid = st.status_for_spec_error(None, "InvalidSpec", "bad", 1, NOW)
    assert health(resource(invalid)) == ("Degraded", "InvalidSpec: bad")
    conflict = st.status_for_conflict(None, "output s3://b/m/ overlaps another", 1, NOW)
    assert health(resource(conflict))[0] == "Degraded"
    missing = st.status_for_error(
        None,
        reason="CredentialsSecretNotFound",
        message="Secret 's3' not found",
        generation=1,
        now=NOW,
        spec_valid=True,
        phase=st.PENDING,
    )
    assert health(resource(missing))[0] == "Degraded"


def test_a_status_for_an_older_generation_is_progressing() -> None:
    s = derived(
        job([{"type": "Complete", "status": "True"}], succeeded=1),
        Result(result="Succeeded", artifact=ARTIFACT),
    )
    status, message = health(resource(s, generation=2))
    assert status == "Progressing" and "generation 2" in message


@pytest.mark.parametrize("generation", [1, 3])
def test_kstatus_reads_observed_generation_and_ready(generation: int) -> None:
    # kstatus (Flux health checks): Current when status.observedGeneration equals
    # metadata.generation and the Ready condition is True.
    s = st.derive_status(
        None,
        generation=generation,
        job_name="m-abc",
        job=job([{"type": "Complete", "status": "True"}], succeeded=1),
        result=Result(result="Succeeded", artifact=ARTIFACT),
        progress=None,
        now=NOW,
        serving=SERVING,
    )
    assert s["observedGeneration"] == generation
    ready = st.get_condition(s, "Ready")
    assert ready is not None and ready["status"] == "True"
    assert ready["observedGeneration"] == generation
