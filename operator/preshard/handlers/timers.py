"""The operator's timers, run from kopf's in-memory checkpoints index instead of as kopf
timers.

kopf adds its finalizer to every resource a timer matches and removes it again when
none does: a JSON patch each time a resource enters or leaves a timer's filter (its
step, its conversion's progress poll), four to six requests per resource on its way to
Ready, plus the retry of each patch that races with a status write. These timers need no
finalizer: a deleted resource leaves the index with its DELETED event and is never
visited again, and a resource being deleted is skipped. ``deletionPolicy: Delete``
resources keep kopf's finalizer for their deletion handler.

One asyncio task (started by kopf's startup handler, stopped by its cleanup handler)
walks the index every ``tick`` seconds. For each timer (a filter on the status the
operator last wrote, an interval, an initial delay) a resource is first due ``initial``
seconds after it starts matching, then every ``interval`` seconds after a run started;
it is forgotten when it stops matching (and starts over when it matches again), as kopf
timers do. A run is the handler in a thread of a small pool, one run per resource and
timer at a time, in a copy of the context kopf gives its own handlers (so ``kopf.event``
posts Events as it does from a handler). A run that raises ``kopf.TemporaryError`` (an
API failure, ``service.errors``) is due again after its delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

POOL_THREADS = 8


@dataclass(frozen=True)
class Timer:
    name: str
    when: Callable[[dict[str, Any]], bool]  # on the status the operator last wrote
    interval: float
    initial: float
    run: Callable[[dict[str, Any]], None]  # the handler, given the resource's body


class HandlerContext:
    """A copy of the context kopf runs its handlers in (taken from a handler, the
    checkpoints indexer): what ``kopf.event`` needs to post from another thread."""

    def __init__(self) -> None:
        self.context: contextvars.Context | None = None

    def capture(self) -> None:
        if self.context is None:
            self.context = contextvars.copy_context()

    def run(self, fn: Callable[..., None], *args: Any) -> None:
        base = self.context
        if base is None:
            fn(*args)
        else:
            base.copy().run(fn, *args)


def tick_for(timers: list[Timer]) -> float:
    """How often the index is walked: a quarter of the shortest period, 0.25 to 5 s."""
    shortest = min(min(t.interval, t.initial or t.interval) for t in timers)
    return max(0.25, min(5.0, shortest / 4))


class Timers:
    """The timers over one index (``bodies()``: the resources now, each a body with
    metadata, spec and status) with ``status(body)``: the status the operator last
    wrote for it."""

    def __init__(
        self,
        timers: list[Timer],
        bodies: Callable[[], list[dict[str, Any]]],
        status: Callable[[dict[str, Any]], dict[str, Any]],
        context: HandlerContext,
        clock: Callable[[], float],
    ) -> None:
        self.timers = timers
        self.bodies = bodies
        self.status = status
        self.context = context
        self.clock = clock
        self.due: dict[tuple[str, str], float] = {}
        self.running: set[tuple[str, str]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def restart(self, name: str, uid: str) -> None:
        """Start a resource's timer over (first due after its initial delay), from any
        thread: e.g. the progress poll when the conversion's pod starts, so its first
        read comes when there is progress to read."""
        timer = next((t for t in self.timers if t.name == name), None)
        if timer is None or self.loop is None:
            return

        def restart() -> None:
            self.due[(name, uid)] = self.clock() + timer.initial

        self.loop.call_soon_threadsafe(restart)

    def due_now(self) -> list[tuple[Timer, dict[str, Any]]]:
        """The runs due now (each marked running and given its next time); resources
        that no longer match a timer are forgotten by it."""
        now = self.clock()
        out: list[tuple[Timer, dict[str, Any]]] = []
        matched: set[tuple[str, str]] = set()
        for body in self.bodies():
            meta = body.get("metadata") or {}
            uid = meta.get("uid")
            if not uid or meta.get("deletionTimestamp"):
                continue
            status = self.status(body)
            for t in self.timers:
                if not t.when(status):
                    continue
                key = (t.name, str(uid))
                matched.add(key)
                due = self.due.setdefault(key, now + t.initial)
                if now < due or key in self.running:
                    continue
                self.due[key] = now + t.interval
                self.running.add(key)
                out.append((t, body))
        for key in [k for k in self.due if k not in matched]:
            del self.due[key]
        return out

    def finished(self, timer: Timer, body: dict[str, Any], exc: BaseException | None) -> None:
        key = (timer.name, str((body.get("metadata") or {}).get("uid")))
        self.running.discard(key)
        delay = getattr(exc, "delay", None)
        if exc is not None and key in self.due and isinstance(delay, (int, float)):
            self.due[key] = self.clock() + float(delay)  # retried as kopf would
        if exc is not None:
            meta = body.get("metadata") or {}
            log.log(
                logging.DEBUG if delay is not None else logging.WARNING,
                "timer %s of %s/%s: %s",
                timer.name,
                meta.get("namespace"),
                meta.get("name"),
                exc,
            )

    def _done(self, timer: Timer, body: dict[str, Any]) -> Callable[[asyncio.Future[None]], None]:
        def done(f: asyncio.Future[None]) -> None:
            self.finished(timer, body, None if f.cancelled() else f.exception())

        return done

    async def run_forever(self, tick: float) -> None:
        loop = self.loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="preshard-timer")
        try:
            while True:
                await asyncio.sleep(tick)
                try:
                    runs = self.due_now()
                except Exception:  # never let one bad body stop every timer
                    log.exception("the timers could not walk the index")
                    continue
                for timer, body in runs:
                    fut = loop.run_in_executor(pool, self.context.run, timer.run, body)
                    fut.add_done_callback(self._done(timer, body))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def start(timers: Timers, tick: float) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(timers.run_forever(tick), name="preshard-timers")


async def stop(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
