"""Load: 20 resources applied at once, the worker replaced by the fast stand-in (see
conftest); every one reaches Ready with exactly one Job."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from preshard_dev.stack import LocalStack

from .conftest import (
    checkpoint_doc,
    conversion_history,
    ready_condition,
    seed_fake_source,
    status_of,
)

pytestmark = pytest.mark.e2e
COUNT = 20


def test_twenty_resources_at_once_all_ready_with_one_job_each(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory(
        runner_options={"max_parallel": 6, "base_env": {"PRESHARD_STANDIN_SECONDS": "0"}}
    )
    seed_fake_source(stack)
    names = [f"load-{i:02d}" for i in range(COUNT)]
    for i, n in enumerate(names):
        doc = checkpoint_doc(n, tp=1 + len(n) % 2)
        # a conversion identity each (maxFileSize is part of it): with one identity, all
        # but the first few would be Ready by server-side copy instead (test_steps)
        doc["spec"]["output"]["maxFileSize"] = f"{100 + i}Mi"
        stack.apply(doc, "default")

    def all_done() -> bool:
        return all(
            status_of(stack, "default", n).get("phase") in ("Succeeded", "Failed") for n in names
        )

    stack.wait_for(all_done, 240, f"{COUNT} conversions", interval=1)
    statuses = {n: status_of(stack, "default", n) for n in names}
    not_ready = {
        n: ready_condition(s)
        for n, s in statuses.items()
        if ready_condition(s).get("status") != "True"
    }
    assert not not_ready
    jobs = stack.jobs("default", "converter")
    per_resource = Counter(j["metadata"]["labels"]["preshard.io/checkpoint"] for j in jobs)
    assert per_resource == Counter({n: 1 for n in names})
    assert stack.runner is not None
    assert len(conversion_history(stack)) == COUNT  # one conversion pod each, no retries
    # and one CPU-only preflight pod each, before it
    assert len(stack.runner.history) == 2 * COUNT
    for n, s in statuses.items():
        assert s["path"] == "Converted"
        assert s["artifact"]["uri"] == f"s3://preshard-checkpoints/{n}/"
        assert stack.configmap("default", f"{n}-serving") is not None
