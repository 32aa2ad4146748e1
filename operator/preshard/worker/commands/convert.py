"""``preshard convert``: the conversion (``preshard.worker.conversion``: the engine path,
or the engine-free one), its progress, and its result (artifact, stage times,
verification) for the runner to write."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from typing import Any

from preshard.core.progress import Result
from preshard.worker.commands.runner import Done
from preshard.worker.conversion.common import ConvertRequest, format_timings
from preshard.worker.conversion.engine_path import convert
from preshard.worker.conversion.result import verification_result
from preshard.worker.progress import Reporter

WRITES_RESULT = True
STOPS_ON_SIGTERM = True


def main(args: argparse.Namespace) -> Done:
    reporter = Reporter(mode=getattr(args, "progress", "auto"))
    req: ConvertRequest | None = None
    try:
        req = ConvertRequest.from_args(args)
        outcome = convert(req, reporter)
    finally:
        _safe_done(reporter)
        # A temporary work dir (no --work-dir) cannot be resumed from (each run makes a
        # new one): removed whatever the outcome.
        if req is not None and req.temporary_work_dir:
            shutil.rmtree(req.work_dir, ignore_errors=True)
    print(
        f"preshard: published {outcome.artifact.get('uri', req.plan.output)} "
        f"(engine {outcome.engine}; {outcome.shard_summary}; {format_timings(outcome.timings)})",
        file=sys.stderr,
    )
    return Done(
        result=Result(
            result="Succeeded",
            artifact=outcome.artifact,
            stages=reporter.stage_seconds(),
            verification=verification_result(outcome.verification),
        )
    )


def _safe_done(reporter: Any) -> None:
    # The progress display must never mask the real outcome.
    with contextlib.suppress(Exception):
        reporter.done()
