"""Online methods convert unquantized; refusals that tell the truth (no vLLM engine
here: the pure parts, the conversion refusal over a preflight's probe result, the
worker's error mapping and summary wording; tests/vllm/test_quantization_online.py runs the real
probe and a real conversion)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from preshard.core import quantization as qz
from preshard.core.children.steps import build_preflight_job
from preshard.core.config import OperatorConfig
from preshard.core.errors import PlannerUnsupported
from preshard.core.identity import SourcePin
from preshard.core.preflight import Preflight, parse_preflight
from preshard.core.spec import parse_spec
from preshard.core.steps import conversion_refusal, cpu_kernel_refusal, next_step
from preshard.worker.conversion import common, engine_path
from preshard.worker.conversion import result as conv_result
from preshard.worker.engine.process import EngineError

PIN = SourcePin(None, "sha256:" + "1" * 64)
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "torch_dtype": "bfloat16",
}
NO_KERNEL = (
    "RuntimeError: _C::static_scaled_fp8_quant() expected at most 0 argument(s) but "
    "received 4 argument(s)"
)


def spec(q: str | None, accelerator: str = "cpu") -> Any:
    raw: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://out/llama/"},
        "converter": {"accelerator": accelerator, "resources": {"limits": {"memory": "1Ti"}}},
    }
    if q:
        raw["quantization"] = q
    return parse_spec(raw)


def test_online_methods_are_vllms_online_shorthands_preshard_accepts() -> None:
    from vllm.config.quantization import _DEFERRED_ONLINE_SHORTHANDS, _ONLINE_SHORTHANDS

    from preshard.core.plan import QUANTIZATIONS

    assert set(_ONLINE_SHORTHANDS) & set(QUANTIZATIONS) == qz.ONLINE_METHODS
    assert qz.DEFERRED_ONLINE_METHODS == qz.ONLINE_METHODS & _DEFERRED_ONLINE_SHORTHANDS
    # the MoE-only ones have no linear spec in vLLM's table
    for m in qz.ONLINE_METHODS:
        assert (_ONLINE_SHORTHANDS[m].linear is None) == (m in qz.MOE_ONLY_ONLINE_METHODS)


def test_online_methods_plan_unquantized_and_checkpoint_methods_keep_theirs() -> None:
    for m in ("fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "int8_per_channel_weight_only"):
        assert qz.online_method(m) and qz.raw_plan_quantization(m) is None
        assert qz.raw_plan_quantization(m, "fp8") is None  # requantization: still online
    # mxfp8 is online over an unquantized checkpoint only (vLLM's deferred shorthand)
    assert qz.raw_plan_quantization("mxfp8") is None
    assert qz.raw_plan_quantization("mxfp8", "mxfp8") == "mxfp8"
    for m in (None, "fp8", "gptq", "awq", "compressed-tensors", "experts_int8"):
        assert not qz.online_method(m) and qz.raw_plan_quantization(m) == m


def test_int8_weight_only_says_dense_layers_stay_unquantized() -> None:
    dense = qz.online_note("int8_per_channel_weight_only", moe=False)
    assert "quantizes only MoE experts" in dense and "stays unquantized" in dense
    assert "only MoE" not in qz.online_note("int8_per_channel_weight_only", moe=True)
    assert "only MoE" not in qz.online_note("fp8_per_tensor", moe=False)
    assert "before quantization" in qz.online_note("fp8_per_tensor", moe=False)
    assert common._is_moe(LLAMA) is False
    assert common._is_moe({"num_local_experts": 8, "hidden_size": 8}) is True


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        (NO_KERNEL, True),
        ("ValueError: Failed to find a kernel that can implement the MXFP8 linear layer", True),
        ("No Int8 MoE backend supports the deployment configuration", True),
        ("CPUFp8BlockScaledMMKernel requires AMX tile support", True),
        ("fp8 quantization is currently not supported in CPU.", True),
        ("Connection reset by peer", False),
        ("CUDA out of memory", False),
    ],
)
def test_a_quant_kernels_own_refusal_is_permanent(message: str, permanent: bool) -> None:
    assert qz.permanent_kernel_error(message) is permanent
    err = engine_path._conversion_error(EngineError(message, stage="load", kind="RuntimeError"))
    assert err.permanent is permanent
    if permanent:  # exit 3, never a retried exit 1
        assert err.reason == "UnsupportedQuantization" and message in err.message


def test_the_conversion_refusal_refuses_a_needed_kernel_the_probe_did_not_find() -> None:
    fp8_ckpt = {**LLAMA, "quantization_config": {"quant_method": "fp8"}}
    probed = Preflight(
        source=PIN, vllm_version="0.32.0", state="empty", config=fp8_ckpt,
        kernels={"fp8": NO_KERNEL},
    )  # fmt: skip
    g = conversion_refusal(spec("fp8"), probed, "cpu")
    assert g is not None and g.reason == "UnsupportedQuantization"
    assert "expected at most 0 argument(s)" in g.message and "accelerator: gpu" in g.message
    d = next_step(spec("fp8"), "ml/llama/uid", probed, frozenset(), [], accelerator="cpu")
    assert (d.step, d.reason) == ("CannotConvert", "UnsupportedQuantization")
    # GPUs: the CPU probe says nothing about them
    assert conversion_refusal(spec("fp8", "gpu"), probed, "gpu") is None
    # the probe found the kernel: go ahead
    ok = Preflight(
        source=PIN, vllm_version="0.32.0", state="empty", config=fp8_ckpt, kernels={"fp8": None}
    )
    assert conversion_refusal(spec("fp8"), ok, "cpu") is None
    # not probed (no vLLM in the preflight image): the static list already ran; no refusal
    unprobed = Preflight(source=PIN, vllm_version="0.32.0", state="empty", config=fp8_ckpt)
    assert conversion_refusal(spec("fp8"), unprobed, "cpu") is None


def test_the_conversion_refusal_never_refuses_an_online_method_for_its_kernel() -> None:
    p = Preflight(
        source=PIN, vllm_version="0.32.0", state="empty", config=LLAMA,
        kernels={"fp8_per_tensor": NO_KERNEL, "mxfp8": "ValueError: no MXFP8 kernel"},
    )  # fmt: skip
    assert cpu_kernel_refusal("fp8_per_tensor", p) is None
    assert conversion_refusal(spec("fp8_per_tensor"), p, "cpu") is None
    assert conversion_refusal(spec("mxfp8"), p, "cpu") is None
    # ... but mxfp8 over an MXFP8 checkpoint is the checkpoint's method: it needs a kernel
    mx = Preflight(
        source=PIN, vllm_version="0.32.0", state="empty",
        config={**LLAMA, "quantization_config": {"quant_method": "mxfp8"}},
        kernels={"mxfp8": "ValueError: no MXFP8 kernel"},
    )  # fmt: skip
    assert "no MXFP8 kernel" in (cpu_kernel_refusal("mxfp8", mx) or "")


def test_parse_preflight_reads_kernels_typed_and_bounded() -> None:
    base = {
        "kind": "preflight",
        "source": {"uri": "s3://m/", "digest": PIN.digest},
        "vllmVersion": "0.32.0",
        "output": {"state": "empty", "objects": 0, "overlapping": []},
    }
    p = parse_preflight({**base, "kernels": {"fp8": "x" * 5000, "fp8_per_block": None}})
    assert p.kernels == {"fp8": "x" * 1000, "fp8_per_block": None}
    assert parse_preflight(base).kernels is None
    assert parse_preflight({**base, "kernels": {"fp8": 3, "": "y"}}).kernels is None
    assert parse_preflight({**base, "kernels": ["fp8"]}).kernels is None


def test_the_preflight_job_probes_the_method_only_for_a_cpu_conversion() -> None:
    def args(s: Any) -> list[str]:
        job = build_preflight_job("m", "ns", "uid", s, OperatorConfig())
        return list(job["spec"]["template"]["spec"]["containers"][0]["args"])

    cpu = args(spec("fp8"))
    assert cpu[cpu.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in args(spec("fp8", "gpu"))
    assert "--quantization" not in args(spec(None))


def test_summary_says_the_quantized_engine_check_was_skipped_and_why() -> None:
    base = {"engineFree": {"matched": True, "savedTensors": 3, "sourceTensors": 3}}
    no_kernel = {
        **copy.deepcopy(base),
        "quantization": {
            "method": "fp8_per_tensor",
            "online": True,
            "note": qz.online_note("fp8_per_tensor", moe=False),
            "kernel": NO_KERNEL,
            "probed": True,
        },
    }
    s = conv_result.verification_result(no_kernel)["summary"]
    assert "engine check with fp8_per_tensor skipped: fp8_per_tensor has no kernel" in s
    assert "expected at most 0 argument(s)" in s and "before quantization" in s
    has_kernel = copy.deepcopy(no_kernel)
    has_kernel["quantization"]["kernel"] = None
    s = conv_result.verification_result(has_kernel)["summary"]
    assert "kernel exists on this machine" in s and "no kernel" not in s
    unprobed = copy.deepcopy(no_kernel)
    unprobed["quantization"]["probed"] = False
    assert "was not probed" in conv_result.verification_result(unprobed)["summary"]
    # a checkpoint method (not online) adds nothing
    plain = {**copy.deepcopy(base), "quantization": {"method": "fp8", "online": False}}
    assert (
        conv_result.verification_result(plain)["summary"]
        == conv_result.verification_result(base)["summary"]
    )


def test_the_raw_loader_refuses_to_save_under_an_online_method() -> None:
    """The loader's own guard (the worker never passes an online method to it): a layer
    whose quant method creates its weights on the meta device and quantizes during
    load_weights would have its processed tensors saved. Plain modules stand in for
    vLLM's layers here (only ``quant_method.uses_meta_device`` is read)."""
    import types

    import torch

    from preshard.worker.engine.raw_loader import _refuse_online_quantization

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].quant_method = types.SimpleNamespace(uses_meta_device=False)  # type: ignore[assignment]
    _refuse_online_quantization(model)  # unquantized / checkpoint methods: saved as always
    model[1].quant_method = types.SimpleNamespace(uses_meta_device=True)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="online quantization method"):
        _refuse_online_quantization(model)


def test_the_engine_converts_online_methods_without_them_and_refuses_missing_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """quantization_for_engine: what the conversion engine gets. TEST-ONLY stand-in for the
    probe (the real one runs in tests/vllm/test_quantization_online.py)."""
    from preshard.core.errors import PreshardError
    from preshard.core.plan import ConversionPlan
    from preshard.worker.engine import kernels

    asked: list[tuple[str | None, Any]] = []

    def probe(method: str | None, qc: Any = None, **_: Any) -> str | None:
        asked.append((method, qc))
        return NO_KERNEL

    monkeypatch.setattr(kernels, "probe_quantization", probe)
    monkeypatch.setattr(common, "on_cpu_backend", lambda: True)

    def request(q: str | None) -> Any:
        argv = ["--source", str(tmp_path), "--output", str(tmp_path / "out"), "-tp", "1"]
        plan = ConversionPlan.from_argv(argv + (["--quantization", q] if q else []))
        return common.ConvertRequest(plan=plan)

    raw, record = common.quantization_for_engine(request("fp8_per_tensor"), LLAMA)
    assert raw is None and record is not None
    assert record["kernel"] == NO_KERNEL and record["online"] and record["probed"]
    raw, record = common.quantization_for_engine(request("int8_per_channel_weight_only"), LLAMA)
    assert raw is None and record is not None and "only MoE experts" in record["note"]
    assert common.quantization_for_engine(request(None), LLAMA) == (None, None)
    fp8_ckpt = {**LLAMA, "quantization_config": {"quant_method": "fp8", "activation_scheme": "x"}}
    with pytest.raises(PreshardError) as err:
        common.quantization_for_engine(request("fp8"), fp8_ckpt)
    assert err.value.permanent and err.value.reason == "UnsupportedQuantization"
    assert NO_KERNEL in err.value.message
    assert asked[-1] == ("fp8", fp8_ckpt["quantization_config"])  # the checkpoint's config
    # not the CPU backend: nothing probed, the method goes to the engine as asked
    monkeypatch.setattr(common, "on_cpu_backend", lambda: False)
    n = len(asked)
    assert common.quantization_for_engine(request("fp8"), fp8_ckpt)[0] == "fp8"
    assert len(asked) == n


# ------------------------------------------------ spec.weights (the resource's --weights)


def weights_spec(q: str | None, weights: str | None, engine: str | None = None) -> Any:
    raw: dict[str, Any] = {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://out/llama/"},
    }
    if q:
        raw["quantization"] = q
    if weights:
        raw["weights"] = weights
    if engine:
        raw["converter"] = {"engine": engine}
    return parse_spec(raw)


def test_spec_weights_raw_reaches_the_job_the_identity_and_serving() -> None:
    from preshard.core.identity import identity_document
    from preshard.core.serving import parallel_args

    auto = weights_spec("fp8_per_block", None)
    raw = weights_spec("fp8_per_block", "raw")
    quantized = weights_spec("fp8_per_block", "quantized")
    assert auto.weights == "auto" and auto.plan().quantized_shards
    assert raw.plan().weights == "raw" and not raw.plan().quantized_shards
    argv = raw.plan().to_argv()
    assert argv[argv.index("--weights") + 1] == "raw"
    assert "--weights" not in auto.plan().to_argv()
    # the identity records exactly what the worker's records: pre-quantized or not
    docs = [identity_document(s, PIN, "0.32.0", namespace="ml") for s in (auto, raw, quantized)]
    assert [d.get("weights") for d in docs] == ["quantized", None, "quantized"]
    assert docs[0] == docs[2]
    # raw weights are served with the method; pre-quantized ones as an FP8 checkpoint
    assert "fp8_per_block" in parallel_args(raw, "none")
    assert "--quantization" not in parallel_args(quantized, "none")
    # the Job name's hash moves only for a resource that sets the field
    assert "weights" not in auto.conversion_fields()
    assert raw.conversion_fields()["weights"] == "raw"
    assert auto.conversion_hash() != raw.conversion_hash()


@pytest.mark.parametrize(
    ("q", "weights", "engine", "message"),
    [
        (
            "fp8_per_channel",
            "quantized",
            None,
            "needs quantization fp8_per_tensor or fp8_per_block",
        ),
        (None, "quantized", None, "(got none)"),
        ("fp8_per_tensor", "quantized", "vllm", "not with converter.engine vllm"),
        ("fp8_per_tensor", "fp8", None, "spec.weights"),
    ],
)
def test_spec_weights_refusals(
    q: str | None, weights: str, engine: str | None, message: str
) -> None:
    from preshard.core.errors import SpecError

    with pytest.raises(SpecError) as exc:
        weights_spec(q, weights, engine)
    assert message in str(exc.value)


def test_the_crd_declares_weights_immutable_with_the_specs_values() -> None:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    text = (root / "crds" / "shardedcheckpoints.preshard.io.yaml").read_text()
    assert text == (root / "charts/preshard/crds/shardedcheckpoints.preshard.io.yaml").read_text()
    crd = yaml.safe_load(text)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["weights"]["enum"] == ["auto", "quantized", "raw"]
    rules = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert "spec.weights is immutable: create a new ShardedCheckpoint to re-shard" in rules


# ------------------------------- a kernel's refusal on the engine-free path (issue 21, 5.)


def test_a_kernel_refusal_inside_the_planner_is_unsupported_quantization() -> None:

    planner_error = PlannerUnsupported(
        "LlamaForCausalLM's weight loaders do not run on shape-only tensors: " + NO_KERNEL,
    )
    err = qz.unsupported_quantization("fp8", planner_error)
    assert err is not None and err.reason == "UnsupportedQuantization" and err.permanent
    assert "'fp8' has no kernel on this machine" in err.message and NO_KERNEL in err.message
    # not a kernel's refusal, or no quantization asked: the planner's own error stands
    other = PlannerUnsupported("a derived write")
    assert qz.unsupported_quantization("fp8", other) is None
    assert qz.unsupported_quantization(None, planner_error) is None


def test_engine_free_planning_maps_a_kernel_refusal(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planner is replaced (no vLLM here): it raises what the real one raised for
    ``--quantization fp8 --engine none`` on a bf16 Llama on this machine."""
    import json
    import types

    from preshard.core.errors import PreshardError
    from preshard.worker import enginefree, planner

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["quantization"] == "fp8"
        raise PlannerUnsupported(
            "LlamaForCausalLM's weight loaders do not run on shape-only tensors: " + NO_KERNEL
        )

    monkeypatch.setattr(planner, "plan_ranks", refuse)
    plan = spec("fp8", "gpu").plan(engine="none")
    req = types.SimpleNamespace(plan=plan)
    source = types.SimpleNamespace(tensors=lambda: [])
    with pytest.raises(PreshardError) as exc:
        enginefree.plan_ranks(req, source, tmp_path)
    assert exc.value.reason == "UnsupportedQuantization" and exc.value.permanent
    assert "static_scaled_fp8_quant" in exc.value.message


@pytest.mark.parametrize(
    ("q", "weights", "spec_engine", "default", "effective"),
    [
        ("fp8_per_block", "quantized", None, "vllm", "none"),  # only engine-free exists
        ("fp8_per_block", "auto", None, "auto", "none"),  # pre-quantized: never falls back
        ("fp8_per_block", "auto", None, "vllm", "vllm"),  # auto under vllm: raw weights
        ("fp8_per_block", "raw", None, "auto", "auto"),
        ("fp8_per_tensor", "auto", "vllm", "auto", "vllm"),  # the spec's own choice wins
        ("fp8", "auto", None, "auto", "auto"),  # a checkpoint method: not pre-quantized
    ],
)
def test_the_job_is_sized_for_the_engine_pre_quantized_shards_need(
    q: str, weights: str, spec_engine: str | None, default: str, effective: str
) -> None:
    from preshard.core.children.pod import engine

    s = weights_spec(q, weights, spec_engine)
    config = OperatorConfig(default_engine=default)
    assert engine(s, config) == effective
    plan = s.plan(engine=effective)
    assert plan.quantized_shards is (effective == "none" and weights != "raw" and q != "fp8")
