"""Subprocess probe for test_fp8_shards.py (vLLM imported here, never by pytest itself).

argv: model dir, output dir, tp, method. Plans the pre-quantized FP8 rank files
(``fp8shards.plan_quantized``), writes them with ``Fp8Builder``, and checks, independently
of the writer, every FP8 weight and scale against vLLM's own functions applied to the raw
rank tensors the RAW plan gives (bf16 files written by the plain writer): per-tensor with
``QuantFP8(static, PER_TENSOR).forward_native`` (its ``scaled_fp8_quant`` reference) after
the online method's ``weight_amax`` / all-reduce-MAX / ``_fp8_scale``; per-block with
``per_block_cast_to_fp8``. Then the rank files' state dicts are loaded into vLLM's FP8
model built from the published config.json on the meta device (the planner's model:
names, shapes and dtypes as stock vLLM creates them). Prints one JSON document.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from preshard.worker import fp8shards, shardwriter
    from preshard.worker.planner import plan_ranks
    from preshard.worker.planner.checkpoint import local_tensors
    from preshard.worker.sources import open_source

    model, out, tp, method = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    scheme = fp8shards.SCHEMES[method]
    source = open_source(str(model))
    traces = fp8shards.plan_quantized(
        model, source.tensors(), tp=tp, pp=1, dtype="auto", scheme=scheme
    )
    (out / "fp8").mkdir(parents=True, exist_ok=True)
    (out / "traces.json").write_text(json.dumps(traces))
    report = shardwriter.write_shards(
        traces, source, out / "fp8", builder=fp8shards.Fp8Builder(traces)
    )
    raw_traces = plan_ranks(model, local_tensors(model), tp=tp, pp=1, quantization=None)
    raw_report = shardwriter.write_shards(raw_traces, source, out / "raw")
    result: dict = {"files": {}, "rawFiles": {}, "checked": 0, "mismatch": []}
    for f in report.files:
        result["files"][f.name] = f.size
    for f in raw_report.files:
        result["rawFiles"][f.name] = f.size
    # --- independent check against vLLM's reference functions ---------------------
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.online.fp8 import _fp8_scale
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        GroupShape,
        weight_amax,
    )
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    raws = {
        r: load_file(str(out / "raw" / f"model-rank-{r}-part-0.safetensors")) for r in range(tp)
    }
    fp8s = {
        r: load_file(str(out / "fp8" / f"model-rank-{r}-part-0.safetensors")) for r in range(tp)
    }
    with set_current_vllm_config(VllmConfig()):
        quant = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)
    for key in traces[0]["quantized"]:
        scale_key = key[: -len("weight")] + scheme.scale_name
        experts = raws[0][key].dim() == 3  # FusedMoE w13_weight / w2_weight [E, N, K]
        if experts:  # Fp8PerTensorOnlineMoEMethod: weight_amax(w.flatten(1), dim=-1)
            amaxes = [weight_amax(raws[r][key].flatten(1), dim=-1) for r in range(tp)]
        else:
            amaxes = [weight_amax(raws[r][key]).reshape(1) for r in range(tp)]
        amax = amaxes[0]
        for a in amaxes[1:]:
            amax = torch.maximum(amax, a)  # all_reduce(MAX) over the TP (EP) group
        for r in range(tp):
            w = raws[r][key]
            got_s = fp8s[r][scale_key]
            if scheme.block is None and experts:
                scale = _fp8_scale(amax)  # [E]: one per expert
                want_q = torch.stack(
                    [quant.forward_native(w[e], scale[e])[0] for e in range(w.shape[0])]
                )
                want_s = scale.reshape(-1, 1).expand(-1, got_s.numel() // scale.numel())
                ok_s = got_s.dtype == torch.float32 and torch.equal(
                    got_s.reshape(want_s.shape), want_s
                )
            elif scheme.block is None:
                scale = _fp8_scale(amax)
                want_q, _ = quant.forward_native(w, scale)
                ok_s = bool((got_s == scale).all()) and got_s.dtype == torch.float32
            elif experts:  # Fp8PerBlockOnlineMoEMethod: each expert on its own
                parts = [
                    per_block_cast_to_fp8(w[e], block_size=[128, 128], use_ue8m0=False)
                    for e in range(w.shape[0])
                ]
                want_q = torch.stack([p[0] for p in parts])
                ok_s = torch.equal(got_s, torch.stack([p[1] for p in parts]))
            else:
                want_q, want_s = per_block_cast_to_fp8(w, block_size=[128, 128], use_ue8m0=False)
                ok_s = torch.equal(got_s, want_s)
            got_q = fp8s[r][key]
            ok_q = got_q.dtype == want_q.dtype and torch.equal(
                got_q.view(torch.uint8), want_q.view(torch.uint8)
            )
            result["checked"] += 1
            if not (ok_q and ok_s):
                result["mismatch"].append(f"rank {r} {key} weight={ok_q} scale={ok_s}")
    # serving: vLLM's FP8 checkpoint path requantizes a fused per-tensor weight to the max
    # of its part scales (requantize_with_max_scale; its scaled_fp8_quant kernel replaced
    # by the reference, as this CPU has none): with the one scale repeated, a no-op
    if scheme.block is None:
        from vllm.model_executor.layers.quantization.utils import fp8_utils, w8a8_utils

        from vllm import _custom_ops as ops

        real = ops.scaled_fp8_quant
        ops.scaled_fp8_quant = lambda x, scale: quant.forward_native(x, scale)  # type: ignore[assignment]
        try:
            noop = []
            for r in range(tp):
                for key in traces[r]["quantized"]:
                    w = fp8s[r][key].clone()
                    s = fp8s[r][key[: -len("weight")] + "weight_scale"]
                    if w.dim() == 3 and key.endswith("w13_weight"):
                        # Fp8MoEMethod: w1 and w3's scales requantized to their max
                        got_w, got_s = fp8_utils.process_fp8_weight_tensor_strategy_moe(
                            w, s.clone(), w.shape[1] // 2, w.shape[0]
                        )
                        ok = bool(torch.equal(got_s, s[:, 0]))
                    elif w.dim() == 3:  # w2: one scale per expert, used as it is
                        got_w, ok = w, True
                    else:
                        widths = [w.shape[0] // s.numel()] * s.numel()  # any split: one scale
                        got_s, got_w = w8a8_utils.requantize_with_max_scale(w, s, widths)
                        ok = bool(got_s == s[0])
                    noop.append(
                        bool(torch.equal(got_w.view(torch.uint8), fp8s[r][key].view(torch.uint8)))
                        and ok
                    )
            result["requantizeNoOp"] = noop
        finally:
            ops.scaled_fp8_quant = real  # type: ignore[assignment]
    # non-quantized tensors: identical to the raw files
    for r in range(tp):
        q = traces[r]["quantized"]
        computed = set(q) | {v["scale"] for v in q.values()}
        for k, t in fp8s[r].items():
            if k not in computed and k in raws[r] and not torch.equal(t, raws[r][k]):
                result["mismatch"].append(f"rank {r} {k} differs from the raw file")
    # --- the FP8 model as stock vLLM creates it from the published config ------------
    import tempfile

    cfg = json.loads((model / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        pub = Path(tmp)
        for p in model.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors"):
                (pub / p.name).write_bytes(p.read_bytes())
        (pub / "config.json").write_text(json.dumps(fp8shards.published_config(cfg, scheme)))
        planned = plan_ranks(pub, local_tensors(model), tp=tp, pp=1, quantization=None)
    for r in range(tp):
        want = {k: (v["shape"], v["dtype"]) for k, v in planned[r]["saved"].items()}
        got = {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in fp8s[r].items()}
        result.setdefault("modelMatches", []).append(want == got)
        if want != got:
            result["mismatch"].append(
                f"rank {r} state dict vs vLLM's FP8 model: "
                f"{sorted(set(want.items()) ^ set(got.items()))[:4]}"
            )
    result["quantizedKeys"] = sorted(traces[0]["quantized"])
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
