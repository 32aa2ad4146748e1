"""Rate, ETA, stage durations and the verification summary: the pure computation in
preshard.core.progress, what status shows of it, and the worker's Reporter using it."""

from __future__ import annotations

import io
import json
import math

import pytest

from preshard.core.progress import (
    PROGRESS_PREFIX,
    ProgressRecord,
    RateMeter,
    Result,
    eta_seconds,
    format_duration,
    format_rate,
    parse_progress_line,
    status_stage_seconds,
    verification_status,
)
from preshard.core.status import derive_status, published_progress
from preshard.worker.progress import Reporter

MiB = 2**20


# ------------------------------------------------------------------------- rate meter


def test_rate_meter_first_interval_is_the_plain_rate() -> None:
    m = RateMeter(tau=10.0)
    assert m.update(0.0, 0) is None  # one point: no rate yet
    assert m.update(2.0, 200 * MiB) == pytest.approx(100 * MiB)


def test_rate_meter_smooths_a_stall_with_time_weighting() -> None:
    m = RateMeter(tau=10.0)
    m.update(0.0, 0)
    m.update(10.0, 1000 * MiB)  # 100 MiB/s for 10 s
    # 2 s of nothing: the rate falls by 1 - exp(-2/10) of the gap, not to zero.
    got = m.update(12.0, 1000 * MiB)
    assert got == pytest.approx(100 * MiB * math.exp(-0.2))
    assert 80 * MiB < got < 100 * MiB


def test_rate_meter_converges_to_a_new_steady_rate() -> None:
    m = RateMeter(tau=5.0)
    m.update(0.0, 0)
    done = 0
    for t in range(1, 11):  # 10 s at 100 MiB/s
        done += 100 * MiB
        m.update(float(t), done)
    for t in range(11, 61):  # then 50 s at 20 MiB/s
        done += 20 * MiB
        m.update(float(t), done)
    assert m.rate == pytest.approx(20 * MiB, rel=0.01)


def test_rate_meter_folds_updates_closer_than_min_interval() -> None:
    m = RateMeter(tau=10.0, min_interval=0.5)
    m.update(0.0, 0)
    # A burst of advances within 0.5 s does not produce a (huge) instantaneous rate.
    assert m.update(0.01, 50 * MiB) is None
    assert m.update(0.2, 60 * MiB) is None
    assert m.update(1.0, 100 * MiB) == pytest.approx(100 * MiB)


def test_rate_meter_reset_starts_a_new_stage() -> None:
    m = RateMeter()
    m.update(0.0, 0)
    m.update(1.0, 100)
    m.reset(5.0)
    assert m.rate is None
    assert m.update(6.0, 10) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("done", "total", "rate", "want"),
    [
        (0, 1000, 100.0, 10.0),
        (400, 1000, 100.0, 6.0),
        (1000, 1000, 100.0, 0.0),
        (1200, 1000, 100.0, 0.0),  # never negative
        (0, 0, 100.0, None),  # unknown total
        (0, 1000, None, None),  # no rate yet
        (0, 1000, 0.0, None),  # stalled: no honest ETA
        (0, 1000, math.inf, None),
    ],
)
def test_eta(done: int, total: int, rate: float | None, want: float | None) -> None:
    assert eta_seconds(done, total, rate) == want


@pytest.mark.parametrize(
    ("s", "want"),
    [
        (0, "0s"),
        (44.6, "45s"),
        (59.4, "59s"),
        (60, "1m00s"),
        (192, "3m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7500, "2h05m"),
        (86400 * 3 + 3600 * 4 + 5, "3d04h"),
        (-5, "0s"),
    ],
)
def test_format_duration(s: float, want: str) -> None:
    assert format_duration(s) == want


@pytest.mark.parametrize(
    ("r", "want"),
    [(812, "812 B/s"), (2048, "2.0 KiB/s"), (215.3 * MiB, "215.3 MiB/s"), (3 * 2**30, "3.0 GiB/s")],
)
def test_format_rate(r: float, want: str) -> None:
    assert format_rate(r) == want


# ------------------------------------------------------------------ records and status


def test_record_carries_rate_eta_and_stage_seconds_to_status() -> None:
    rec = ProgressRecord(
        "Uploading",
        512 * MiB,
        2048 * MiB,
        ts=1.0,
        rate=200 * MiB + 0.7,
        eta=7.2,
        stage_seconds={"Converting": 61.26, "Verifying": 3.04, "Uploading": 2.5},
    )
    assert rec.to_status() == {
        "stage": "Uploading",
        "bytesDone": 512 * MiB,
        "bytesTotal": 2048 * MiB,
        "bytesPerSecond": 200 * MiB,
        "rate": "200.0 MiB/s",
        "etaSeconds": 8,  # rounded up: never promise too early
        "eta": "7s",
        "stageSeconds": {"Converting": 61, "Verifying": 3, "Uploading": 2},
    }
    back = parse_progress_line(rec.to_line())
    assert back is not None
    assert back.rate == 200 * MiB and back.eta == 8
    assert back.stage_seconds == {"Converting": 61.3, "Verifying": 3.0, "Uploading": 2.5}
    assert rec.summary() == "512.0 MiB of 2.0 GiB, 200.0 MiB/s, ETA 7s"


def test_record_without_rate_has_no_rate_fields() -> None:
    assert ProgressRecord("Converting").to_status() == {
        "stage": "Converting",
        "bytesDone": 0,
        "bytesTotal": 0,
    }
    assert ProgressRecord("Converting").summary() == ""


@pytest.mark.parametrize(
    "extra",
    [
        {"bytesPerSecond": -5, "etaSeconds": "soon"},
        {"bytesPerSecond": True, "etaSeconds": None},
        {"bytesPerSecond": "1e400", "etaSeconds": -1},
        {"stageSeconds": {"Uploading": -1, "Bogus": 3, "Converting": "x"}},
        {"stageSeconds": [1, 2]},
        {"stageSeconds": {"Uploading": 1e400}},
    ],
)
def test_parse_drops_malformed_optional_fields(extra: dict[str, object]) -> None:
    line = PROGRESS_PREFIX + json.dumps(
        {"stage": "Uploading", "bytesDone": 1, "bytesTotal": 2, **extra}
    ).replace('"1e400"', "1e400")
    rec = parse_progress_line(line)
    assert rec is not None  # the record itself is kept
    assert (rec.stage, rec.bytes_done, rec.bytes_total) == ("Uploading", 1, 2)
    assert rec.rate is None and rec.eta is None
    assert rec.stage_seconds == {}


def test_status_stage_seconds_keeps_known_stages_only() -> None:
    assert status_stage_seconds({"Converting": 12.6, "Hacking": 3, "Uploading": -2}) == {
        "Converting": 13
    }
    assert status_stage_seconds(None) == {}


def test_verification_status_keeps_the_declared_fields_within_limits() -> None:
    raw = {
        "passed": True,
        "summary": "reloaded  at TP=2:\n3 prompts x 8 tokens matched",
        "checks": [
            {"name": "reload-tokens", "passed": True, "detail": "3 prompts x 8 tokens", "x": 1},
            {"name": "tensors", "passed": True, "detail": "d" * 600},
            "garbage",
            {"other": 1},
        ],
        "secret": "never shown",
    }
    out = verification_status(raw)
    assert out is not None
    assert out["passed"] is True
    assert out["summary"] == "reloaded at TP=2: 3 prompts x 8 tokens matched"
    assert out["checks"][0] == {
        "name": "reload-tokens",
        "passed": True,
        "detail": "3 prompts x 8 tokens",
    }
    assert len(out["checks"][1]["detail"]) == 512 and out["checks"][1]["detail"].endswith(
        "[truncated]"
    )
    assert len(out["checks"]) == 2
    assert "secret" not in out


def test_verification_status_cannot_claim_a_pass_with_a_failed_check() -> None:
    out = verification_status(
        {"passed": True, "checks": [{"name": "a", "passed": True}, {"name": "b", "passed": False}]}
    )
    assert out is not None and out["passed"] is False


@pytest.mark.parametrize("raw", [None, [], "ok", {}, {"checks": "x"}, {"passed": "yes"}])
def test_verification_status_of_nothing_usable(raw: object) -> None:
    assert verification_status(raw) is None


def test_result_round_trips_stages_and_verification() -> None:
    r = Result(
        result="Succeeded",
        artifact={"uri": "s3://b/p/"},
        stages={"Converting": 60.04, "Uploading": 4.0},
        verification={"passed": True, "summary": "ok"},
    )
    back = Result.from_message(r.to_message())
    assert back == Result(
        result="Succeeded",
        artifact={"uri": "s3://b/p/"},
        stages={"Converting": 60.0, "Uploading": 4.0},
        verification={"passed": True, "summary": "ok"},
    )


def test_result_too_long_drops_the_verification_before_the_artifact() -> None:
    artifact = {"uri": "s3://b/p/", "totalBytes": 5}
    r = Result(
        result="Succeeded",
        artifact=artifact,
        stages={"Converting": 1.0},
        verification={"summary": "x" * 5000},
    )
    back = Result.from_message(r.to_message())
    assert back is not None
    assert back.artifact == artifact  # what the operator needs survives
    assert back.verification is None
    assert back.stages == {"Converting": 1.0}


def _job(succeeded: bool) -> dict[str, object]:
    cond = "Complete" if succeeded else "Failed"
    return {
        "metadata": {"name": "j"},
        "status": {
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [{"type": cond, "status": "True"}],
            **({"succeeded": 1} if succeeded else {"failed": 1}),
        },
    }


def test_published_progress_has_durations_and_verification() -> None:
    result = Result(
        result="Succeeded",
        artifact={"uri": "s3://b/p/", "files": 2, "totalBytes": 100},
        stages={"Downloading": 2.2, "Converting": 60.6, "Verifying": 5.0, "Uploading": 3.4},
        verification={"passed": True, "summary": "3 prompts matched", "junk": 1},
    )
    assert published_progress(100, result, None) == {
        "stage": "Published",
        "bytesDone": 100,
        "bytesTotal": 100,
        "stageSeconds": {"Downloading": 2, "Converting": 61, "Verifying": 5, "Uploading": 3},
        "verification": {"passed": True, "summary": "3 prompts matched"},
    }
    # An older worker sends no durations: the last progress record's are kept.
    old = Result(result="Succeeded", artifact={"uri": "s3://b/p/", "totalBytes": 100})
    got = published_progress(100, old, {"stageSeconds": {"Converting": 9}})
    assert got == {
        "stage": "Published",
        "bytesDone": 100,
        "bytesTotal": 100,
        "stageSeconds": {"Converting": 9},
    }


def test_derive_status_running_message_shows_rate_and_eta() -> None:
    rec = ProgressRecord("Uploading", 512 * MiB, 2048 * MiB, rate=200 * MiB, eta=7.7)
    job = {"metadata": {"name": "j"}, "status": {"startTime": "t", "active": 1}}
    st = derive_status(
        None, generation=1, job_name="j", job=job, result=None, progress=rec, now="t"
    )
    assert st["phase"] == "Running"
    assert st["progress"]["rate"] == "200.0 MiB/s" and st["progress"]["etaSeconds"] == 8
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert "Uploading: 512.0 MiB of 2.0 GiB, 200.0 MiB/s, ETA 8s" in ready["message"]


def test_derive_status_success_shows_stage_seconds_and_verification() -> None:
    result = Result(
        result="Succeeded",
        artifact={"uri": "s3://b/p/", "files": 2, "totalBytes": 100},
        stages={"Converting": 60.0},
        verification={"passed": True, "summary": "matched"},
    )
    st = derive_status(
        {"progress": {"stage": "Uploading", "bytesDone": 1, "rate": "1 B/s"}},
        generation=1,
        job_name="j",
        job=_job(True),
        result=result,
        progress=None,
        now="t",
    )
    assert st["phase"] == "Succeeded"
    assert st["progress"] == {
        "stage": "Published",
        "bytesDone": 100,
        "bytesTotal": 100,
        "stageSeconds": {"Converting": 60},
        "verification": {"passed": True, "summary": "matched"},
    }  # no stale rate or ETA of the last running stage


# ------------------------------------------------------------------ worker Reporter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_reporter_lines_and_records_show_rate_eta_and_durations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr("preshard.worker.progress.time.monotonic", clock)
    err, out = io.StringIO(), io.StringIO()
    rep = Reporter("lines", stream=err, machine_stream=out, line_interval=5, record_interval=1)
    rep.stage("Converting")
    clock.t += 30
    rep.stage("Uploading", 1000 * MiB)
    for _ in range(10):  # 10 s at 50 MiB/s
        clock.t += 1
        rep.advance(50 * MiB)
    rec = rep.records[-1]
    assert rec.stage == "Uploading" and rec.bytes_done == 500 * MiB
    assert rec.rate == pytest.approx(50 * MiB)
    assert rec.eta == pytest.approx(10.0)
    assert rec.stage_seconds == {"Converting": 30.0, "Uploading": 10.0}
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("Uploading:")]
    assert lines[-1] == "Uploading:  50.0% 500.0 MiB/1000.0 MiB 50.0 MiB/s ETA 10s 10s"
    assert json.loads(out.getvalue().splitlines()[-1][len(PROGRESS_PREFIX) :])["etaSeconds"] == 10
    rep.done()
    clock.t += 100  # time after done() does not count to the stage
    assert rep.stage_seconds() == {"Converting": 30.0, "Uploading": 10.0}
    rep.stage("Uploading", 10)  # a stage that runs again adds up
    clock.t += 2
    assert rep.stage_seconds() == {"Converting": 30.0, "Uploading": 12.0}


def test_status_patch_nulls_what_progress_lost() -> None:
    """A merge patch merges objects: the finished stage's rate and ETA must be sent as
    null, or status.progress of a published checkpoint would keep them."""
    from preshard.core.status import status_patch

    old = {
        "phase": "Running",
        "progress": {"stage": "Uploading", "bytesDone": 1, "rate": "1 B/s", "eta": "3s"},
    }
    new = {"phase": "Succeeded", "progress": {"stage": "Published", "bytesDone": 5}}
    assert status_patch(old, new) == {
        "phase": "Succeeded",
        "progress": {"stage": "Published", "bytesDone": 5, "rate": None, "eta": None},
    }
    assert status_patch(new, new) == {}
