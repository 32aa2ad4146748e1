"""Run in a subprocess by test_planner.py (vLLM imported once, never in pytest's own
process): plan each job with the engine-free planner and write the result as JSON.

    python planner_probe.py JOBS.json OUT_DIR

Each job: {"name", "model", "tp", "pp", "dtype"?, "quantization"?, "mode"?}; mode is
* "plan" (default): the rank traces, or {"error", "reason"} when refused;
* "no-amx": the same with ``torch.cpu._is_amx_tile_supported`` reporting False, as on a
  CPU without AMX tiles (vLLM's CPU block-FP8 kernels then refuse);
* "no-amx-raw": no AMX and the planner's kernel neutralisation turned off (shows it is
  what makes planning machine-independent);
* "computing-loader": vLLM's ``default_weight_loader`` in ``models.utils`` (AutoWeightsLoader) replaced by
  one that copies ``loaded_weight * 1`` (a computed value), as a loader that dequantizes
  or permutes would: the planner must refuse;
* "filter": builds rank 0 on the meta device, materialises it on the CPU and compares
  vLLM's own ``ShardedStateLoader._filter_subtensors`` with the planner's.
Prints one JSON line per job with its wall time.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any


def _filter_check(model: Path, tp: int, pp: int) -> dict[str, Any]:
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    from preshard.worker.planner import neutral, runtime
    from preshard.worker.planner.plan import filter_subtensors

    cfg = runtime.planning_config(model, tp=tp, pp=pp, dtype="auto", quantization=None)
    runtime.parallel_state(cfg)
    with neutral.kernels_neutral(), runtime.as_rank(tp, pp, 0, 0):
        m = runtime.build_model(cfg)
    state = dict(m.state_dict())
    mine = list(filter_subtensors(state))
    theirs = list(ShardedStateLoader._filter_subtensors(_on_cpu(state)))
    return {"mine": mine, "vllm": theirs, "stateDict": list(state)}


def _on_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """The meta state dict on real CPU memory, every storage shared as on meta (so data
    pointers tell what storage identity tells on meta)."""
    import torch

    from preshard.worker.engine.load_trace import storage_key

    storages: dict[Any, Any] = {}
    out = {}
    for key, t in state.items():
        sk = storage_key(t)
        if sk not in storages:
            storages[sk] = torch.UntypedStorage(max(t.untyped_storage().nbytes(), 1))
        out[key] = torch.empty(0, dtype=t.dtype).set_(
            storages[sk], t.storage_offset(), t.shape, t.stride()
        )
    return out


def main() -> int:
    import torch

    from preshard.core.errors import PreshardError
    from preshard.worker.planner import neutral
    from preshard.worker.planner.checkpoint import local_tensors
    from preshard.worker.planner.plan import plan_ranks

    jobs = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    real_amx = torch.cpu._is_amx_tile_supported
    real_neutral = neutral.kernels_neutral
    for job in jobs:
        mode = job.get("mode", "plan")
        model = Path(job["model"])
        torch.cpu._is_amx_tile_supported = (lambda: False) if "no-amx" in mode else real_amx
        neutral.kernels_neutral = (
            contextlib.nullcontext if mode == "no-amx-raw" else real_neutral  # type: ignore[assignment]
        )
        patched = None
        if mode == "computing-loader":
            import vllm.model_executor.models.utils as llama

            patched = llama.default_weight_loader

            def computing(param: Any, loaded_weight: Any) -> None:
                param.data.copy_(loaded_weight * 1)

            llama.default_weight_loader = computing  # type: ignore[assignment]
        t0 = time.monotonic()
        result: Any
        try:
            if mode == "filter":
                result = _filter_check(model, job["tp"], job["pp"])
            else:
                result = plan_ranks(
                    model,
                    local_tensors(model),
                    tp=job["tp"],
                    pp=job["pp"],
                    dtype=job.get("dtype", "auto"),
                    quantization=job.get("quantization"),
                )
        except PreshardError as exc:
            result = {"error": exc.message, "reason": exc.reason}
        finally:
            if patched is not None:
                import vllm.model_executor.models.utils as llama

                llama.default_weight_loader = patched
        (out_dir / f"{job['name']}.json").write_text(json.dumps(result))
        print(json.dumps({"job": job["name"], "seconds": round(time.monotonic() - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
