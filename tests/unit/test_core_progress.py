"""preshard.core.progress: PRESHARD-PROGRESS lines and the termination-message result."""

from __future__ import annotations

import json

import pytest

from preshard.core.progress import (
    PROGRESS_PREFIX,
    STAGES,
    TERMINATION_MESSAGE_LIMIT,
    ProgressRecord,
    Result,
    last_progress,
    parse_progress_line,
)


def test_constants() -> None:
    assert PROGRESS_PREFIX == "PRESHARD-PROGRESS "
    assert STAGES == (
        "Planning",
        "Downloading",
        "Converting",
        "Verifying",
        "Uploading",
        "Published",
    )
    assert TERMINATION_MESSAGE_LIMIT == 4096


def test_record_serialisation() -> None:
    rec = ProgressRecord("Uploading", 123, 456, 1700000000.123456)
    assert rec.to_json() == {
        "stage": "Uploading",
        "bytesDone": 123,
        "bytesTotal": 456,
        "ts": 1700000000.123,
    }
    assert rec.to_line() == (
        'PRESHARD-PROGRESS {"stage":"Uploading","bytesDone":123,"bytesTotal":456,"ts":1700000000.123}'
    )
    # No timestamp in status: it would change status on every poll.
    assert rec.to_status() == {"stage": "Uploading", "bytesDone": 123, "bytesTotal": 456}


def test_record_defaults() -> None:
    assert ProgressRecord("Converting").to_status() == {
        "stage": "Converting",
        "bytesDone": 0,
        "bytesTotal": 0,
    }


@pytest.mark.parametrize("stage", STAGES)
def test_line_round_trip(stage: str) -> None:
    rec = ProgressRecord(stage, 10, 20, 5.5)
    assert parse_progress_line(rec.to_line()) == rec


def test_parse_line_with_a_log_prefix() -> None:
    # kubectl logs --timestamps / container runtimes may prefix lines.
    line = (
        '2025-01-01T00:00:00.000Z stdout F PRESHARD-PROGRESS {"stage":"Downloading","bytesDone":1}'
    )
    assert parse_progress_line(line) == ProgressRecord("Downloading", 1, 0, 0.0)


def test_parse_line_clamps_negative_byte_counts() -> None:
    line = 'PRESHARD-PROGRESS {"stage":"Uploading","bytesDone":-5,"bytesTotal":-1}'
    assert parse_progress_line(line) == ProgressRecord("Uploading", 0, 0, 0.0)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "INFO loading weights",
        "PRESHARD-PROGRESS",
        "PRESHARD-PROGRESS ",
        "PRESHARD-PROGRESS {not json",
        'PRESHARD-PROGRESS {"stage":"Sleeping"}',
        'PRESHARD-PROGRESS {"bytesDone":1}',
        "PRESHARD-PROGRESS []",
        'PRESHARD-PROGRESS "Uploading"',
        "PRESHARD-PROGRESS 42",
        'PRESHARD-PROGRESS {"stage":"Uploading","bytesDone":"many"}',
        'PRESHARD-PROGRESS {"stage":"Uploading","bytesDone":null}',
        'PRESHARD-PROGRESS {"stage":"Uploading","ts":"yesterday"}',
        'PRESHARD-PROGRESS {"stage":"Uploading","bytesDone":NaN}',
        'PRESHARD-PROGRESS {"stage":["Uploading"]}',
        'PRESHARD-PROGRESS{"stage":"Uploading"}',  # no space after the prefix
    ],
)
def test_parse_line_ignores_anything_malformed(line: str) -> None:
    assert parse_progress_line(line) is None


@pytest.mark.parametrize("value", ["Infinity", "1e400", "-Infinity"])
def test_parse_line_ignores_infinite_byte_counts(value: str) -> None:
    line = f'PRESHARD-PROGRESS {{"stage":"Uploading","bytesDone":{value}}}'
    assert parse_progress_line(line) is None


def test_last_progress_takes_the_newest_record() -> None:
    log = "\n".join(
        [
            ProgressRecord("Downloading", 1, 2, 1.0).to_line(),
            "some vLLM output",
            ProgressRecord("Converting", 0, 0, 2.0).to_line(),
            'PRESHARD-PROGRESS {"stage":"Bogus"}',
            "trailing noise",
        ]
    )
    assert last_progress(log) == ProgressRecord("Converting", 0, 0, 2.0)


@pytest.mark.parametrize("log", ["", "nothing here\nor here", 'PRESHARD-PROGRESS {"stage":1}'])
def test_last_progress_none(log: str) -> None:
    assert last_progress(log) is None


# -------------------------------------------------------------------------- Result


ARTIFACT = {
    "uri": "s3://out/m/",
    "manifestUri": "s3://out/m/preshard-manifest.json",
    "files": 3,
    "totalBytes": 100,
    "manifestSha256": "0" * 64,
    "vllmVersion": "0.32.0",
}


def test_result_succeeded_message() -> None:
    text = Result("Succeeded", artifact=ARTIFACT).to_message()
    assert text == json.dumps(
        {"artifact": ARTIFACT, "result": "Succeeded"}, separators=(",", ":"), sort_keys=True
    )
    assert Result.from_message(text) == Result("Succeeded", artifact=ARTIFACT)


def test_result_failed_message() -> None:
    res = Result("Failed", reason="SourceNotFound", message="s3://src/m/ has no config.json")
    text = res.to_message()
    assert text == (
        '{"message":"s3://src/m/ has no config.json","reason":"SourceNotFound","result":"Failed"}'
    )
    assert Result.from_message(text) == res


@pytest.mark.parametrize("char", ["x", "é", "\n", '"', "\x01", "字"])
def test_result_long_failure_is_truncated_within_the_limit(char: str) -> None:
    res = Result("Failed", reason="ConversionFailed", message=char * 10000, artifact={"a": 1})
    text = res.to_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = Result.from_message(text)
    assert back is not None
    assert back.result == "Failed"
    assert back.reason == "ConversionFailed"
    assert back.message is not None and back.message.endswith(" [truncated]")
    assert back.artifact is None  # a failure's artifact is dropped before the message


def test_result_long_ascii_failure_keeps_most_of_the_message() -> None:
    res = Result("Failed", reason="ConversionFailed", message="x" * 10000)
    back = Result.from_message(res.to_message())
    assert back is not None and back.message is not None
    assert back.message == "x" * len(back.message.removesuffix(" [truncated]")) + " [truncated]"
    assert len(back.message) > 3900


@pytest.mark.parametrize("char", ["é", "\n", '"', "字"])
def test_result_long_escaped_failure_keeps_a_prefix(char: str) -> None:
    res = Result("Failed", reason="ConversionFailed", message=char * 10000)
    back = Result.from_message(res.to_message())
    assert back is not None and back.message is not None
    assert back.message.startswith(char * 10)


@pytest.mark.parametrize("char", ["x", "é", "\n", '"', "\x01", "字", "\U0001f600"])
def test_result_truncation_keeps_the_longest_prefix_that_fits(char: str) -> None:
    res = Result("Failed", reason="ConversionFailed", message="ab" + char * 10000)
    text = res.to_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = Result.from_message(text)
    assert back is not None and back.message is not None
    kept = back.message.removesuffix(" [truncated]")
    assert ("ab" + char * 10000).startswith(kept)
    # one more character would not fit
    longer = json.loads(text) | {"message": "ab" + char * (len(kept) - 1) + " [truncated]"}
    assert len(json.dumps(longer, separators=(",", ":"), sort_keys=True).encode()) > (
        TERMINATION_MESSAGE_LIMIT
    )


def test_result_long_failure_with_a_large_artifact_keeps_its_message() -> None:
    res = Result("Failed", reason="X", message="short", artifact={"a": "x" * 5000})
    assert Result.from_message(res.to_message()) == Result("Failed", reason="X", message="short")


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1e400"])
def test_parse_line_ignores_non_finite_timestamps(value: str) -> None:
    line = f'PRESHARD-PROGRESS {{"stage":"Uploading","ts":{value}}}'
    assert parse_progress_line(line) is None


def test_result_short_messages_are_not_truncated() -> None:
    res = Result("Failed", reason="X", message="m" * 100)
    assert Result.from_message(res.to_message()) == res


@pytest.mark.parametrize("text", [None, "", "not json", '"Succeeded"', "null", "Traceback (most"])
def test_result_from_message_no_result(text: str | None) -> None:
    """No message, or one that is not JSON at all (the log tail the kubelet records with
    FallbackToLogsOnError): no result, the Job's own outcome stands."""
    assert Result.from_message(text) is None


@pytest.mark.parametrize("text", ["[]", '{"result":"Maybe"}', '{"reason":"X"}', "{not json"])
def test_result_from_message_rejects_garbage(text: str) -> None:
    """JSON that is not a Result: a failure with reason InvalidResult (tenant
    input is never trusted, and never silently taken for a missing result)."""
    res = Result.from_message(text)
    assert res is not None and res.result == "Failed" and res.reason == "InvalidResult"
    assert res.artifact is None


def test_result_from_message_normalises_fields() -> None:
    res = Result.from_message('{"result":"Failed","reason":"","message":"","artifact":[1]}')
    assert res == Result("Failed", None, None, None)
    res = Result.from_message('{"result":"Failed","reason":7,"message":8,"extra":true}')
    assert res == Result("Failed", "7", "8", None)
