"""Records the worker emits and the operator reads: progress lines and the final result.

Progress goes to stdout as ``PRESHARD-PROGRESS {json}`` lines (the operator tails the pod
log); the result goes to the container's termination message (at most 4 KiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from preshard.core.quantity import format_bytes

PROGRESS_PREFIX = "PRESHARD-PROGRESS "
STAGES = ("Downloading", "Converting", "Verifying", "Uploading", "Published")
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
        data = json.loads(line[idx + len(PROGRESS_PREFIX) :])
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
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("result") not in ("Succeeded", "Failed"):
            return None
        artifact = data.get("artifact")
        verification = data.get("verification")
        return cls(
            result=data["result"],
            reason=str(data["reason"]) if data.get("reason") else None,
            message=str(data["message"]) if data.get("message") else None,
            artifact=artifact if isinstance(artifact, dict) else None,
            stages=_clean_stage_seconds(data.get("stages")) or None,
            verification=verification if isinstance(verification, dict) else None,
        )
