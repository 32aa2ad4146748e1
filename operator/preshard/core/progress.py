"""Records the worker emits and the operator reads: progress lines and the final result.

Progress goes to stdout as ``PRESHARD-PROGRESS {json}`` lines (the operator tails the pod
log); the result goes to the container's termination message (at most 4 KiB).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from preshard.core.quantity import format_bytes

PROGRESS_PREFIX = "PRESHARD-PROGRESS "
# Planning: the engine-free path (convert --engine none) plans every rank's files from
# vLLM's weight loaders; Downloading: the engine path brings the source into the work dir.
STAGES = ("Planning", "Downloading", "Converting", "Verifying", "Uploading", "Published")
Stage = Literal["Downloading", "Converting", "Verifying", "Uploading", "Published"]
TERMINATION_MESSAGE_LIMIT = 4096
TRUNCATED = " [truncated]"


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 3m12s, 2h05m, 3d04h."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(bytes_per_second: float) -> str:
    """A short human rate in binary units: 812 B/s, 215.3 MiB/s."""
    size = max(0.0, float(bytes_per_second))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}/s" if unit == "B" else f"{size:.1f} {unit}/s"
        size /= 1024
    return f"{size:.1f} GiB/s"  # pragma: no cover


@dataclass
class RateMeter:
    """Smoothed transfer rate of one stage: an exponentially weighted moving average of
    the rate between updates, weighted by time (``tau`` seconds: a sample's weight
    falls to 1/e after tau), so a short stall or burst moves it only a little and an
    ETA computed from it does not jump. Updates closer than ``min_interval`` to the
    previous one are folded into the next (no spikes from bursts of small advances)."""

    tau: float = 10.0
    min_interval: float = 0.5
    _t: float | None = None
    _done: int = 0
    _rate: float | None = None

    def reset(self, t: float, done: int = 0) -> None:
        self._t, self._done, self._rate = t, done, None

    def update(self, t: float, done: int) -> float | None:
        if self._t is None:
            self.reset(t, done)
            return None
        dt = t - self._t
        if dt < self.min_interval:
            return self._rate
        inst = max(0, done - self._done) / dt
        if self._rate is None:
            self._rate = inst
        else:
            alpha = 1.0 - math.exp(-dt / self.tau)
            self._rate += alpha * (inst - self._rate)
        self._t, self._done = t, done
        return self._rate

    @property
    def rate(self) -> float | None:
        return self._rate


def eta_seconds(done: int, total: int, rate: float | None) -> float | None:
    """Seconds left at ``rate`` (None when the total or a rate is unknown)."""
    if total <= 0 or rate is None or rate <= 0 or not math.isfinite(rate):
        return None
    return max(0, total - done) / rate


def _clean_stage_seconds(raw: Any) -> dict[str, float]:
    """Durations per stage from untrusted input: known stage names, finite values >= 0."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for k, v in raw.items():
        ok = k in STAGES and isinstance(v, int | float) and not isinstance(v, bool)
        if ok and math.isfinite(v) and v >= 0:
            out[k] = round(float(v), 1)
    return out


def status_stage_seconds(raw: Any) -> dict[str, int]:
    """status.progress.stageSeconds: whole seconds per known stage."""
    return {k: round(v) for k, v in _clean_stage_seconds(raw).items()}


VERIFICATION_MAX_CHECKS = 16


def _text(v: Any, limit: int) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return None
    v = " ".join(v.split())
    return v if len(v) <= limit else v[: limit - len(TRUNCATED)] + TRUNCATED


def verification_status(raw: Any) -> dict[str, Any] | None:
    """status.progress.verification from the worker's result: the fields the CRD
    declares (``passed``, ``summary``, ``checks[] {name, passed, detail}``), with their
    length limits; anything else is dropped (the API server would prune it). ``passed``
    is False when any check failed, whatever the worker claimed."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    checks = []
    for c in raw.get("checks") or [] if isinstance(raw.get("checks"), list) else []:
        if not isinstance(c, dict):
            continue
        check: dict[str, Any] = {}
        if (name := _text(c.get("name"), 128)) is not None:
            check["name"] = name
        if isinstance(c.get("passed"), bool):
            check["passed"] = c["passed"]
        if (detail := _text(c.get("detail"), 512)) is not None:
            check["detail"] = detail
        if check:
            checks.append(check)
    passed = raw.get("passed")
    if isinstance(passed, bool):
        out["passed"] = passed and all(c.get("passed", True) for c in checks)
    if (summary := _text(raw.get("summary"), 1024)) is not None:
        out["summary"] = summary
    if checks:
        out["checks"] = checks[:VERIFICATION_MAX_CHECKS]
    return out or None


@dataclass(frozen=True)
class ProgressRecord:
    stage: str
    bytes_done: int = 0
    bytes_total: int = 0
    ts: float = 0.0
    rate: float | None = None  # smoothed bytes/s of this stage (byte stages)
    eta: float | None = None  # seconds left at that rate
    # Seconds spent in each stage so far (this one: until ts); stages in order.
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self.stage,
            "bytesDone": int(self.bytes_done),
            "bytesTotal": int(self.bytes_total),
            "ts": round(self.ts, 3),
        }
        if self.rate is not None:
            out["bytesPerSecond"] = int(self.rate)
        if self.eta is not None:
            out["etaSeconds"] = math.ceil(self.eta)
        if self.stage_seconds:
            out["stageSeconds"] = {k: round(v, 1) for k, v in self.stage_seconds.items()}
        return out

    def to_line(self) -> str:
        return PROGRESS_PREFIX + json.dumps(self.to_json(), separators=(",", ":"))

    def to_status(self) -> dict[str, Any]:
        """The ``status.progress`` object (no timestamp: it would churn status). Rate and
        ETA come as numbers and as short text (``kubectl get -o wide`` columns)."""
        out: dict[str, Any] = {"stage": self.stage, "bytesDone": int(self.bytes_done)}
        out["bytesTotal"] = int(self.bytes_total)
        if self.rate is not None:
            out["bytesPerSecond"] = int(self.rate)
            out["rate"] = format_rate(self.rate)
        if self.eta is not None:
            out["etaSeconds"] = math.ceil(self.eta)
            out["eta"] = format_duration(self.eta)
        if self.stage_seconds:
            out["stageSeconds"] = status_stage_seconds(self.stage_seconds)
        return out

    def summary(self) -> str:
        """``512.0 MiB of 2.0 GiB, 210.4 MiB/s, ETA 7s`` (what is known of it)."""
        parts = []
        if self.bytes_total:
            parts.append(f"{format_bytes(self.bytes_done)} of {format_bytes(self.bytes_total)}")
        if self.rate is not None:
            parts.append(format_rate(self.rate))
        if self.eta is not None:
            parts.append(f"ETA {format_duration(self.eta)}")
        return ", ".join(parts)


def _opt_nonneg(data: dict[str, Any], key: str) -> float | None:
    v = data.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) and v >= 0 else None


def parse_progress_line(line: str) -> ProgressRecord | None:
    """Parse one log line; None for anything that is not a well-formed progress record
    (optional fields that are malformed are dropped, not trusted)."""
    idx = line.find(PROGRESS_PREFIX)
    if idx < 0:
        return None
    try:
        data = bounded_json(line[idx + len(PROGRESS_PREFIX) :], MAX_LINE_BYTES, finite=False)
        if not isinstance(data, dict):
            return None
        stage = data["stage"]
        if stage not in STAGES:
            return None
        ts = float(data.get("ts", 0.0))
        if not math.isfinite(ts):
            return None
        return ProgressRecord(
            stage=stage,
            bytes_done=max(0, int(data.get("bytesDone", 0))),
            bytes_total=max(0, int(data.get("bytesTotal", 0))),
            ts=ts,
            rate=_opt_nonneg(data, "bytesPerSecond"),
            eta=_opt_nonneg(data, "etaSeconds"),
            stage_seconds=_clean_stage_seconds(data.get("stageSeconds")),
        )
    # OverflowError: int() of Infinity or 1e400, both valid for Python's json.
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        return None


def last_progress(log_text: str) -> ProgressRecord | None:
    """The newest progress record in a chunk of log text."""
    for line in reversed(log_text.splitlines()):
        rec = parse_progress_line(line)
        if rec is not None:
            return rec
    return None


@dataclass(frozen=True)
class Result:
    """The worker's final word, written to the termination message."""

    result: Literal["Succeeded", "Failed"]
    reason: str | None = None
    message: str | None = None
    artifact: dict[str, Any] | None = field(default=None)
    # Seconds per stage (Reporter.stage_seconds()), shown in status.progress.stageSeconds.
    stages: dict[str, float] | None = None
    # On success: what was verified and that it matched (filled by the conversion),
    # shown as status.progress.verification.
    verification: dict[str, Any] | None = None

    def to_message(self) -> str:
        """The JSON text, at most TERMINATION_MESSAGE_LIMIT bytes when it can be.

        Too long (a very long error): a failure's artifact is dropped, then the message is
        cut to the longest prefix that fits with " [truncated]"; the structure is kept.
        """
        data = {k: v for k, v in asdict(self).items() if v is not None}
        text = _dumps(data)
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
            return text
        # What is for people only goes first: the verification summary, the durations.
        for optional in ("verification", "stages"):
            if data.pop(optional, None) is not None:
                text = _dumps(data)
                if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                    return text
        if self.result == "Failed" and data.pop("artifact", None) is not None:
            text = _dumps(data)
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                return text
        message = self.message or ""
        if not message:
            return text  # nothing to shorten

        def cut(n: int) -> str:
            return _dumps({**data, "message": message[:n] + TRUNCATED})

        # The encoded size grows with the prefix length (JSON escapes make characters
        # 1-12 bytes, so bytes cannot be turned into characters): binary search.
        lo, hi = 0, min(len(message), TERMINATION_MESSAGE_LIMIT)  # a character is >= 1 byte
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(cut(mid).encode()) <= TERMINATION_MESSAGE_LIMIT:
                lo = mid
            else:
                hi = mid - 1
        return cut(lo)

    @classmethod
    def from_message(cls, text: str | None) -> Result | None:
        """The Result in a termination message, parsed as tenant input (:func:`bounded_json`,
        :func:`artifact_problem`): None when there is no message (or one that is not JSON
        at all: a log tail); a malformed one (too
        large, too deep, a huge number, not a Result) becomes a Failed Result with reason
        ``InvalidResult`` and what was wrong, never an exception."""
        if not text or text.lstrip()[:1] not in ("{", "["):
            # nothing, or the log tail the kubelet records for a container that wrote no
            # message (FallbackToLogsOnError): no result, the Job's own outcome stands
            return None
        try:
            data = bounded_json(text, MAX_RESULT_BYTES)
        except UntrustedJsonError as exc:
            return invalid_result(str(exc))
        if not isinstance(data, dict) or data.get("result") not in ("Succeeded", "Failed"):
            return invalid_result('it is not an object with "result": "Succeeded" or "Failed"')
        artifact = data.get("artifact")
        if not isinstance(artifact, dict):
            if data["result"] == "Succeeded" and artifact is not None:
                return invalid_result('"artifact" is not an object')
            artifact = None  # a failure's artifact is not read
        problem = artifact_problem(artifact) if artifact else None
        if problem is not None:
            return invalid_result(problem)
        verification = data.get("verification")
        return cls(
            result=data["result"],
            reason=_scalar(data.get("reason")),
            message=_scalar(data.get("message")),
            artifact=artifact or None,
            stages=_clean_stage_seconds(data.get("stages")) or None,
            verification=verification if isinstance(verification, dict) else None,
        )


# ------------------------------------------------------------ untrusted JSON (tenant input)

INVALID_RESULT = "InvalidResult"
# A termination message larger than the kubelet's own cap (4096 bytes per container)
# cannot come from a kubelet.
MAX_RESULT_BYTES = TERMINATION_MESSAGE_LIMIT
# The deepest a preshard record nests is 4 (result > artifact > output > manifest);
# config.json's quantization_config one or two more.
MAX_JSON_DEPTH = 12
# Integers preshard reports are sizes, counts and config values: all fit an int64.
MAX_INT = 2**63 - 1
MAX_LINE_BYTES = 8192  # one progress line


class UntrustedJsonError(ValueError):
    """JSON from a pod refused before or while parsing (the message says why)."""


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``limit`` (a scan outside
    strings, before any parser recurses)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _parse_int(s: str) -> int:
    if len(s) > 20:  # before int(): never convert a long digit string
        raise UntrustedJsonError(f"a number has {len(s)} digits (at most 19)")
    v = int(s)
    if abs(v) > MAX_INT:
        raise UntrustedJsonError("a number exceeds the int64 range")
    return v


def _parse_float(s: str) -> float:
    if len(s) > 64:
        raise UntrustedJsonError(f"a number is {len(s)} characters long (at most 64)")
    v = float(s)
    if not math.isfinite(v) or abs(v) > MAX_INT:
        raise UntrustedJsonError("a number is not finite or exceeds the int64 range")
    return v


def _refuse_constant(s: str) -> Any:
    raise UntrustedJsonError(f"{s} is not a JSON number")


def _lenient_float(s: str) -> float:
    if len(s) > 64:
        raise UntrustedJsonError(f"a number is {len(s)} characters long (at most 64)")
    return float(s)


def bounded_json(
    text: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, *, finite: bool = True
) -> Any:
    """``json.loads`` for text a pod wrote: at most ``max_bytes`` (UTF-8), nesting at
    most ``max_depth``, integers within int64, and (``finite``) finite floats within
    int64's range and no NaN/Infinity (else the caller drops non-finite values itself).
    Raises UntrustedJsonError (and only that) with what was wrong."""
    if len(text) > max_bytes or len(text.encode("utf-8", errors="replace")) > max_bytes:
        raise UntrustedJsonError(f"it is larger than {max_bytes} bytes")
    if _depth_exceeds(text, max_depth):
        raise UntrustedJsonError(f"it nests deeper than {max_depth} levels")
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float if finite else _lenient_float,
            parse_constant=_refuse_constant if finite else float,
        )
    except UntrustedJsonError:
        raise
    except (ValueError, RecursionError, MemoryError, OverflowError, TypeError) as exc:
        raise UntrustedJsonError(f"it is not valid JSON ({type(exc).__name__})") from None


def _scalar(v: Any) -> str | None:
    """A reason or message: a non-empty string (numbers as text), else None."""
    if isinstance(v, bool) or not isinstance(v, str | int | float) or v == "":
        return None
    return str(v)


def invalid_result(why: str) -> Result:
    return Result(
        result="Failed",
        reason=INVALID_RESULT,
        message=f"the Job's pod wrote a termination message that is not a valid result: {why}",
    )


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARTIFACT_INTS = ("files", "totalBytes", "tensorParallelSize", "pipelineParallelSize")
_ARTIFACT_TEXTS = ("uri", "manifestUri", "vllmVersion", "stateFormat", "kind")


def artifact_problem(artifact: dict[str, Any]) -> str | None:
    """What is wrong with the typed fields of a result's artifact (None: nothing). Fields
    the operator copies into status or serving must have their types: counts and sizes
    non-negative integers, the manifest digest 64 lowercase hex digits, names short
    strings; others are the step's own to check (core.preflight.parse_preflight)."""
    for k in _ARTIFACT_INTS:
        v = artifact.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"artifact.{k} is not a non-negative integer"
    sha = artifact.get("manifestSha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        return "artifact.manifestSha256 is not 64 lowercase hex digits"
    for k in _ARTIFACT_TEXTS:
        v = artifact.get(k)
        if v is not None and not (isinstance(v, str) and len(v) <= 1024):
            return f"artifact.{k} is not a string of at most 1024 characters"
    origin = artifact.get("origin")  # a copy's: becomes status.origin
    if origin is not None:
        if not isinstance(origin, dict) or set(origin) - {"uri", "manifestSha256"}:
            return "artifact.origin is not an object of uri and manifestSha256"
        uri, sha = origin.get("uri"), origin.get("manifestSha256")
        if not (isinstance(uri, str) and len(uri) <= 1024):
            return "artifact.origin.uri is not a string of at most 1024 characters"
        if not (isinstance(sha, str) and _SHA256.match(sha)):
            return "artifact.origin.manifestSha256 is not 64 lowercase hex digits"
    return None
