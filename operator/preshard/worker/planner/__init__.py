"""The engine-free planner: each rank's tensors from vLLM's own weight loaders."""

from __future__ import annotations

from preshard.worker.planner.plan import PlannerUnsupported, plan_ranks

__all__ = ["PlannerUnsupported", "plan_ranks"]
