"""``verify --against`` without trusting the checkpoint: the sharding re-planned from the
source with vLLM's own weight loaders, and the stored metadata compared with it
(``preshard.worker.verify.against`` then replays the planned writes)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from preshard.core.errors import PlannerUnavailable, VerificationFailed
from preshard.core.manifest import SHARDING_NAME
from preshard.core.sharding import Sharding, ShardingError, parse_document


def planned_sharding(
    source_dir: Path, *, tp: int, pp: int, dtype: str, quantization: str | None
) -> Sharding:
    """The sharding metadata vLLM's own weight loaders give for this source at TP x PP
    (``preshard.worker.planner``, no engine, no kernel). Refuses (permanent) when vLLM is
    not importable here or the planner cannot plan the model: never falls back to
    trusting the checkpoint."""
    from preshard.core.sharding import build_document
    from preshard.worker.planner.checkpoint import local_tensors, vllm_missing

    missing = vllm_missing()
    if missing:
        raise PlannerUnavailable(
            f"verify --against re-plans the checkpoint from the source with vLLM's weight "
            f"loaders and does not trust its {SHARDING_NAME}, but {missing} here",
        )
    from preshard.worker.planner import plan_ranks

    with stdout_to_stderr():  # vLLM logs to stdout: keep --json output clean
        docs = plan_ranks(
            Path(source_dir),
            local_tensors(Path(source_dir)),
            tp=tp,
            pp=pp,
            dtype=dtype,
            quantization=quantization,
        )
    try:
        return parse_document(json.dumps(build_document(docs)))
    except ShardingError as exc:  # pragma: no cover - the planner's own output
        raise VerificationFailed(f"the re-planned sharding metadata is invalid: {exc}") from None


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 (and ``sys.stdout``) go to stderr within: vLLM's logging and
    anything it prints stay out of a command's stdout (``--json``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _canonical(entry: dict[str, Any]) -> tuple[Any, ...]:
    """A saved tensor's entry with its writes as a set (their order carries no meaning)."""
    writes = sorted(json.dumps(w, sort_keys=True) for w in entry.get("writes", []))
    return (entry.get("shape"), entry.get("dtype"), writes)


def compare_with_plan(stored: Sharding, planned: Sharding) -> None:
    """VerificationFailed naming the first tensor where the checkpoint's own sharding
    metadata differs from the plan (parallel sizes, source tensors, saved tensors and
    every write)."""
    where = f"the stored {SHARDING_NAME} differs from vLLM's plan for this source"
    if (stored.tensor_parallel_size, stored.pipeline_parallel_size) != (
        planned.tensor_parallel_size,
        planned.pipeline_parallel_size,
    ):
        raise VerificationFailed(
            f"{where}: it describes TP {stored.tensor_parallel_size} x PP "
            f"{stored.pipeline_parallel_size}, the manifest TP {planned.tensor_parallel_size} "
            f"x PP {planned.pipeline_parallel_size}"
        )
    for name in sorted(set(planned.sources) | set(stored.sources)):
        a, b = planned.sources.get(name), stored.sources.get(name)
        if b is None:
            raise VerificationFailed(f"{where}: source tensor {name} is left out of it")
        if a is None:
            raise VerificationFailed(f"{where}: source tensor {name} is not one vLLM loads")
        if (a.get("shape"), a.get("dtype")) != (b.get("shape"), b.get("dtype")):
            raise VerificationFailed(
                f"{where}: source tensor {name} is {b.get('dtype')}{b.get('shape')} in it, "
                f"{a.get('dtype')}{a.get('shape')} in the source"
            )
    if sorted(planned.skipped_sources) != sorted(stored.skipped_sources):
        extra = sorted(set(stored.skipped_sources) ^ set(planned.skipped_sources))
        raise VerificationFailed(f"{where}: skipped source tensors differ ({extra[:5]})")
    for rank in sorted(planned.ranks):
        mine, theirs = planned.ranks[rank], stored.ranks.get(rank, {})
        for key in sorted(set(mine) | set(theirs)):
            if key not in theirs:
                raise VerificationFailed(f"{where}: tensor {key} of rank {rank} is left out")
            if key not in mine:
                raise VerificationFailed(
                    f"{where}: tensor {key} of rank {rank} is not one vLLM's model holds"
                )
            pa, sa = _canonical(mine[key]), _canonical(theirs[key])
            if pa[:2] != sa[:2]:
                raise VerificationFailed(
                    f"{where}: tensor {key} of rank {rank} is {sa[1]}{sa[0]} in it, "
                    f"{pa[1]}{pa[0]} in the plan"
                )
            if pa[2] != sa[2]:
                raise VerificationFailed(
                    f"{where}: tensor {key} of rank {rank} has {len(sa[2])} write(s) in it, "
                    f"the plan {len(pa[2])} (first planned write: "
                    f"{json.loads(pa[2][0]) if pa[2] else None})"
                )
