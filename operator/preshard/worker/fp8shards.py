"""Pre-quantized FP8 rank files: vLLM's online FP8 methods, computed at conversion.

``convert --quantization fp8_per_tensor|fp8_per_block`` (vLLM 0.32's online methods)
publishes, by default (``--weights auto``), per-rank files that hold FP8 (e4m3) linear
weights and their scales under the names, shapes and dtypes of vLLM's serialized FP8
checkpoint path (``quant_method: fp8``; ``weight_block_size`` for per-block), with a
``config.json`` whose ``quantization_config`` makes stock vLLM load them as that
checkpoint (``load_format=sharded_state``, no ``--quantization`` flag).

How, without an engine and without any FP8 kernel:

1. Two plans of every rank (``preshard.worker.planner``): the RAW plan (no
   quantization: the values' sources, exactly what the conversion without the method
   writes) and the QUANTIZED plan (``quantization="fp8"`` over a planning dir whose
   config.json carries the synthetic ``quantization_config``: the saved names, shapes
   and dtypes, scales included). ``combine`` merges them into one trace per rank.
2. The writer (``shardwriter.write_shards(builder=Fp8Builder(...))``) fills each FP8
   weight with the quantized raw rank slice of its FUSED parameter (qkv_proj,
   gate_up_proj) and each scale with what the online method's
   ``process_weights_after_loading`` computes for that rank:

   * per-tensor (``Fp8PerTensorOnlineLinearMethod``): ``amax = weight_amax(w)``, reduced
     with MAX over the tensor-parallel group (``amax_for_tp_weight_quant``; a replicated
     layer is identical on every rank, so the group max is its own), ``scale =
     _fp8_scale(amax)``, ``w8 = static_quant(w, scale)`` (vLLM's static
     ``scaled_fp8_quant``: ``QuantFP8.forward_native``, multiply by the reciprocal).
     The serialized path's ``weight_scale`` has one entry per fused part: the one scale
     is repeated, so vLLM's requantize-to-the-max-scale at load is a no-op and the
     served values equal online quantization's (a plain checkpoint, with one scale per
     part, cannot hold this);
   * per-block (``Fp8PerBlockOnlineLinearMethod``): ``per_block_cast_to_fp8(w,
     [128, 128], use_ue8m0=False)`` over the rank's fused weight, its ``weight_scale_inv``.

``fp8_per_channel`` has no stock serialized FP8 format that vLLM's ``fp8`` method loads
with per-channel scales (that is compressed-tensors' format, not planned here): with
``--weights auto`` it publishes the raw weights (serving quantizes); ``--weights
quantized`` refuses it.

MoE experts (FusedMoE ``w13_weight`` / ``w2_weight``) follow vLLM's online MoE methods:
per-tensor (``Fp8PerTensorOnlineMoEMethod``) one scale per expert from its amax, MAX over
the TP group, written twice in the checkpoint's ``w13_weight_scale`` [E, 2] (w1 and w3)
so that the load-time requantize to their max is a no-op; per-block
(``Fp8PerBlockOnlineMoEMethod``) ``per_block_cast_to_fp8`` per expert, refused where the
online method would pad the experts to the 128 block (``check_block_experts``).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preshard.core.errors import PlanningFailed, PreshardError, UnsupportedQuantization

if TYPE_CHECKING:
    import torch

    from preshard.worker.shardbuild import SourceCache
    from preshard.worker.shardlayout import RankPlan, Saved

BLOCK = [128, 128]
# vLLM's KVCacheScaleParameter (kv_cache.py): created at -1.0, an "unset" sentinel its
# process_weights_after_loading replaces; the FP8 checkpoint path adds them to attention.
KV_SCALE_INIT = {"q_scale": -1.0, "k_scale": -1.0, "v_scale": -1.0, "prob_scale": -1.0}


@dataclass(frozen=True)
class Scheme:
    method: str  # the online method: fp8_per_tensor, fp8_per_block
    scale_name: str  # the serialized checkpoint's scale parameter
    block: list[int] | None

    def quantization_config(self) -> dict[str, Any]:
        qc: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
        if self.block is not None:
            qc["weight_block_size"] = list(self.block)
        return qc

    @property
    def name(self) -> str:
        return "per-block" if self.block is not None else "per-tensor"


SCHEMES = {
    "fp8_per_tensor": Scheme("fp8_per_tensor", "weight_scale", None),
    "fp8_per_block": Scheme("fp8_per_block", "weight_scale_inv", BLOCK),
}
NO_STOCK_FORMAT = {
    "fp8_per_channel": (
        "vLLM 0.32's fp8 checkpoint format has no per-channel weight scales (its "
        "per-channel FP8 checkpoints are compressed-tensors', which preshard does not "
        "write): publish the raw weights (--weights raw) and let serving quantize"
    ),
}
WEIGHTS_CHOICES = ("auto", "quantized", "raw")


def scheme_for(method: str | None, weights: str) -> Scheme | None:
    """The scheme to pre-quantize with, or None for the raw weights. ``weights``:
    ``auto`` (quantized where a stock format exists), ``quantized`` (refuse where not),
    ``raw``."""
    if weights == "raw" or not method:
        return None
    scheme = SCHEMES.get(method)
    if scheme is not None:
        return scheme
    if weights == "quantized":
        why = NO_STOCK_FORMAT.get(
            method, "only fp8_per_tensor and fp8_per_block are pre-quantized by preshard"
        )
        raise UnsupportedQuantization(
            f"--weights quantized with --quantization {method}: {why}",
        )
    return None


def planning_dir(model_dir: Path, scheme: Scheme, dest: Path) -> Path:
    """A copy of ``model_dir``'s non-weight files whose config.json carries the scheme's
    ``quantization_config`` (the quantized plan's config dir)."""
    shutil.copytree(model_dir, dest, dirs_exist_ok=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"] = scheme.quantization_config()
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dest


def published_config(config: dict[str, Any], scheme: Scheme) -> dict[str, Any]:
    out = copy.deepcopy(config)
    out["quantization_config"] = scheme.quantization_config()
    return out


def plan_quantized(
    model_dir: Path,
    tensors: list[Any],
    *,
    tp: int,
    pp: int,
    dtype: str,
    scheme: Scheme,
) -> list[dict[str, Any]]:
    """Every rank's combined trace (see ``combine``)."""
    from preshard.worker import planner  # type: ignore[attr-defined]

    if any(t.dtype not in ("BF16", "F16", "F32") for t in tensors if t.name.endswith("weight")):
        raise UnsupportedQuantization(
            "pre-quantized FP8 shards need an unquantized (bf16/fp16/fp32) source",
        )
    raw = planner.plan_ranks(model_dir, tensors, tp=tp, pp=pp, dtype=dtype, quantization=None)
    with tempfile.TemporaryDirectory(prefix="preshard-fp8-plan-") as tmp:
        qdir = planning_dir(model_dir, scheme, Path(tmp) / "model")
        try:
            quant = planner.plan_ranks(qdir, tensors, tp=tp, pp=pp, dtype=dtype, quantization="fp8")
        except PreshardError as exc:
            if getattr(exc, "reason", None) != "PlannerUnsupported":
                raise
            # vLLM's own FP8 checkpoint model refuses this layout (e.g. a per-rank size
            # the 128 block does not divide): no checkpoint of it can be served
            raise UnsupportedQuantization(
                f"{scheme.method} cannot be pre-quantized at TP={tp} x PP={pp}: vLLM's fp8 "
                f"checkpoint model refuses it ({exc}); convert with --weights raw",
            ) from None
    return combine(raw, quant, scheme)


EXPERT_WEIGHTS = ("w13_weight", "w2_weight")


def is_experts(key: str) -> bool:
    """A fused MoE experts weight (vLLM's FusedMoE ``w13_weight`` [E, 2I/TP, H] or
    ``w2_weight`` [E, H, I/TP])."""
    return key.rpartition(".")[2] in EXPERT_WEIGHTS


def scale_key(key: str, scheme: Scheme) -> str | None:
    """The serialized FP8 checkpoint's scale of weight ``key``: ``x.weight`` ->
    ``x.weight_scale`` (``_inv`` per-block), ``x.w13_weight`` -> ``x.w13_weight_scale``."""
    if not key.endswith("weight"):
        return None
    return key[: -len("weight")] + scheme.scale_name


def check_block_experts(key: str, shape: list[int], block: list[int]) -> None:
    """Per-block MoE experts: vLLM's online method (``Fp8PerBlockOnlineMoEMethod.
    maybe_roundup_sizes``) pads the hidden size and the per-rank intermediate size to
    multiples of the 128 block and quantizes the zero-padded experts; the fp8 checkpoint
    format holds them unpadded (vLLM's ``Fp8MoEMethod`` creates unpadded parameters and
    refines or refuses a block the per-rank size does not fill), so a padded layout has
    no checkpoint stock vLLM loads to the same values. Refused, precisely."""
    leaf = key.rpartition(".")[2]
    if leaf == "w13_weight":
        inter, hidden = shape[1] // 2, shape[2]
    else:
        hidden, inter = shape[1], shape[2]
    if inter % block[0] or hidden % block[1]:
        raise UnsupportedQuantization(
            f"{key}: fp8_per_block MoE experts need the per-rank intermediate size "
            f"({inter}) and the hidden size ({hidden}) to be multiples of {block[0]}: "
            "vLLM's online fp8_per_block pads them to the block and quantizes the padded "
            "experts, a layout no fp8 checkpoint holds (choose a tensor-parallel size that "
            "keeps intermediate_size / TP a multiple of 128, or --weights raw)",
        )


def combine(
    raw: list[dict[str, Any]], quant: list[dict[str, Any]], scheme: Scheme
) -> list[dict[str, Any]]:
    """One trace per rank: ``saved`` from the quantized plan; ``writes`` from the raw
    plan (an FP8 weight's writes build its raw rank slice); ``quantized``: FP8 weight
    key -> {scale, rawDtype, scheme}; ``initialized``: the KV-scale placeholders.
    Refuses (``UnsupportedQuantization``) what is not a 2-D linear weight with its scale
    (MoE experts) and any tensor the two plans disagree on."""
    raw_by_rank = {int(t["rank"]): t for t in raw}
    out = []
    for q in quant:
        r = raw_by_rank[int(q["rank"])]
        saved_raw = r["saved"]
        doc = {k: v for k, v in q.items() if k not in ("writes", "saved")}
        doc["saved"] = dict(q["saved"])
        writes: dict[str, Any] = {}
        quantized: dict[str, Any] = {}
        initialized: dict[str, float] = {}
        scales = set()
        for key, info in q["saved"].items():
            if info["dtype"].startswith("float8"):
                scale = scale_key(key, scheme)
                raw_info = saved_raw.get(key)
                experts = is_experts(key)
                if (
                    scale is None
                    or len(info["shape"]) != (3 if experts else 2)
                    or raw_info is None
                    or raw_info["shape"] != info["shape"]
                    or scale not in q["saved"]
                ):
                    raise UnsupportedQuantization(
                        f"{key}: not a linear weight or fused MoE experts weight with its "
                        f"{scheme.scale_name} ({info}); cannot pre-quantize this model: "
                        "convert with --weights raw",
                    )
                if experts and scheme.block is not None:
                    check_block_experts(key, info["shape"], scheme.block)
                quantized[key] = {"scale": scale, "rawDtype": raw_info["dtype"]}
                if experts:
                    quantized[key]["experts"] = True
                writes[key] = r["writes"].get(key, [])
                scales.add(scale)
        for key, info in q["saved"].items():
            if key in quantized or key in scales:
                continue
            leaf = key.rpartition(".")[2]
            if key not in saved_raw and leaf in KV_SCALE_INIT and not q["writes"].get(key):
                initialized[key] = KV_SCALE_INIT[leaf]
                continue
            if saved_raw.get(key) != info:
                raise UnsupportedQuantization(
                    f"{key}: the FP8 checkpoint plan holds it as {info}, the raw plan as "
                    f"{saved_raw.get(key)}; cannot pre-quantize this model",
                )
            if key in r["writes"]:
                writes[key] = r["writes"][key]
            if key in (r.get("initialized") or {}):
                initialized[key] = r["initialized"][key]
        doc["writes"] = writes
        doc["quantized"] = quantized
        doc["initialized"] = initialized
        doc["scheme"] = scheme.method
        out.append(doc)
    return out


def sharding_traces(combined: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The traces for ``preshard-sharding.json``: an FP8 weight's copies become
    ``derived`` writes (same regions, the same source tensors: its values are computed
    from them) and its scale one ``derived`` write over the whole tensor; everything else
    as planned. A re-shard from these files is refused (``CheckpointSource`` does not
    read a source through derived writes) and ``verify --against`` recomputes them."""
    out = []
    for t in combined:
        doc = {k: v for k, v in t.items() if k not in ("quantized", "scheme")}
        writes = dict(t["writes"])
        for key, q in (t.get("quantized") or {}).items():
            srcs = [w["source"] for w in writes.get(key, []) if w.get("op") == "copy"]
            writes[key] = [
                {"op": "derived", "sources": [w["source"]], "dst": w["dst"]}
                if w.get("op") == "copy"
                else w
                for w in writes.get(key, [])
            ]
            shape = [int(n) for n in t["saved"][q["scale"]]["shape"]]
            strides: list[int] = []
            acc = 1
            for n in reversed(shape):
                strides.insert(0, acc)
                acc *= n
            writes[q["scale"]] = [
                {"op": "derived", "sources": sorted(set(srcs)), "dst": [0, strides, shape]}
            ]
        doc["writes"] = writes
        out.append(doc)
    return out


# ------------------------------------------------------------------- the reference math


def fp8_dtype() -> torch.dtype:
    from vllm.platforms import current_platform

    dt: torch.dtype = current_platform.fp8_dtype()
    return dt


def per_tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """vLLM's ``weight_amax(weight).reshape(1)`` (in the weight's dtype)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import weight_amax

    amax: torch.Tensor = weight_amax(weight).reshape(1)
    return amax


def per_expert_amax(weight: torch.Tensor) -> torch.Tensor:
    """``Fp8PerTensorOnlineMoEMethod``'s ``weight_amax(w.flatten(1), dim=-1)``: one
    amax per expert (in the weight's dtype)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import weight_amax

    amax: torch.Tensor = weight_amax(weight.flatten(1), dim=-1)
    return amax


def per_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """The online method's ``_fp8_scale(amax)``: float32 amax / fp8 max (true division
    by a 0-d tensor)."""
    from vllm.model_executor.layers.quantization.online.fp8 import _fp8_scale

    scale: torch.Tensor = _fp8_scale(amax)
    return scale


def static_quant(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """vLLM's static per-tensor ``scaled_fp8_quant(weight, scale)``, as its pure-PyTorch
    reference ``QuantFP8.forward_native`` computes it (and the kernel: multiply by the
    reciprocal of the scale, clamp to the FP8 range, round to e4m3)."""
    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_fp8_min_max

    lo, hi = get_fp8_min_max()
    out = weight.to(torch.float32) * scale.to(torch.float32).reciprocal()
    return out.clamp(lo, hi).to(fp8_dtype())


def per_block(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``per_block_cast_to_fp8(weight, block, use_ue8m0=False)``."""
    from vllm.utils.deep_gemm import per_block_cast_to_fp8

    q, s = per_block_cast_to_fp8(weight, block_size=block, use_ue8m0=False)
    return q, s


# ------------------------------------------------------------------------ the builder


class Fp8Builder:
    """``shardwriter.write_shards``' builder for combined traces: FP8 weights and their
    scales computed per rank, everything else as ``build_tensor`` builds it."""

    def __init__(self, traces: list[dict[str, Any]]) -> None:
        from preshard.worker.shardlayout import RankPlan

        self.plans = {int(t["rank"]): RankPlan.from_trace(t) for t in traces}
        self.quantized = {int(t["rank"]): dict(t.get("quantized") or {}) for t in traces}
        schemes = {t.get("scheme") for t in traces}
        if len(schemes) != 1 or next(iter(schemes)) not in SCHEMES:
            raise PlanningFailed(
                f"combined traces name no single FP8 scheme ({schemes})",
            )
        self.scheme = SCHEMES[str(next(iter(schemes)))]
        self.scale_of = {
            rank: {v["scale"]: k for k, v in q.items()} for rank, q in self.quantized.items()
        }
        self._done: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: dict[tuple[int, str], set[str]] = {}
        # per-tensor: each layer's group amax (one small tensor per layer)
        self._amax: dict[tuple[int, str], torch.Tensor] = {}

    def raw_weight(self, rank: int, key: str, cache: SourceCache) -> torch.Tensor:
        from preshard.worker.shardbuild import build_tensor
        from preshard.worker.shardlayout import Saved

        plan = self.plans[rank]
        info = next(s for s in plan.saved if s.key == key)
        raw = Saved(key, info.shape, self.quantized[rank][key]["rawDtype"])
        return build_tensor(plan, raw, cache).reshape(info.shape)

    def quantize(self, rank: int, key: str, cache: SourceCache) -> tuple[Any, Any]:
        """(FP8 weight, the scale as its saved tensor) of ``key`` on ``rank``."""
        import torch

        weight = self.raw_weight(rank, key, cache)
        experts = bool(self.quantized[rank][key].get("experts"))
        if self.scheme.block is not None:
            if experts:  # Fp8PerBlockOnlineMoEMethod: each expert's [N, K] on its own
                parts = [per_block(weight[e], self.scheme.block) for e in range(len(weight))]
                return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
            return per_block(weight, self.scheme.block)
        amax_of = per_expert_amax if experts else per_tensor_amax
        plan = self.plans[rank]
        group = (plan.pp_rank, key)
        amax = self._amax.get(group)
        if amax is None:
            # once per layer: the MAX over the TP group of the same stage (linear:
            # amax_for_tp_weight_quant; experts, per expert: amax_for_moe_weight_quant)
            amax = amax_of(weight)
            for other, p in self.plans.items():
                if other != rank and p.pp_rank == plan.pp_rank and key in self.quantized[other]:
                    amax = torch.maximum(amax, amax_of(self.raw_weight(other, key, cache)))
            self._amax[group] = amax
        scale = per_tensor_scale(amax)
        if experts:  # Fp8PerTensorOnlineMoEMethod: one static scale per expert
            q = torch.stack([static_quant(weight[e], scale[e]) for e in range(len(weight))])
            return q, scale
        return static_quant(weight, scale), scale

    def __call__(self, plan: RankPlan, saved: Saved, cache: SourceCache) -> torch.Tensor:
        from preshard.worker.shardbuild import build_tensor

        rank = plan.rank
        wkey = saved.key if saved.key in self.quantized[rank] else None
        skey = self.scale_of[rank].get(saved.key)
        if wkey is None and skey is None:
            return build_tensor(plan, saved, cache)
        key = wkey or str(skey)
        got = self._done.get((rank, key))
        if got is None:
            got = self.quantize(rank, key, cache)
            self._done[(rank, key)] = got
        qweight, scale = got
        if wkey is not None:
            out = qweight.reshape(-1)
        else:
            # per-tensor: the one scale of a fused parameter (of each expert) repeated
            # once per part (qkv: [3]; w13: [E, 2]); per-block: the block scales
            k = scale.numel()
            n = _numel(saved.shape)
            out = scale.reshape(k, 1).expand(k, n // k if n % k == 0 else 0).reshape(-1)
            out = out.clone()
        if out.numel() != _numel(saved.shape) or str(out.dtype).removeprefix("torch.") != (
            saved.dtype
        ):
            raise PlanningFailed(
                f"rank {rank}: {saved.key} computed as {tuple(out.shape)} {out.dtype}, "
                f"the plan lists {saved.shape} {saved.dtype}",
            )
        # both halves done: forget them (one tensor of each rank in flight)
        if (rank, key) in self._done and self._served(rank, key, saved.key):
            del self._done[(rank, key)]
        return out

    def _served(self, rank: int, key: str, now: str) -> bool:
        seen = self._seen.setdefault((rank, key), set())
        seen.add(now)
        return len(seen) == 2


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
