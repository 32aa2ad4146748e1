"""``python -m preshard.worker.planner MODEL_DIR:TP:PP:OUT.json [...]``: plan each job's
ranks (one vLLM import for all) and write each job's list of rank traces to its OUT file;
a job the planner refuses writes ``{"error": ..., "reason": ...}`` instead. Prints one
JSON line per job with its timings. For tests and benchmarks; ``--dtype`` and
``--quantization`` apply to every job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preshard.worker.planner")
    p.add_argument("jobs", nargs="+", metavar="MODEL_DIR:TP:PP:OUT")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    a = p.parse_args(argv)
    from preshard.core.errors import PreshardError
    from preshard.worker.planner.checkpoint import local_tensors
    from preshard.worker.planner.plan import PlanTiming, plan_ranks

    for job in a.jobs:
        model, tp, pp, out = job.rsplit(":", 3)
        timing = PlanTiming()
        t0 = time.monotonic()
        result: object
        try:
            result = plan_ranks(
                Path(model),
                local_tensors(Path(model)),
                tp=int(tp),
                pp=int(pp),
                dtype=a.dtype,
                quantization=a.quantization,
                timing=timing,
            )
        except PreshardError as exc:
            result = {"error": exc.message, "reason": exc.reason}
        Path(out).write_text(json.dumps(result))
        line = {
            "job": job,
            "ok": isinstance(result, list),
            "seconds": round(time.monotonic() - t0, 3),
            "setupSeconds": round(timing.setup, 3),
            "rankSeconds": [round(b + c, 3) for b, c in timing.ranks],
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
