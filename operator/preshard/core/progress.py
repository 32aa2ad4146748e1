"""Records the worker emits and the operator reads: progress lines and the final result.

Progress goes to stdout as ``PRESHARD-PROGRESS {json}`` lines (the operator tails the pod
log); the result goes to the container's termination message (at most 4 KiB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PROGRESS_PREFIX = "PRESHARD-PROGRESS "
STAGES = ("Downloading", "Converting", "Verifying", "Uploading", "Published")
Stage = Literal["Downloading", "Converting", "Verifying", "Uploading", "Published"]
TERMINATION_MESSAGE_LIMIT = 4096
TRUNCATED = " [truncated]"


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class ProgressRecord:
    stage: str
    bytes_done: int = 0
    bytes_total: int = 0
    ts: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "bytesDone": int(self.bytes_done),
            "bytesTotal": int(self.bytes_total),
            "ts": round(self.ts, 3),
        }

    def to_line(self) -> str:
        return PROGRESS_PREFIX + json.dumps(self.to_json(), separators=(",", ":"))

    def to_status(self) -> dict[str, Any]:
        """The ``status.progress`` object (no timestamp: it would churn status)."""
        out: dict[str, Any] = {"stage": self.stage, "bytesDone": int(self.bytes_done)}
        out["bytesTotal"] = int(self.bytes_total)
        return out


def parse_progress_line(line: str) -> ProgressRecord | None:
    """Parse one log line; None for anything that is not a well-formed progress record."""
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
        )
    # OverflowError: int() of Infinity or 1e400, both valid for Python's json.
    except (ValueError, KeyError, TypeError, OverflowError):
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

    def to_message(self) -> str:
        """The JSON text, at most TERMINATION_MESSAGE_LIMIT bytes when it can be.

        Too long (a very long error): a failure's artifact is dropped, then the message is
        cut to the longest prefix that fits with " [truncated]"; the structure is kept.
        """
        data = {k: v for k, v in asdict(self).items() if v is not None}
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
        return cls(
            result=data["result"],
            reason=str(data["reason"]) if data.get("reason") else None,
            message=str(data["message"]) if data.get("message") else None,
            artifact=artifact if isinstance(artifact, dict) else None,
        )
