"""The pod's resources as the worker sees them (cgroup v1/v2 files written in tmp_path,
the real kernel's format), the CPU backend settings derived from them, and the memory
preflight (InsufficientMemory before any engine starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preshard.core.errors import InsufficientMemory
from preshard.core.estimate import GiB, estimate_memory
from preshard.worker import resources
from preshard.worker.engine import cpu as vcpu
from preshard_dev.tinymodel import make_tiny_llama


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return tmp_path


def test_memory_limit_cgroup_v2(tmp_path: Path) -> None:
    assert resources.memory_limit(_cgroup(tmp_path, {"memory.max": "25769803776"})) == 24 * GiB
    assert resources.memory_limit(_cgroup(tmp_path, {"memory.max": "max"})) is None


def test_memory_limit_cgroup_v1(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"memory/memory.limit_in_bytes": str(16 * GiB)})
    assert resources.memory_limit(root) == 16 * GiB
    # v1's "unlimited" is a huge page-aligned number
    root = _cgroup(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712"})
    assert resources.memory_limit(root) is None


def test_memory_limit_unknown(tmp_path: Path) -> None:
    assert resources.memory_limit(tmp_path) is None


def test_cpu_quota_v2_and_v1(tmp_path: Path) -> None:
    assert resources.cpu_quota(_cgroup(tmp_path / "a", {"cpu.max": "400000 100000"})) == 4.0
    assert resources.cpu_quota(_cgroup(tmp_path / "b", {"cpu.max": "max 100000"})) is None
    v1 = _cgroup(
        tmp_path / "c", {"cpu/cpu.cfs_quota_us": "250000", "cpu/cpu.cfs_period_us": "100000"}
    )
    assert resources.cpu_quota(v1) == 2.5
    v1u = _cgroup(tmp_path / "d", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert resources.cpu_quota(v1u) is None


def test_usable_cpus_cut_to_the_quota(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu.max": "250000 100000"})  # limits.cpu: 2.5
    assert resources.usable_cpus(root, cpus=list(range(16))) == [0, 1]
    assert resources.usable_cpus(tmp_path / "none", cpus=[3, 1, 2]) == [1, 2, 3]


def test_omp_binding_follows_the_pod_cpus() -> None:
    # 2 ranks on a pod that may use 8 cores of a 64-core node: 4 cores each
    assert vcpu.omp_threads_bind(2, list(range(8))) == "0,1,2,3|4,5,6,7"
    # not the test machine's "0|1"
    assert vcpu.omp_threads_bind(2, [10, 11, 12]) == "10,11|12"


def test_kvcache_space_from_the_model_and_the_memory_limit() -> None:
    llama70 = {
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
        "torch_dtype": "bfloat16",
    }
    # TP=1: 2 (K,V) x 80 layers x 8 heads x 128 dims x 2 bytes x 512 tokens x 8 seqs
    # = 1_342_177_280 bytes = 1.25 GiB -> 2 GiB
    assert vcpu.cpu_kvcache_space(1, config=llama70, tensor_parallel_size=1) == 2
    # TP=8: one KV head per rank -> 0.16 GiB -> the 1 GiB minimum
    assert vcpu.cpu_kvcache_space(8, config=llama70, tensor_parallel_size=8) == 1
    # a small pod caps it: 10% of 8 GiB for one rank is 0.8 GiB -> the 1 GiB minimum
    assert (
        vcpu.cpu_kvcache_space(1, config=llama70, tensor_parallel_size=1, memory_limit=8 * GiB) == 1
    )
    assert vcpu.cpu_kvcache_space(2) == 1


def test_cpu_env_derives_from_the_pod_and_keeps_user_settings() -> None:
    env = vcpu.cpu_env(2, {}, cpus=[0, 1, 2, 3], memory_limit=24 * GiB)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    user = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"}
    assert vcpu.cpu_env(2, user, cpus=[0, 1]) == {}


def test_cpu_memory_utilization_is_the_rank_share_of_the_pod() -> None:
    # 2 ranks, a 32 GiB limit on a 128 GiB node: 32/128/2 x 0.9
    assert vcpu.cpu_memory_utilization(2, memory_limit=32 * GiB, node_total=128 * GiB) == 0.1125
    # no limit: the node's memory
    assert vcpu.cpu_memory_utilization(1, memory_limit=None, node_total=128 * GiB) == 0.9
    assert vcpu.cpu_memory_utilization(64, memory_limit=GiB, node_total=1024 * GiB) == 0.01


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(d)
    return json.loads((d / "config.json").read_text())


def test_check_memory_passes_when_the_limit_fits(tiny_config: dict) -> None:
    est = resources.check_memory(
        tiny_config,
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        dtype="auto",
        quantization=None,
        max_file_size=5 * GiB,
        accelerator="cpu",
        limit=64 * GiB,
    )
    assert est is not None and est.accelerator == "cpu"


def test_check_memory_refuses_a_limit_one_byte_short(tiny_config: dict) -> None:
    est = estimate_memory(tiny_config, tensor_parallel_size=2, accelerator="cpu")
    with pytest.raises(InsufficientMemory) as err:
        resources.check_memory(
            tiny_config,
            tensor_parallel_size=2,
            pipeline_parallel_size=1,
            dtype="auto",
            quantization=None,
            max_file_size=5 * GiB,
            accelerator="cpu",
            limit=est.total_bytes - 1,
        )
    assert err.value.permanent and err.value.reason == "InsufficientMemory"
    assert str(est.total_bytes) in str(err.value) and str(est.total_bytes - 1) in str(err.value)
    assert "spec.converter.resources.limits.memory" in str(err.value)


def test_check_memory_reads_the_accelerator_and_limit_of_the_pod(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRESHARD_ACCELERATOR", "cpu")
    root = _cgroup(tmp_path, {"memory.max": str(GiB)})
    with pytest.raises(InsufficientMemory, match="memory limit is 1Gi"):
        resources.check_memory(
            tiny_config,
            tensor_parallel_size=2,
            pipeline_parallel_size=1,
            dtype="auto",
            quantization=None,
            max_file_size=5 * GiB,
            root=root,
        )


def test_an_engine_free_job_is_checked_with_the_engine_free_formula(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PRESHARD_ACCELERATOR=none (a Job of spec.converter.engine: none): the engine-free
    estimate (about 3 GiB for a tiny model: mostly the fixed 2Gi) fits a 4 GiB pod that
    the CPU engine's estimate would refuse."""
    monkeypatch.setenv("PRESHARD_ACCELERATOR", "none")
    assert resources.accelerator_from_env() == "none"
    root = _cgroup(tmp_path, {"memory.max": str(4 * GiB)})
    args = dict(
        tensor_parallel_size=8, pipeline_parallel_size=1, dtype="auto", quantization=None,
        max_file_size=5 * GiB, root=root,
    )  # fmt: skip
    est = resources.check_memory(tiny_config, **args)  # type: ignore[arg-type]
    assert est is not None and est.accelerator == "none" and est.total_bytes < 4 * GiB
    monkeypatch.setenv("PRESHARD_ACCELERATOR", "cpu")
    with pytest.raises(InsufficientMemory):
        resources.check_memory(tiny_config, **args)  # type: ignore[arg-type]
    monkeypatch.setenv("PRESHARD_ACCELERATOR", "tpu")
    assert resources.accelerator_from_env() == "gpu"


def test_check_memory_never_blocks_an_architecture_it_cannot_count() -> None:
    assert (
        resources.check_memory(
            {"model_type": "mystery"},
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            dtype="auto",
            quantization=None,
            max_file_size=GiB,
            accelerator="cpu",
            limit=1,
        )
        is None
    )


def test_memory_limit_from_the_downward_api_and_the_cgroup(tmp_path: Path) -> None:
    none = tmp_path / "none"
    env = {"PRESHARD_MEMORY_LIMIT": str(10 * GiB)}
    assert resources.memory_limit(none, env) == 10 * GiB
    # both known: the smaller one binds
    root = _cgroup(tmp_path / "v2", {"memory.max": str(8 * GiB)})
    assert resources.memory_limit(root, env) == 8 * GiB
    assert resources.memory_limit(root, {"PRESHARD_MEMORY_LIMIT": str(4 * GiB)}) == 4 * GiB
    # empty or garbage: ignored, never a crash
    assert resources.memory_limit(none, {"PRESHARD_MEMORY_LIMIT": ""}) is None
    assert resources.memory_limit(none, {"PRESHARD_MEMORY_LIMIT": "lots"}) is None
