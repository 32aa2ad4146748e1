"""The ``preshard_raw`` vLLM model loader: save each rank's weights BEFORE processing.

vLLM's ``save_sharded_state`` writes ``model.state_dict()`` of the running model, i.e.
after ``process_weights_after_loading`` has put the weights into the kernel layout of
the converting hardware (prepacked and padded FusedMoE weights on CPU, Marlin repacking,
FP8 transposes on GPUs). ``sharded_state`` then copies those tensors into fresh
parameters and processes them AGAIN: wrong whenever processing changes a layout.

This loader is vLLM's own ``DefaultModelLoader`` with one addition: after the weight
loaders have filled the parameters, and before ``BaseModelLoader.load_model`` runs
``process_weights_after_loading``, each rank writes its state dict with vLLM's own
``ShardedStateLoader.save_model`` (same files, names and part splitting as
``save_sharded_state``). Those are exactly the tensors a fresh model holds after
``load_weights``: stock ``sharded_state``/``runai_streamer_sharded`` copy them into the
same parameters and process them on the serving hardware, whatever it is.

While the loaders run, ``preshard.worker.engine.load_trace`` records every write into a
parameter; each rank writes that trace next to its files
(``preshard-trace-rank-{rank}.json``), and the conversion merges the ranks' traces into
the checkpoint's sharding metadata (``preshard.core.sharding``).

The engine continues normally after loading (processing, reference generation), so
the conversion's reference outputs come from the very weights that were saved.

Configuration comes from the environment of the engine's processes (vLLM's
``DefaultModelLoader`` rejects unknown ``model_loader_extra_config`` keys):
``PRESHARD_RAW_SAVE_DIR`` (required), ``PRESHARD_RAW_PATTERN``,
``PRESHARD_RAW_MAX_FILE_SIZE``. Imported only inside vLLM processes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

from preshard.core.contract import LOAD_FORMAT_RAW_SAVE

LOAD_FORMAT = LOAD_FORMAT_RAW_SAVE
ENV_SAVE_DIR = "PRESHARD_RAW_SAVE_DIR"
ENV_PATTERN = "PRESHARD_RAW_PATTERN"
ENV_MAX_SIZE = "PRESHARD_RAW_MAX_FILE_SIZE"
TRACE_FILE = "preshard-trace-rank-{rank}.json"

log = logging.getLogger("vllm.preshard_raw_loader")

_registered = False


def register() -> None:
    """Register the loader with vLLM (idempotent; cheap when vLLM is already imported)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class PreshardRawLoader(DefaultModelLoader):  # type: ignore[misc,valid-type]
        """DefaultModelLoader that saves the loaded (unprocessed) state of each rank."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            # Read the source like load_format=safetensors (preshard converts safetensors
            # checkpoints only); the engine's own config keeps saying preshard_raw.
            own = copy.copy(load_config)
            own.load_format = "safetensors"
            self.load_config = own

        def get_all_weights(self, model_config: Any, model: Any) -> Any:
            tracer = getattr(self, "_preshard_tracer", None)
            for name, tensor in super().get_all_weights(model_config, model):
                if tracer is not None:
                    tracer.source(name, tensor)
                yield name, tensor

        def load_weights(self, model: Any, model_config: Any) -> None:
            from preshard.worker.engine.load_trace import LoadTracer

            save_dir = os.environ.get(ENV_SAVE_DIR)
            if not save_dir:
                raise ValueError(f"load_format={LOAD_FORMAT} needs {ENV_SAVE_DIR}")
            _refuse_online_quantization(model)
            params = dict(model.state_dict(keep_vars=True))
            tracer = LoadTracer(params)
            self._preshard_tracer = tracer
            try:
                with tracer:
                    super().load_weights(model, model_config)
            finally:
                self._preshard_tracer = None  # type: ignore[assignment]
            trace = tracer.finish(dict(model.state_dict(keep_vars=True)))
            save_raw_state(model, save_dir, trace)

    register_model_loader(LOAD_FORMAT)(PreshardRawLoader)
    _registered = True


def _refuse_online_quantization(model: Any) -> None:
    """An online method quantizes each layer during ``load_weights`` (its weights on the
    meta device until then): a raw save after it would capture processed, kernel-specific
    tensors. preshard's worker converts online methods without them
    (``core.quantization.raw_plan_quantization``); this is the loader's own guard."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "uses_meta_device", False):
            raise ValueError(
                f"load_format={LOAD_FORMAT} cannot save the raw state under an online "
                f"quantization method ({type(method).__name__} quantizes during "
                "load_weights): convert without it (the manifest carries the method)"
            )


def _rank() -> tuple[int, int, int, int]:
    from vllm.distributed import (
        get_pipeline_model_parallel_rank,
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tp_group,
    )

    tp, pp = get_tensor_model_parallel_rank(), get_pipeline_model_parallel_rank()
    return tp, pp, get_tp_group().world_size, get_pp_group().world_size


def save_raw_state(model: Any, save_dir: str, trace: Any) -> None:
    """Write this rank's files with vLLM's own writer, then its trace."""
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

    t0 = time.monotonic()
    pattern = os.environ.get(ENV_PATTERN) or None
    max_size = int(os.environ[ENV_MAX_SIZE]) if os.environ.get(ENV_MAX_SIZE) else None
    os.makedirs(save_dir, exist_ok=True)
    ShardedStateLoader.save_model(model, save_dir, pattern=pattern, max_size=max_size)
    tp, pp, tp_size, pp_size = _rank()
    rank = pp * tp_size + tp
    # What the files hold (vLLM's writer drops tensors that share memory with another).
    saved = ShardedStateLoader._filter_subtensors(model.state_dict())
    data = trace.to_json()
    data.update(
        {
            "rank": rank,
            "tpRank": tp,
            "ppRank": pp,
            "tensorParallelSize": tp_size,
            "pipelineParallelSize": pp_size,
            "saved": {
                k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for k, t in saved.items()
            },
        }
    )
    path = os.path.join(save_dir, TRACE_FILE.format(rank=rank))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)
    log.info(
        "preshard: rank %d saved %d unprocessed tensors in %.1f s",
        rank,
        len(saved),
        time.monotonic() - t0,
    )
