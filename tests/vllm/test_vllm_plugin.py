"""The vLLM plugin and the preshard_raw loader against the installed vLLM (no engine).

The engine-level proof (raw shards that reload with the source's outputs, and that the
engine-free verification rebuilds bit for bit) is in test_convert_tp*.py and
test_arch_matrix.py.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.vllm


def test_entry_point_is_registered() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "preshard.worker.engine.plugin:register" in {ep.value for ep in eps}


def test_register_adds_the_raw_loader_and_nothing_else() -> None:
    """In a fresh process: vLLM's loader table gains exactly preshard_raw, a subclass of
    vLLM's DefaultModelLoader that reads safetensors; registering twice is harmless (vLLM
    calls plugins in every process, sometimes more than once)."""
    code = (
        "from vllm.model_executor import model_loader as ml\n"
        "before = set(ml._LOAD_FORMAT_TO_MODEL_LOADER)\n"
        "from preshard.worker.engine import plugin as vllm_plugin\n"
        "vllm_plugin.register(); vllm_plugin.register()\n"
        "after = set(ml._LOAD_FORMAT_TO_MODEL_LOADER)\n"
        "from vllm.config.load import LoadConfig\n"
        "from vllm.model_executor.model_loader.default_loader import DefaultModelLoader\n"
        "loader = ml.get_model_loader(LoadConfig(load_format='preshard_raw'))\n"
        "print(sorted(after - before), isinstance(loader, DefaultModelLoader),"
        " loader.load_config.load_format)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['preshard_raw'] True safetensors"


def test_vllm_cpu_backend_processing_changes_the_layout() -> None:
    """Why preshard saves BEFORE processing: vLLM's own CPU path hands unquantized
    linear weights to a prepacked kernel and leaves an empty tensor, so what
    save_sharded_state writes after processing is not what a fresh model loads."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    layer = torch.nn.Module()
    torch.manual_seed(0)
    layer.weight = torch.nn.Parameter(
        torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False
    )
    layer.bias = None
    UnquantizedLinearMethod().process_weights_after_loading(layer)
    assert layer.weight.numel() == 0


def test_shard_patterns_match_vllm() -> None:
    from vllm.model_executor.model_loader import ShardedStateLoader

    from preshard.worker.verify import shards as verify_shards

    assert verify_shards.shard_pattern(1) == ShardedStateLoader.TP_ONLY_PATTERN
    assert verify_shards.shard_pattern(2) == ShardedStateLoader.PP_AND_TP_PATTERN
