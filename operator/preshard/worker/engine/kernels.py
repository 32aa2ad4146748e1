"""What this machine's vLLM can run for a quantization method: probed, not listed.

vLLM's ``CpuPlatform.supported_quantization`` lets every method through and the engine
fails later; which kernels exist is a property of the machine (AMX, AMX-FP8, the _C ops
the build registered), not of the vLLM version. The probe asks vLLM itself: it builds
one small linear layer (``ReplicatedLinear`` 256x256 in bf16) with the method's own
``QuantizationConfig`` (so vLLM's kernel chooser runs as in the engine), fills its
weights, runs the method's ``process_weights_after_loading`` (the online quantization
and the kernel's repacking) and one ``apply``; the exception any of them raises is the
kernel's own reason. It runs in a child process (vLLM's single-rank process group, a
CPU-only import; ~20 s) so the caller keeps no vLLM state.

Covered: the linear kernels of the online shorthands and of checkpoint methods whose
``from_config`` takes the checkpoint's ``quantization_config`` (its errors too: vLLM
would raise them in the engine). Not covered: MoE experts kernels (a dense probe layer);
an online method with no linear part (``int8_per_channel_weight_only``) probes the
unquantized linear path, and a checkpoint method that gives a linear layer no method at
all is reported as supported (nothing to ask).

``python -m preshard.worker.engine.kernels METHOD [QUANTIZATION_CONFIG_JSON]`` prints
``{"method": ..., "reason": null|"..."}`` (what ``probe_quantization`` runs).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 300.0
_SIZE = 256
# LinearBase's error when the method returns no quant method for a linear layer
_NO_LINEAR_METHOD = "All linear layers should support quant method"


def probe_quantization(
    method: str | None,
    quantization_config: dict[str, Any] | None = None,
    *,
    timeout: float = PROBE_TIMEOUT,
) -> str | None:
    """None when this machine's vLLM has a kernel for ``method`` (one linear layer
    quantized, processed and applied), else the kernel's own reason. A probe that cannot
    run at all (no vLLM, a crash, a timeout) is reported as such, never as "supported"."""
    if not method:
        return None
    cmd = [sys.executable, "-m", "preshard.worker.engine.kernels", method]
    if quantization_config:
        cmd.append(json.dumps(quantization_config))
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"the kernel probe for {method} did not finish within {timeout:.0f} s"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
            except ValueError:
                break
            reason = answer.get("reason")
            return reason if isinstance(reason, str) and reason else None
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return f"the kernel probe for {method} failed (exit {done.returncode}): {tail}"


def _probe_in_process(method: str, quantization_config: dict[str, Any] | None) -> str | None:
    import tempfile
    import types

    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.quantization import _ONLINE_SHORTHANDS
    from vllm.distributed import (
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization.online.base import (
        OnlineQuantizationConfig,
    )

    cfg = VllmConfig()
    # The online linear methods read only the model's dtype; no model is loaded.
    object.__setattr__(
        cfg,
        "model_config",
        types.SimpleNamespace(
            dtype=torch.bfloat16, hf_config=None, quantization=method, is_moe=False
        ),
    )
    torch.set_default_dtype(torch.bfloat16)
    with set_current_vllm_config(cfg), tempfile.TemporaryDirectory() as tmp:
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{tmp}/pg",
            backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        try:
            if method in _ONLINE_SHORTHANDS and not quantization_config:
                quant: Any = OnlineQuantizationConfig(args=_ONLINE_SHORTHANDS[method])
            else:
                quant = get_quantization_config(method).from_config(
                    dict(quantization_config or {"quant_method": method})
                )
            layer = ReplicatedLinear(
                _SIZE,
                _SIZE,
                bias=False,
                quant_config=quant,
                prefix="model.layers.0.mlp.down_proj",
                params_dtype=torch.bfloat16,
                disable_tp=True,
            )
            gen = torch.Generator().manual_seed(0)
            for name, param in list(layer.named_parameters(recurse=False)):
                if param.device.type == "meta":
                    data = torch.randn(param.shape, generator=gen).to(param.dtype) * 0.02
                    setattr(layer, name, torch.nn.Parameter(data, requires_grad=False))
                elif param.dtype.is_floating_point and param.numel() > 0:
                    param.data.copy_(
                        (torch.rand(param.shape, generator=gen) * 0.02 + 0.01).to(param.dtype)
                    )
            layer.quant_method.process_weights_after_loading(layer)
            x = torch.randn(4, _SIZE, generator=gen).to(torch.bfloat16)
            layer.quant_method.apply(layer, x)
        except Exception as exc:
            if _NO_LINEAR_METHOD in str(exc):
                # the method has no linear part (an MoE-only checkpoint method): nothing
                # this dense probe layer can ask; not a refusal
                return None
            text = " ".join(str(exc).split())[:500] or type(exc).__name__
            return f"{type(exc).__name__}: {text}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    method = args[0]
    qc = json.loads(args[1]) if len(args) > 1 else None
    reason = _probe_in_process(method, qc)
    print(json.dumps({"method": method, "reason": reason}), flush=True)
    # vLLM's process group and threads: leave at once, the answer is printed
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
