"""The engine-free planner with the real vLLM (CPU build), no engine and no kernel: every
family of the architecture matrix at TP=1/2 (and 4 where the heads allow) and PP=2, a
block-FP8 and a 4-bit GPTQ checkpoint (whose CPU engines cannot run here), planned in
ONE subprocess (tests/vllm/planner_probe.py; vLLM is never imported by pytest itself).

That the plans equal what the engine records is proven in test_arch_matrix.py (against
the matrix's own engine conversions); here: what only the planner can do, its refusals,
and its independence from the planning machine's CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from preshard.core.sharding import build_document, parse_document
from preshard_dev.tinymodel import (
    FAMILIES,
    make_tiny_fp8_block,
    make_tiny_model,
    quantize_gptq,
)

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("planner_probe.py")
# head counts of the tiny families: 2 heads except llama-gqa (4)
TP4 = ("llama-gqa",)
PP2 = ("llama-gqa", "mixtral", "qwen3-moe", "deepseek-v2")


class Plans:
    def __init__(self, base: Path) -> None:
        self.base = base
        models: dict[str, Path] = {}
        for family in FAMILIES:
            models[family] = make_tiny_model(family, base / "models" / family)
        models["fp8-block"] = make_tiny_fp8_block(base / "models" / "fp8-block")
        models["gptq"] = quantize_gptq(models["llama-gqa"], base / "models" / "gptq")
        self.models = models
        jobs: list[dict[str, Any]] = []
        for family in models:
            for tp in (1, 2, 4) if family in TP4 else (1, 2):
                jobs.append({"name": f"{family}-tp{tp}", "model": str(models[family]), "tp": tp})
        for family in PP2:
            jobs.append({"name": f"{family}-pp2", "model": str(models[family]), "tp": 1, "pp": 2})
        fp8 = str(models["fp8-block"])
        jobs += [
            {"name": "fp8-no-amx", "model": fp8, "tp": 2, "mode": "no-amx"},
            {"name": "fp8-no-amx-raw", "model": fp8, "tp": 2, "mode": "no-amx-raw"},
            {
                "name": "computing",
                "model": str(models["llama-gqa"]),
                "tp": 2,
                "mode": "computing-loader",
            },
            {"name": "tp4-2heads", "model": str(models["qwen3"]), "tp": 4},
            {"name": "llama-f32", "model": str(models["llama-gqa"]), "tp": 2, "dtype": "float32"},
            {"name": "filter-tied", "model": str(models["llama-tied"]), "tp": 2, "mode": "filter"},
            {"name": "filter-mla", "model": str(models["deepseek-v2"]), "tp": 2, "mode": "filter"},
        ]
        for j in jobs:
            j.setdefault("pp", 1)
        self.jobs = {j["name"]: j for j in jobs}
        out = base / "plans"
        out.mkdir()
        (base / "jobs.json").write_text(json.dumps(jobs))
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(PROBE), str(base / "jobs.json"), str(out)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        self.elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [x for x in proc.stdout.splitlines() if x.startswith('{"job"')]
        self.seconds = {d["job"]: d["seconds"] for d in map(json.loads, lines)}
        self.results = {n: json.loads((out / f"{n}.json").read_text()) for n in self.jobs}

    def plan(self, name: str) -> list[dict[str, Any]]:
        result = self.results[name]
        assert isinstance(result, list), f"{name}: the planner refused: {result}"
        return result


@pytest.fixture(scope="session")
def plans(tmp_path_factory: pytest.TempPathFactory) -> Plans:
    return Plans(tmp_path_factory.mktemp("planner"))


def _plan_names() -> list[str]:
    names = []
    for family in (*FAMILIES, "fp8-block", "gptq"):
        names += [f"{family}-tp{tp}" for tp in ((1, 2, 4) if family in TP4 else (1, 2))]
    return names + [f"{f}-pp2" for f in PP2]


KEYS = [
    "writes",
    "sources",
    "skippedSources",
    "aliases",
    "rank",
    "tpRank",
    "ppRank",
    "tensorParallelSize",
    "pipelineParallelSize",
    "saved",
]


@pytest.mark.parametrize("name", _plan_names())
def test_every_family_plans_exactly(plans: Plans, name: str) -> None:
    docs = plans.plan(name)
    job = plans.jobs[name]
    tp, pp = job["tp"], job["pp"]
    assert [d["rank"] for d in docs] == list(range(tp * pp))
    for d in docs:
        # the engine's trace keys, in its order; then, where the model initialises a tensor
        # no loader writes, the planner's "initialized" values
        assert list(d) in (KEYS, [*KEYS, "initialized"]), list(d)
        assert (d["tpRank"], d["ppRank"]) == (d["rank"] % tp, d["rank"] // tp)
        assert d["saved"], name
        ops = {w["op"] for ws in d["writes"].values() for w in ws}
        assert "derived" not in ops
    # the ranks' traces make valid sharding metadata, every checkpoint tensor read by
    # some rank unless the model skips it everywhere
    doc = build_document(docs)
    sharding = parse_document(json.dumps(doc))
    read = set(sharding.writes_by_source())
    assert read | set(doc["skippedSources"]) == set(doc["sources"])
    if pp == 2:  # each stage holds its own layers
        layers = [{k.split(".")[2] for k in d["saved"] if ".layers." in k} for d in docs]
        assert layers[0] and layers[1] and not layers[0] & layers[1], layers
    print(f"planner: {name} planned in {plans.seconds[name]:.2f} s")


def _copy(doc: dict[str, Any], key: str, source: str) -> list[Any]:
    found = [w for w in doc["writes"][key] if w.get("source") == source]
    assert len(found) == 1, (key, source, doc["writes"].get(key))
    return [found[0]["dst"], found[0]["src"]]


def test_block_fp8_is_planned_per_rank_with_its_block_scales(plans: Plans) -> None:
    """A block-FP8 Llama (weights float8_e4m3fn, a float32 weight_scale_inv per 128x128
    block; vLLM's CPU kernels for it need AMX) at TP=2: each rank's fused and split
    weights and their scales come out with the rank's rows/columns and blocks."""
    for d in plans.plan("fp8-block-tp2"):
        r, s = d["rank"], d["saved"]
        layer = "model.layers.1"
        assert s[f"{layer}.self_attn.qkv_proj.weight"] == {
            "shape": [384, 256],
            "dtype": "float8_e4m3fn",
        }
        assert s[f"{layer}.self_attn.qkv_proj.weight_scale_inv"] == {
            "shape": [3, 2],
            "dtype": "float32",
        }
        assert s[f"{layer}.self_attn.o_proj.weight_scale_inv"]["shape"] == [2, 1]
        assert s[f"{layer}.mlp.down_proj.weight"]["shape"] == [256, 256]
        assert s[f"{layer}.mlp.down_proj.weight_scale_inv"]["shape"] == [2, 2]
        qkv = f"{layer}.self_attn.qkv_proj"
        # q rows 128r..128r+127 of [256, 256]; k after the rank's q rows, v after k
        assert _copy(d, f"{qkv}.weight", f"{layer}.self_attn.q_proj.weight") == [
            [0, [256, 1], [128, 256]],
            [r * 128 * 256, [256, 1], [128, 256]],
        ]
        assert _copy(d, f"{qkv}.weight", f"{layer}.self_attn.v_proj.weight")[0][0] == 256 * 256
        # the scales: block row r of q's [2, 2], into row 0 of the rank's [3, 2]
        assert _copy(
            d, f"{qkv}.weight_scale_inv", f"{layer}.self_attn.q_proj.weight_scale_inv"
        ) == [
            [0, [2, 1], [1, 2]],
            [2 * r, [2, 1], [1, 2]],
        ]
        # row-parallel down_proj: input columns 256r.., scale block columns 2r..
        down = f"{layer}.mlp.down_proj"
        assert _copy(d, f"{down}.weight", f"{down}.weight")[1] == [256 * r, [512, 1], [256, 256]]
        assert _copy(d, f"{down}.weight_scale_inv", f"{down}.weight_scale_inv")[1] == [
            2 * r,
            [4, 1],
            [2, 2],
        ]


def test_planning_does_not_depend_on_the_cpu(plans: Plans) -> None:
    """On a CPU without AMX tiles vLLM cannot even build the block-FP8 model (its kernel
    is chosen in create_weights); the planner's neutral kernel choice plans it there
    exactly as here."""
    raw = plans.results["fp8-no-amx-raw"]
    assert "requires AMX tile support" in raw["error"], raw
    assert plans.results["fp8-no-amx"] == plans.plan("fp8-block-tp2")


def test_gptq_is_planned_per_rank(plans: Plans) -> None:
    for d in plans.plan("gptq-tp2"):
        s = d["saved"]
        assert s["model.layers.0.mlp.down_proj.qweight"] == {"shape": [32, 256], "dtype": "int32"}
        assert s["model.layers.0.mlp.down_proj.scales"]["shape"] == [8, 256]
        assert s["model.layers.0.self_attn.qkv_proj.qweight"]["shape"] == [32, 256]
        w = _copy(d, "model.layers.0.mlp.down_proj.qweight", "model.layers.0.mlp.down_proj.qweight")
        assert w[1] == [d["tpRank"] * 32 * 256, [256, 1], [32, 256]]


def test_a_computing_loader_is_refused_naming_parameter_and_family(plans: Plans) -> None:
    result = plans.results["computing"]
    assert result["reason"] == "PlannerUnsupported", result
    assert "LlamaForCausalLM" in result["error"]
    assert "layernorm.weight computes its values" in result["error"]


def test_an_impossible_parallelism_is_refused_with_vllms_reason(plans: Plans) -> None:
    result = plans.results["tp4-2heads"]
    assert result["reason"] == "PlannerUnsupported"
    assert "attention heads (2) must be divisible by tensor parallel size (4)" in result["error"]


@pytest.mark.parametrize("name", ["filter-tied", "filter-mla"])
def test_subtensor_filter_is_vllms(plans: Plans, name: str) -> None:
    """vLLM's own ``_filter_subtensors`` on the rank's state dict (materialised on the
    CPU with the same storage sharing) keeps exactly the tensors the planner keeps."""
    r = plans.results[name]
    assert r["mine"] == r["vllm"]
    assert len(r["mine"]) < len(r["stateDict"])  # something shared was dropped


def test_dtype_decides_the_parameters_dtype(plans: Plans) -> None:
    """--dtype float32 on a bfloat16 checkpoint: vLLM's parameters (and so the rank files)
    are float32, the copies convert; auto keeps the config's torch_dtype."""
    for d32, dauto in zip(plans.plan("llama-f32"), plans.plan("llama-gqa-tp2"), strict=True):
        assert set(d32["saved"]) == set(dauto["saved"])
        key = "model.layers.0.self_attn.qkv_proj.weight"
        assert d32["saved"][key]["dtype"] == "float32"
        assert dauto["saved"][key]["dtype"] == "bfloat16"
        assert d32["writes"][key] == dauto["writes"][key]
