"""The operator's timers over the checkpoints index (handlers.timers): first due after
the initial delay from when a resource starts matching, then every interval; forgotten
when it stops matching; one run at a time; a retry's delay honoured; a restart. The
clock is a variable (no sleeping), the index a list."""

from __future__ import annotations

from typing import Any

import kopf

from preshard.handlers import timers as tm


def body(uid: str, reason: str, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": uid, "name": uid, "namespace": "ns"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-06T00:00:00Z"
    return {"metadata": meta, "status": {"reason": reason}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(bodies: list[dict[str, Any]], clock: Clock) -> tm.Timers:
    ran: list[str] = []
    timer = tm.Timer(
        "poll", lambda s: s.get("reason") == "Running", 10.0, 5.0, lambda b: ran.append(b)
    )
    return tm.Timers([timer], lambda: bodies, lambda b: b["status"], tm.HandlerContext(), clock)


def names(runs: list[tuple[tm.Timer, dict[str, Any]]]) -> list[str]:
    return [b["metadata"]["uid"] for _, b in runs]


def test_due_after_the_initial_delay_then_every_interval() -> None:
    clock = Clock()
    bodies = [body("a", "Running"), body("b", "Pending"), body("c", "Running", deleting=True)]
    t = make(bodies, clock)
    assert t.due_now() == []  # a starts matching now: due in 5 s; b never; c is going
    clock.now += 5
    runs = t.due_now()
    assert names(runs) == ["a"]
    clock.now += 3
    assert t.due_now() == []  # still running (one run at a time)
    t.finished(runs[0][0], runs[0][1], None)
    clock.now += 7  # 10 s after the run started
    assert names(t.due_now()) == ["a"]


def test_a_resource_that_stops_matching_starts_over() -> None:
    clock = Clock()
    bodies = [body("a", "Running")]
    t = make(bodies, clock)
    t.due_now()
    bodies[0] = body("a", "Published")
    clock.now += 5
    assert t.due_now() == [] and not t.due
    bodies[0] = body("a", "Running")
    assert t.due_now() == []  # the initial delay again
    clock.now += 5
    assert names(t.due_now()) == ["a"]


def test_a_retry_is_due_after_its_delay() -> None:
    clock = Clock()
    t = make([body("a", "Running")], clock)
    t.due_now()
    clock.now += 5
    ((timer, b),) = t.due_now()
    t.finished(timer, b, kopf.TemporaryError("API error", delay=2))
    clock.now += 2
    assert names(t.due_now()) == ["a"]


def test_tick() -> None:
    t = tm.Timer("x", lambda s: True, 300.0, 300.0, lambda b: None)
    fast = tm.Timer("y", lambda s: True, 1.0, 0.5, lambda b: None)
    assert tm.tick_for([t]) == 5.0 and tm.tick_for([t, fast]) == 0.25


def test_a_restart_makes_it_due_after_the_initial_delay_again() -> None:
    clock = Clock()
    t = make([body("a", "Running")], clock)
    t.loop = type("Loop", (), {"call_soon_threadsafe": staticmethod(lambda f: f())})()  # type: ignore[assignment]
    t.due_now()
    clock.now += 4
    t.restart("poll", "a")  # e.g. the conversion's pod just started
    clock.now += 1
    assert t.due_now() == []
    clock.now += 4
    assert names(t.due_now()) == ["a"]
