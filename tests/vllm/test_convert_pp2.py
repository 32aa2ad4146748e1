"""Pipeline parallelism: vLLM names the files ``model-pp-{pp}-tp-{tp}-part-{part}``, each
stage holds its own layers, and the shards load back with ``load_format=sharded_state``
at the same layout (no missing keys).

The ``converted_pp2`` fixture (tests/vllm/conftest.py) runs the conversion once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preshard.worker.engine.process import EngineRequest, run_engine
from preshard.worker.verify.shards import check_shards, read_safetensors_header

pytestmark = pytest.mark.vllm


def test_pp2_conversion_layout(converted_pp2: Any) -> None:
    run = converted_pp2
    assert run.rc == 0, run.stderr[-3000:]
    assert "--no-verify: the engine reload and output comparison were skipped" in run.stderr
    shards = sorted(p.name for p in run.output.glob("*.safetensors"))
    assert shards == ["model-pp-0-tp-0-part-0.safetensors", "model-pp-1-tp-0-part-0.safetensors"]
    report = check_shards(run.output, 1, 2)
    assert sorted(report.files) == [(0, 0), (1, 0)]
    stage0 = set(read_safetensors_header(run.output / shards[0]))
    stage1 = set(read_safetensors_header(run.output / shards[1]))
    assert "model.embed_tokens.weight" in stage0 and "model.embed_tokens.weight" not in stage1
    assert "lm_head.weight" in stage1 and "model.norm.weight" in stage1
    assert any(k.startswith("model.layers.0.") for k in stage0)
    assert not any(k.startswith("model.layers.1.") for k in stage0)
    assert any(k.startswith("model.layers.1.") for k in stage1)
    assert not any(k.startswith("model.layers.0.") for k in stage1)


def test_pp2_shards_reload_at_the_same_layout(converted_pp2: Any) -> None:
    assert converted_pp2.rc == 0
    out = run_engine(
        EngineRequest(
            model=str(converted_pp2.output),
            pipeline_parallel_size=2,
            load_format="sharded_state",
        ),
        timeout=600,
    )
    assert out.tokens == ()  # loaded without generating (see the fixture's docstring)
    assert out.settings["pipeline_parallel_size"] == 2
    assert out.settings["load_format"] == "sharded_state"


def test_pp2_streaming_writer_reproduces_the_engine_files(
    converted_pp2: Any, tiny_tokenizer_model: Path, tmp_path: Path
) -> None:
    """At PP=2 too, the engine-free writer given the ENGINE's traces writes the engine's
    files: the same names (model-pp-*-tp-*), the same sha256."""
    from preshard.core.manifest import MANIFEST_NAME
    from preshard.worker.shardlayout import load_traces
    from preshard.worker.shardwriter import write_shards
    from preshard.worker.sources import open_source

    assert converted_pp2.rc == 0, converted_pp2.stderr[-3000:]
    traces = load_traces(converted_pp2.work_dir / "traces")
    assert sorted((t["ppRank"], t["tpRank"]) for t in traces) == [(0, 0), (1, 0)]
    report = write_shards(
        traces, open_source(str(tiny_tokenizer_model)), tmp_path, max_size=5 * 2**30
    )
    man = json.loads((converted_pp2.output / MANIFEST_NAME).read_text())
    want = {f["key"]: f["sha256"] for f in man["files"] if f["key"].startswith("model-")}
    assert {f.name: f.sha256 for f in report.files} == want
