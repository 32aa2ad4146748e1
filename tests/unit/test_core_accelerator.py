"""spec.converter.accelerator: what a cpu Job requests, which image it runs, and the
checks that refuse a CPU conversion before any Job exists (check_accelerator)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.pod import accelerator
from preshard.core.children.purge import build_purge_job
from preshard.core.config import OperatorConfig
from preshard.core.errors import SpecError
from preshard.core.plan import QUANTIZATIONS
from preshard.core.spec import (
    CPU_QUANTIZATIONS,
    check_accelerator,
    parse_cpu,
    parse_spec,
    requested_cores,
)

NS, UID = "ml", "6f1c2b9e-3d4a-4f5b-8c7d-0e1f2a3b4c5d"
CONFIG = OperatorConfig(
    converter_image="reg.example.com/conv:1", converter_cpu_image="reg.example.com/conv-cpu:1"
)
BASE: dict[str, Any] = {
    "source": {"uri": "s3://models/tiny/"},
    "tensorParallelSize": 2,
    "pipelineParallelSize": 2,
    "output": {"uri": "s3://out/tiny/tp2pp2/"},
}


def spec(**converter: Any) -> Any:
    raw = copy.deepcopy(BASE)
    raw["converter"] = converter
    return parse_spec(raw)


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


def test_cpu_job_requests_no_gpu_and_one_core_per_rank() -> None:
    job = build_conversion_job("m", NS, UID, spec(accelerator="cpu"), CONFIG)
    c = container(job)
    assert c["resources"] == {"requests": {"cpu": "4"}}  # TP 2 x PP 2
    assert c["image"] == "reg.example.com/conv-cpu:1"
    assert {"name": "PRESHARD_ACCELERATOR", "value": "cpu"} in c["env"]
    text = repr(job)
    assert "nvidia.com/gpu" not in text and "gpu" not in repr(c["resources"])


def test_cpu_job_keeps_the_user_s_cpu_and_memory() -> None:
    res = {"requests": {"cpu": "16", "memory": "64Gi"}, "limits": {"cpu": 16, "memory": "64Gi"}}
    c = container(
        build_conversion_job("m", NS, UID, spec(accelerator="cpu", resources=res), CONFIG)
    )
    assert c["resources"] == {
        "requests": {"cpu": "16", "memory": "64Gi"},
        "limits": {"cpu": 16, "memory": "64Gi"},
    }


def test_gpu_job_is_unchanged() -> None:
    c = container(build_conversion_job("m", NS, UID, spec(accelerator="gpu"), CONFIG))
    assert c["resources"] == {
        "requests": {"nvidia.com/gpu": "4"},
        "limits": {"nvidia.com/gpu": "4"},
    }
    assert c["image"] == "reg.example.com/conv:1"
    assert all(e["name"] != "PRESHARD_ACCELERATOR" for e in c["env"])
    # no accelerator in the spec: the operator default (gpu) gives the same Job
    assert build_conversion_job("m", NS, UID, spec(), CONFIG) == build_conversion_job(
        "m", NS, UID, spec(accelerator="gpu"), CONFIG
    )


def test_operator_default_accelerator_applies_when_the_spec_has_none() -> None:
    cpu_default = OperatorConfig(default_accelerator="cpu", converter_cpu_image="x/cpu:1")
    assert accelerator(spec(), cpu_default) == "cpu"
    assert accelerator(spec(accelerator="gpu"), cpu_default) == "gpu"
    c = container(build_conversion_job("m", NS, UID, spec(), cpu_default))
    assert c["image"] == "x/cpu:1" and c["resources"] == {"requests": {"cpu": "4"}}


def test_an_explicit_image_wins_and_the_purge_job_uses_the_same_image() -> None:
    s = spec(accelerator="cpu", image="reg.example.com/mine:2")
    assert (
        container(build_conversion_job("m", NS, UID, s, CONFIG))["image"]
        == "reg.example.com/mine:2"
    )
    purge = build_purge_job("m", NS, UID, spec(accelerator="cpu"), CONFIG)
    assert container(purge)["image"] == "reg.example.com/conv-cpu:1"


def test_accelerator_is_not_a_conversion_field() -> None:
    # the same shards either way (raw state): changing it re-runs nothing published
    assert spec(accelerator="cpu").conversion_hash() == spec(accelerator="gpu").conversion_hash()


def test_unknown_accelerator_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"spec\.converter\.accelerator"):
        spec(accelerator="tpu")


@pytest.mark.parametrize("q", sorted(set(QUANTIZATIONS) - set(CPU_QUANTIZATIONS)))
def test_cpu_refuses_quantizations_the_cpu_backend_cannot_load(q: str) -> None:
    raw = {**copy.deepcopy(BASE), "quantization": q, "converter": {"accelerator": "cpu"}}
    s = parse_spec(raw)
    with pytest.raises(SpecError) as err:
        check_accelerator(s, "cpu")
    assert err.value.reason == "UnsupportedQuantization" and err.value.permanent
    msg = str(err.value)
    assert repr(q) in msg and "accelerator: gpu" in msg and "fp8" in msg
    check_accelerator(s, "gpu")  # GPUs load it


@pytest.mark.parametrize("q", CPU_QUANTIZATIONS)
def test_cpu_accepts_the_cpu_loadable_quantizations(q: str) -> None:
    raw = {**copy.deepcopy(BASE), "quantization": q}
    check_accelerator(parse_spec(raw), "cpu")


def test_cpu_quantizations_are_known_methods() -> None:
    assert set(CPU_QUANTIZATIONS) < set(QUANTIZATIONS)
    assert {"modelopt_fp4", "fbgemm_fp8"}.isdisjoint(CPU_QUANTIZATIONS)
    # an online method (core.quantization) converts anywhere (unquantized rank files), mxfp8 too
    assert {"mxfp8", "fp8_per_tensor", "int8_per_channel_weight_only"} <= set(CPU_QUANTIZATIONS)


@pytest.mark.parametrize(
    ("resources", "cores"),
    [
        ({"requests": {"cpu": "3"}}, 3.0),
        ({"requests": {"cpu": "3500m"}}, 3.5),
        ({"limits": {"cpu": 2}}, 2.0),
        ({"requests": {"cpu": "1.5"}, "limits": {"cpu": "8"}}, 1.5),
    ],
)
def test_too_few_cores_for_the_ranks_are_refused(resources: dict[str, Any], cores: float) -> None:
    s = spec(accelerator="cpu", resources=resources)
    assert requested_cores(s) == cores
    with pytest.raises(SpecError) as err:
        check_accelerator(s, "cpu")
    assert err.value.reason == "InsufficientCPU" and err.value.permanent
    assert "4 CPU ranks need at least 4 cores" in str(err.value)
    assert f"requests {cores:g}" in str(err.value)
    check_accelerator(s, "gpu")  # on GPUs the cores are not per rank


def test_exactly_one_core_per_rank_is_enough() -> None:
    check_accelerator(spec(accelerator="cpu", resources={"requests": {"cpu": "4000m"}}), "cpu")
    check_accelerator(spec(accelerator="cpu"), "cpu")  # the operator requests 4


def test_parse_cpu() -> None:
    assert parse_cpu("250m") == 0.25 and parse_cpu(4) == 4.0 and parse_cpu("2") == 2.0
    with pytest.raises(SpecError):
        parse_cpu("2Gi")


def test_the_cpu_list_follows_the_installed_vllm_kernel_tables() -> None:
    """The reasons behind CPU_QUANTIZATIONS, read from the installed vLLM (no engine)."""
    pytest.importorskip("vllm")
    from vllm.model_executor.kernels import linear
    from vllm.platforms import PlatformEnum
    from vllm.platforms.cpu import CpuPlatform

    # vLLM itself lets every method through on CPU (and fails later, in the engine)
    assert CpuPlatform.supported_quantization == []
    cpu = PlatformEnum.CPU
    # loadable: FP8 (per-tensor/channel, block), INT8, WNA16 (AWQ/GPTQ) linear kernels
    assert linear._POSSIBLE_FP8_KERNELS.get(cpu)
    assert linear._POSSIBLE_FP8_BLOCK_KERNELS.get(cpu)
    assert linear._POSSIBLE_INT8_KERNELS.get(cpu)
    assert linear._POSSIBLE_KERNELS.get(cpu)
    # not loadable: MXFP8 (mxfp8) and NVFP4 (modelopt_fp4) have no CPU kernel
    assert not linear._POSSIBLE_MXFP8_KERNELS.get(cpu)
    assert not linear._POSSIBLE_NVFP4_KERNELS.get(cpu)


def test_cpu_jobs_get_the_cpu_placement_defaults_not_the_gpu_ones() -> None:
    config = OperatorConfig(
        default_node_selector=(("gpu.example.com/class", "h100"),),
        default_tolerations=({"key": "nvidia.com/gpu", "operator": "Exists"},),
        default_cpu_node_selector=(("pool", "highmem"),),
        default_cpu_tolerations=({"key": "highmem", "operator": "Exists"},),
    )
    cpu = build_conversion_job("m", NS, UID, spec(accelerator="cpu"), config)["spec"]["template"]
    assert cpu["spec"]["nodeSelector"] == {"pool": "highmem"}
    assert cpu["spec"]["tolerations"] == [{"key": "highmem", "operator": "Exists"}]
    gpu = build_conversion_job("m", NS, UID, spec(accelerator="gpu"), config)["spec"]["template"]
    assert gpu["spec"]["nodeSelector"] == {"gpu.example.com/class": "h100"}
    assert gpu["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    # the spec adds to the admin's default nodeSelector (a floor); its own
    # tolerations replace the defaults
    own = spec(accelerator="cpu", nodeSelector={"zone": "a"}, tolerations=[])
    pod = build_conversion_job("m", NS, UID, own, config)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "highmem", "zone": "a"} and "tolerations" not in pod
