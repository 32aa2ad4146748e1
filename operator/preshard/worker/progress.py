"""Progress for people (stderr: a bar on a terminal, periodic lines otherwise) and for the
operator (stdout: ``PRESHARD-PROGRESS {json}`` lines it reads from the pod log), and the
final result in the container's termination message."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from preshard.core.contract import TERMINATION_LOG
from preshard.core.progress import (
    ProgressRecord,
    RateMeter,
    Result,
    eta_seconds,
    format_duration,
    format_rate,
)
from preshard.core.quantity import format_bytes

log = logging.getLogger(__name__)


class Reporter:
    """Thread-safe progress reporter; transfer threads call :meth:`advance` concurrently."""

    def __init__(
        self,
        mode: str = "auto",
        stream: TextIO | None = None,
        machine_stream: TextIO | None = None,
        line_interval: float = 10.0,
        record_interval: float = 2.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.machine = machine_stream if machine_stream is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", lambda: False)
            mode = "bar" if isatty() else "lines"
        if mode not in ("bar", "lines"):
            raise ValueError(f"progress mode must be auto, bar or lines, not {mode!r}")
        self.mode = mode
        self.line_interval = line_interval
        self.record_interval = record_interval
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._total = 0
        self._done = 0
        self._stage_start = 0.0
        self._stage_base = 0.0
        self._stage_closed = False  # done() was called: its duration is final
        self._last_line = 0.0
        self._last_record = 0.0
        self._meter = RateMeter()
        # Seconds per stage, in the order the stages ran (a repeated stage adds up).
        self._stage_seconds: dict[str, float] = {}
        self.records: list[ProgressRecord] = []  # kept for tests and summaries

    # -- public API ---------------------------------------------------------------------
    def stage(self, name: str, total_bytes: int = 0) -> None:
        with self._lock:
            self._finish_bar()
            now = time.monotonic()
            self._close_stage(now)
            self._stage, self._total, self._done = name, max(0, int(total_bytes)), 0
            self._stage_start = self._last_line = now
            self._stage_base = self._stage_seconds.get(name, 0.0)
            self._stage_closed = False
            self._meter.reset(now)
            self._emit_record(force=True)
            total = f" ({format_bytes(self._total)})" if self._total else ""
            self._write(f"{name}{total}\n")

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._done += n
            now = time.monotonic()
            self._meter.update(now, self._done)
            self._emit_record(force=False, now=now)
            if self.mode == "bar":
                self._draw_bar(now)
            elif now - self._last_line >= self.line_interval:
                self._last_line = now
                self._write(self._line(now) + "\n")

    def done(self) -> None:
        with self._lock:
            if self._stage is None:
                return
            now = time.monotonic()
            self._emit_record(force=True, now=now)
            if self.mode == "bar":
                self._draw_bar(now)
                self._finish_bar()
            self._write(f"done: {self._line(now)}\n")
            self._close_stage(now)

    def message(self, text: str) -> None:
        with self._lock:
            self._finish_bar()
            self._write(text.rstrip("\n") + "\n")

    @property
    def bytes_done(self) -> int:
        return self._done

    def stage_seconds(self) -> dict[str, float]:
        """Seconds spent in each stage so far (the current one until now), for the
        result's ``stages`` (status.progress.stageSeconds on success)."""
        with self._lock:
            return self._durations(time.monotonic())

    # -- internals (lock held) ------------------------------------------------------------
    def _durations(self, now: float) -> dict[str, float]:
        out = dict(self._stage_seconds)
        if self._stage is not None and not self._stage_closed:
            out[self._stage] = self._stage_base + (now - self._stage_start)
        return {k: round(v, 1) for k, v in out.items()}

    def _close_stage(self, now: float) -> None:
        if self._stage is not None and not self._stage_closed:
            self._stage_seconds[self._stage] = self._stage_base + (now - self._stage_start)
            self._stage_closed = True

    def _rate_eta(self, now: float) -> tuple[float | None, float | None]:
        """The smoothed rate, or the stage's average while there is no smoothed one yet
        (and, once the stage is done, its average), and the ETA at that rate."""
        rate = self._meter.rate
        elapsed = now - self._stage_start
        if (rate is None or self._done >= self._total > 0) and elapsed > 0 and self._done:
            rate = self._done / elapsed
        if not self._total:
            return (rate if self._done else None), None
        return rate, eta_seconds(self._done, self._total, rate)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # closed pipe: progress must never break the work
            pass

    def _line(self, now: float) -> str:
        elapsed = max(now - self._stage_start, 1e-6)
        rate, eta = self._rate_eta(now)
        pct = f" {100 * self._done / self._total:5.1f}%" if self._total else ""
        total = f"/{format_bytes(self._total)}" if self._total else ""
        speed = f" {format_rate(rate)}" if rate is not None else ""
        left = (
            f" ETA {format_duration(eta)}" if eta is not None and self._done < self._total else ""
        )
        return (
            f"{self._stage}:{pct} {format_bytes(self._done)}{total}{speed}{left} "
            f"{format_duration(elapsed)}"
        )

    def _draw_bar(self, now: float) -> None:
        width = 30
        frac = min(1.0, self._done / self._total) if self._total else 0.0
        filled = int(frac * width)
        self._write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self._line(now)}\x1b[K")

    def _finish_bar(self) -> None:
        if self.mode == "bar" and self._stage is not None:
            self._write("\n")

    def _emit_record(self, force: bool, now: float | None = None) -> None:
        if self._stage is None:
            return
        now = time.monotonic() if now is None else now
        if not force and now - self._last_record < self.record_interval:
            return
        self._last_record = now
        rate, eta = self._rate_eta(now)
        rec = ProgressRecord(
            self._stage,
            self._done,
            self._total,
            time.time(),
            rate=rate,
            eta=eta,
            stage_seconds=self._durations(now),
        )
        self.records.append(rec)
        try:
            self.machine.write(rec.to_line() + "\n")
            self.machine.flush()
        except (OSError, ValueError):
            pass


def termination_log_path() -> Path | None:
    """Where the result goes: $PRESHARD_TERMINATION_LOG, else /dev/termination-log when
    it exists (Kubernetes creates it), else nowhere."""
    env = os.environ.get("PRESHARD_TERMINATION_LOG")
    if env:
        return Path(env)
    default = Path(TERMINATION_LOG)
    return default if default.exists() else None


def write_result(result: Result) -> bool:
    """Write the result to the termination message; never raises. True if written."""
    path = termination_log_path()
    if path is None:
        return False
    try:
        path.write_text(result.to_message())
        return True
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc)
        return False


class Terminated(BaseException):
    """SIGTERM arrived (pod deletion, Job deadline, a user): stop engines and exit
    (``commands.runner`` turns SIGTERM into it for the commands that ask)."""

    note = ""  # what became of an upload in progress (the conversion sets it)
