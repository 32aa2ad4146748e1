"""The CPU keep-weights plugin against the installed vLLM (imports vLLM; no engine).

The engine-level proof (shards with every weight, and without the plugin a verification
failure) is in test_convert_vllm.py.
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
    assert "preshard.worker.vllm_plugin:register" in {ep.value for ep in eps}


def test_register_without_env_does_not_even_import_vllm() -> None:
    code = (
        "import os, sys; os.environ.pop('PRESHARD_KEEP_CPU_WEIGHTS', None);"
        "from preshard.worker import vllm_plugin; vllm_plugin.register();"
        "print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def linear_method_restored():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    mark = "_preshard_keeps_cpu_weights"
    current = UnquantizedLinearMethod.process_weights_after_loading
    was_marked = UnquantizedLinearMethod.__dict__.get(mark)
    # Start from vLLM's own method even if this process already loaded the plugin.
    UnquantizedLinearMethod.process_weights_after_loading = getattr(current, "__wrapped__", current)
    if was_marked is not None:
        delattr(UnquantizedLinearMethod, mark)
    yield UnquantizedLinearMethod
    UnquantizedLinearMethod.process_weights_after_loading = current
    if was_marked is not None:
        setattr(UnquantizedLinearMethod, mark, was_marked)
    elif mark in UnquantizedLinearMethod.__dict__:
        delattr(UnquantizedLinearMethod, mark)


def _layer(n: int = 64, k: int = 128):
    layer = torch.nn.Module()
    torch.manual_seed(0)
    layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=torch.bfloat16), requires_grad=False)
    layer.bias = None
    return layer


def test_vllm_cpu_backend_drops_linear_weights_without_the_plugin(linear_method_restored) -> None:
    """The trap itself: vLLM's own CPU path leaves an empty weight (if this starts failing,
    a newer vLLM no longer drops weights and the plugin may be unnecessary)."""
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    layer = _layer()
    linear_method_restored().process_weights_after_loading(layer)
    assert layer.weight.numel() == 0


def test_register_patches_only_with_env_and_keeps_weights(
    linear_method_restored, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preshard.worker import vllm_plugin

    method_cls = linear_method_restored
    original = method_cls.process_weights_after_loading  # vLLM's own (see the fixture)
    monkeypatch.setenv("PRESHARD_KEEP_CPU_WEIGHTS", "0")
    vllm_plugin.register()
    assert method_cls.process_weights_after_loading is original

    monkeypatch.setenv("PRESHARD_KEEP_CPU_WEIGHTS", "1")
    vllm_plugin.register()
    patched = method_cls.process_weights_after_loading
    assert patched is not original and patched.__wrapped__ is original
    vllm_plugin.register()  # idempotent: vLLM may call plugins more than once
    assert method_cls.process_weights_after_loading is patched

    layer = _layer()
    before = layer.weight.detach().clone()
    method_cls().process_weights_after_loading(layer)
    assert layer.weight.shape == (64, 128)
    assert torch.equal(layer.weight, before)
    # The layer still computes through vLLM's dispatched CPU kernel.
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    got = layer.cpu_linear(x, layer.weight, None)
    want = torch.nn.functional.linear(x, before)
    assert torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.05)


def test_register_is_a_noop_on_other_platforms(
    linear_method_restored, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.platforms import current_platform

    from preshard.worker import vllm_plugin

    monkeypatch.setenv("PRESHARD_KEEP_CPU_WEIGHTS", "1")
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    original = linear_method_restored.process_weights_after_loading
    vllm_plugin.register()
    assert linear_method_restored.process_weights_after_loading is original


def test_shard_patterns_match_vllm() -> None:
    from vllm.model_executor.model_loader import ShardedStateLoader

    from preshard.worker import verify_shards

    assert verify_shards.shard_pattern(1) == ShardedStateLoader.TP_ONLY_PATTERN
    assert verify_shards.shard_pattern(2) == ShardedStateLoader.PP_AND_TP_PATTERN
