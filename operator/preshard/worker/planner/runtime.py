"""vLLM in one process, without an engine: its config, its parallel groups at any size,
and each rank's model built on the meta device.

Nothing here runs a kernel, allocates a weight or talks to another process:

* ``planning_config`` builds vLLM's own ``VllmConfig`` with ``EngineArgs`` (the same
  arguments the conversion's engine gets: model, TP, PP, dtype, quantization);
* ``parallel_state`` initialises vLLM's distributed state once per process, at world
  size 1 over gloo, and ``as_rank`` then makes the tensor- and pipeline-parallel group
  coordinators report the wanted size and rank (``world_size``, ``rank_in_group``,
  ``ranks``, ``rank``), which is all that parameter creation and the weight loaders ask
  them; no collective is ever called (the model is never run);
* ``build_model`` makes that rank's model under ``torch.device("meta")`` and vLLM's
  default dtype, as ``BaseModelLoader.load_model`` does, with kernel selection made
  neutral (``preshard.worker.planner.neutral``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Settings of the engine the planner stands in for (vllm_engine._engine_kwargs on CPU);
# none of them changes a parameter's shape, dtype or loader, but the config must build.
_MAX_MODEL_LEN = 256


def planning_config(
    model_dir: Path, *, tp: int, pp: int, dtype: str, quantization: str | None
) -> Any:
    """vLLM's ``VllmConfig`` for the conversion (never given to an engine)."""
    from vllm.engine.arg_utils import EngineArgs

    max_len = _MAX_MODEL_LEN
    with contextlib.suppress(Exception):
        import json

        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        mpe = cfg.get("max_position_embeddings")
        if isinstance(mpe, int) and 0 < mpe < max_len:
            max_len = mpe
    args = EngineArgs(
        model=str(model_dir),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype=dtype,  # type: ignore[arg-type]
        quantization=quantization,
        load_format="safetensors",
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=max_len,
        seed=0,
        # the config is never run: let it describe TP x PP ranks in this one process
        distributed_executor_backend="external_launcher" if tp * pp > 1 else None,
    )
    return args.create_engine_config()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_initialised = False


def parallel_state(vllm_config: Any) -> None:
    """vLLM's distributed state at world size 1 (gloo, loopback), once per process."""
    global _initialised
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    if _initialised and ps.model_parallel_is_initialized():
        return
    import torch.distributed as dist

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()  # made by someone else, perhaps without an EP group
    with set_current_vllm_config(_world_one(vllm_config)):
        if not dist.is_initialized():
            init = f"file://{tempfile.mkdtemp(prefix='preshard-plan-')}/store"
            with contextlib.suppress(OSError):
                init = f"tcp://127.0.0.1:{_free_port()}"
            ps.init_distributed_environment(
                world_size=1, rank=0, local_rank=0, distributed_init_method=init, backend="gloo"
            )
        ps.initialize_model_parallel(1, 1)
    _initialised = True


def _world_one(vllm_config: Any) -> Any:
    """A copy of the config whose parallel settings describe one process (what
    ``initialize_model_parallel(1, 1)`` reads)."""
    import copy

    cfg = copy.copy(vllm_config)
    par = copy.copy(vllm_config.parallel_config)
    par.tensor_parallel_size = 1
    par.pipeline_parallel_size = 1
    par.distributed_executor_backend = None
    cfg.parallel_config = par
    # no model: the expert-parallel group is created too (dense and MoE alike)
    cfg.model_config = None
    return cfg


@contextlib.contextmanager
def as_rank(tp: int, pp: int, tp_rank: int, pp_rank: int) -> Iterator[None]:
    """vLLM's TP and PP group coordinators report this rank of a TP x PP world."""
    from vllm.distributed import parallel_state as ps

    tp_group, pp_group = ps.get_tp_group(), ps.get_pp_group()
    rank = pp_rank * tp + tp_rank
    fields = ("world_size", "rank_in_group", "ranks", "rank")
    saved = [(g, {f: getattr(g, f) for f in fields}) for g in (tp_group, pp_group)]
    try:
        tp_group.world_size, tp_group.rank_in_group = tp, tp_rank
        tp_group.ranks = [pp_rank * tp + i for i in range(tp)]
        tp_group.rank = rank
        pp_group.world_size, pp_group.rank_in_group = pp, pp_rank
        pp_group.ranks = [i * tp + tp_rank for i in range(pp)]
        pp_group.rank = rank
        yield
    finally:
        for g, values in saved:
            for f, v in values.items():
                setattr(g, f, v)


def build_model(vllm_config: Any) -> Any:
    """The model of the current rank (``as_rank``) on the meta device, its parameters in
    vLLM's default dtype for this config, as ``BaseModelLoader.load_model`` creates it."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    model_config = vllm_config.model_config
    # Attention layers register themselves by name: one model per rank, one at a time.
    vllm_config.compilation_config.static_forward_context.clear()
    with (
        set_current_vllm_config(vllm_config),
        set_default_torch_dtype(model_config.dtype),
        torch.device("meta"),
    ):
        return initialize_model(vllm_config=vllm_config, model_config=model_config)


def quiet_vllm() -> None:
    """vLLM's INFO logging is noise for a planner that builds many models."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@contextlib.contextmanager
def inspect_in_process() -> Iterator[None]:
    """vLLM inspects a model class in a fresh Python process (``registry.
    _run_in_subprocess``, to keep CUDA out of the caller) unless its cache under
    ``VLLM_CACHE_ROOT`` holds the answer: a second vLLM import per architecture, 7-25 s
    on 2 cores, in every conversion pod (whose cache is new). The planner never starts
    an engine, or CUDA, so it inspects in its own process, where the class is imported
    anyway."""
    from vllm.model_executor.models import registry

    real = registry._run_in_subprocess
    registry._run_in_subprocess = lambda fn: fn()
    try:
        yield
    finally:
        registry._run_in_subprocess = real
