"""core.stepstatus: the status of the steps before a conversion and of an adopted
or copied checkpoint; every such status is valid against the CRD's status schema (a field the
schema lacked would be pruned by the API server)."""

from __future__ import annotations

from typing import Any

import pytest

from preshard.core import status as st
from preshard.core import stepstatus as ss
from tests.unit.test_crd import MINIMAL, errors, resource

T0, T1 = "2026-12-01T10:00:00Z", "2026-12-01T10:00:07Z"
ARTIFACT = {
    "uri": "s3://out/twin/",
    "manifestUri": "s3://out/twin/preshard-manifest.json",
    "files": 3,
    "totalBytes": 3 * 2**20,
    "manifestSha256": "9" * 64,
    "vllmVersion": "0.32.0",
}
SERVING = {"loadFormat": "runai_streamer_sharded", "args": ["--model", "s3://out/twin/"],
           "env": [], "configMapName": "twin-serving"}  # fmt: skip
IDENTITY = "sha256:" + "d" * 64
ORIGIN = {"uri": "s3://out/orig/", "manifestSha256": "8" * 64}


def statuses() -> dict[str, dict[str, Any]]:
    record = {"step": "Copy", "jobName": "twin-copy-0123456789", "startedAt": T0,
                "from": "s3://out/orig/", "noAdopt": True, "round": 1}  # fmt: skip
    step = ss.status_for_step(None, step_record=record, message="m", generation=1, now=T0,
                              identity=IDENTITY)  # fmt: skip
    copied = ss.status_for_adopted_or_copied(
        step, result=ss.COPIED, artifact=ARTIFACT, serving=SERVING, identity=IDENTITY,
        origin=ORIGIN, started=T0, generation=1, now=T1,
    )  # fmt: skip
    adopted = ss.status_for_adopted_or_copied(
        None, result=ss.ADOPTED, artifact=ARTIFACT, serving=SERVING, identity=IDENTITY,
        origin=None, started=T0, generation=1, now=T1,
    )  # fmt: skip
    converted = ss.mark_converted(
        None,
        {"conditions": st.set_condition([], st.READY, "True", "Published", "m", 1, T1),
         "startTime": T0, "completionTime": T1, "artifact": ARTIFACT,
         "decision": {"step": "Convert", "startedAt": T0}},
        T1,
    )  # fmt: skip
    return {"step": step, "copied": copied, "adopted": adopted, "converted": converted}


@pytest.mark.parametrize("name", sorted(statuses()))
def test_statuses_are_valid_against_the_crd(name: str) -> None:
    obj = resource(MINIMAL, statuses()[name])
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors(obj)] == []


def test_step_status() -> None:
    s = statuses()["step"]
    ready = st.get_condition(s, st.READY)
    assert ready and ready["reason"] == "Copying" and ready["status"] == "False"
    assert s["phase"] == st.RUNNING and s["identity"] == IDENTITY
    pre = ss.status_for_step(
        None, step_record={"step": "Preflight"}, message="m", generation=1, now=T0
    )
    assert pre["phase"] == st.PENDING


def test_copied_status() -> None:
    s = statuses()["copied"]
    ready = st.get_condition(s, st.READY)
    assert ready and ready["status"] == "True" and ready["reason"] == "Copied"
    assert "copied from s3://out/orig/" in ready["message"] and "in 7 s" in ready["message"]
    assert "twin-serving" in ready["message"]
    assert s["path"] == "Copied" and s["origin"] == ORIGIN and s["durationSeconds"] == 7
    assert s["phase"] == st.SUCCEEDED and s["artifact"] == ARTIFACT
    assert "decision" not in s  # done: the prefix is claimed by the step's result now
    pub = st.get_condition(s, st.PUBLISHED)
    assert pub and pub["reason"] == "Copied"


def test_adopted_without_serving_yet_is_not_ready() -> None:
    s = ss.status_for_adopted_or_copied(None, result=ss.ADOPTED, artifact=ARTIFACT, serving=None,
                             identity=IDENTITY, origin=None, started=T0, generation=1, now=T1)  # fmt: skip
    ready = st.get_condition(s, st.READY)
    assert ready and ready["reason"] == "ServingConfigPending"
    assert not ss.is_done(s) and ss.is_done(statuses()["adopted"])


def test_only_adopt_and_copy_results() -> None:
    with pytest.raises(ValueError):
        ss.status_for_adopted_or_copied(None, result=ss.CONVERTED, artifact=ARTIFACT, serving=None,
                             identity=IDENTITY, origin=None, started=T0, generation=1, now=T1)  # fmt: skip


def test_converted_counts_from_the_first_step_and_only_once() -> None:
    s = statuses()["converted"]
    assert s["path"] == "Converted" and s["durationSeconds"] == 7 and "decision" not in s
    assert ss.mark_converted(s, s, T1) is s
    not_ready = {"conditions": st.set_condition([], st.READY, "False", "Converting", "m", 1, T0)}
    assert ss.mark_converted(None, not_ready, T0) is not_ready


def test_seconds_between() -> None:
    assert ss.seconds_between(T0, T1) == 7
    assert ss.seconds_between(None, T1) is None and ss.seconds_between("x", T1) is None
