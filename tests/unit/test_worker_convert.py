"""Pure parts of ``preshard convert``: argument validation, model checks, work-dir and
file handling. The real pipeline with vLLM is tested in tests/vllm/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preshard.cli import build_parser
from preshard.core.errors import PreshardError, SpecError
from preshard.core.manifestfields import ConversionFacts, conversion_fields
from preshard.core.plan import Layout
from preshard.worker.conversion import common, engine_path


def parse(*argv: str):
    return build_parser().parse_args(["convert", *argv])


def request(tmp_path: Path, *extra: str) -> common.ConvertRequest:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    args = parse(
        "--source",
        str(src),
        "-tp",
        "2",
        "--output",
        "s3://bucket-a/out/m/",
        "--work-dir",
        str(tmp_path / "work"),
        *extra,
    )
    return common.ConvertRequest.from_args(args)


def test_from_args_defaults(tmp_path: Path) -> None:
    req = request(tmp_path)
    plan = req.plan
    assert plan.tensor_parallel_size == 2 and plan.pipeline_parallel_size == 1
    assert plan.world_size == 2
    assert plan.max_file_size == 5 * 2**30
    assert plan.verify is True
    assert plan.output.scheme == "s3" and plan.output.prefix == "out/m/"
    assert plan.source.scheme == "file"
    assert req.work_dir == (tmp_path / "work").resolve()


def test_from_args_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    req = request(
        tmp_path,
        "--quantization",
        "fp8",
        "--dtype",
        "bfloat16",
        "--max-file-size",
        "512Mi",
        "--no-verify",
        "-pp",
        "2",
        "--max-model-len",
        "64",
        "--gpu-memory-utilization",
        "0.5",
    )
    assert req.plan.quantization == "fp8" and req.plan.dtype == "bfloat16"
    assert req.plan.max_file_size == 512 * 2**20
    assert req.plan.verify is False and req.plan.world_size == 4
    assert req.max_model_len == 64 and req.gpu_memory_utilization == 0.5


@pytest.mark.parametrize(
    ("extra", "reason", "message"),
    [
        (
            ("--quantization", "int3"),
            "UnknownQuantization",
            "unknown quantization 'int3'; supported: fp8,",
        ),
        (("--dtype", "float8"), "InvalidSpec", "unknown dtype 'float8'"),
        (("--max-file-size", "5GB"), "InvalidSpec", "--max-file-size: '5GB' is not a quantity"),
        (("--max-file-size", "0"), "InvalidSpec", "--max-file-size must be a positive number"),
        (("-tp", "0"), "InvalidSpec", "--tensor-parallel-size must be an integer from 1 to 1024"),
        (("-pp", "1025"), "InvalidSpec", "--pipeline-parallel-size must be an integer from 1 to"),
        (("--gpu-memory-utilization", "1.5"), "InvalidSpec", "must be in (0, 1]"),
    ],
)
def test_from_args_rejects(tmp_path: Path, extra, reason: str, message: str) -> None:
    with pytest.raises(SpecError) as ei:
        request(tmp_path, *extra)
    assert ei.value.reason == reason and ei.value.permanent
    assert message in ei.value.message
    assert "\n" not in ei.value.message


def test_from_args_uris(tmp_path: Path) -> None:
    def convert_args(source: str, output: str, work: str | None = None):
        return common.ConvertRequest.from_args(
            parse(
                "--source",
                source,
                "-tp",
                "1",
                "--output",
                output,
                "--work-dir",
                work or str(tmp_path / "w"),
            )
        )

    with pytest.raises(SpecError, match="is a bucket root"):
        convert_args("s3://models/llama/", "s3://bucket-a/")
    with pytest.raises(SpecError, match="overlaps the source"):
        convert_args("s3://models/llama/", "s3://models/llama/tp2/")
    with pytest.raises(SpecError, match="unsupported scheme"):
        convert_args("ftp://x/y", "s3://bucket-a/x/")
    with pytest.raises(SpecError, match="must not contain each other"):
        convert_args(str(tmp_path), "s3://bucket-a/x/", str(tmp_path / "work"))
    with pytest.raises(SpecError, match=r"output .* and the source must not contain each other"):
        convert_args(str(tmp_path / "m"), str(tmp_path / "m" / "out"))
    with pytest.raises(SpecError, match=r"output .* and --work-dir .* must not contain each other"):
        convert_args("hf://org/model", str(tmp_path / "w" / "out"))
    req = convert_args("hf://org/model@v1", str(tmp_path / "out"))
    assert req.plan.source.revision == "v1" and req.plan.output.scheme == "file"


def write_model(d: Path, **cfg) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4}
    base.update(cfg)
    (d / "config.json").write_text(json.dumps(base))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    return d


def test_read_model_config(tmp_path: Path) -> None:
    d = write_model(tmp_path / "m")
    assert common.read_model_config(d, "s3://b/m/")["num_attention_heads"] == 8
    assert common.weight_bytes(d) == 15


@pytest.mark.parametrize(
    ("setup", "reason", "message"),
    [
        ("missing", "SourceNotFound", "the source SRC does not exist"),
        ("noconfig", "InvalidSource", "the source SRC has no config.json"),
        ("badjson", "InvalidSource", "config.json is not valid JSON"),
        ("list", "InvalidSource", "config.json is not a JSON object"),
        ("bin", "InvalidSource", "the source SRC has no *.safetensors weights"),
    ],
)
def test_read_model_config_rejects(tmp_path: Path, setup: str, reason: str, message: str) -> None:
    d = tmp_path / "m"
    if setup != "missing":
        d.mkdir()
    if setup == "badjson":
        (d / "config.json").write_text("{")
    elif setup == "list":
        (d / "config.json").write_text("[]")
    elif setup == "bin":
        (d / "config.json").write_text("{}")
        (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PreshardError) as ei:
        common.read_model_config(d, "SRC")
    assert ei.value.reason == reason and ei.value.permanent
    assert message in ei.value.message


@pytest.mark.parametrize(
    ("cfg", "tp", "pp", "message"),
    [
        (
            {"num_attention_heads": 2},
            4,
            1,
            "tensorParallelSize 4 does not divide the model's 2 attention heads; use one of [1, 2]",
        ),
        (
            {"num_attention_heads": 6, "num_key_value_heads": 3},
            2,
            1,
            "tensorParallelSize 2 does not divide the model's 3 key/value heads",
        ),
        (
            {"num_attention_heads": 12, "num_key_value_heads": 4},
            6,
            1,
            "tensorParallelSize 6 is not a multiple of the model's 4 key/value heads",
        ),
        (
            {"text_config": {"num_attention_heads": 4}},
            8,
            1,
            "does not divide the model's 4 attention heads",
        ),
        ({"num_hidden_layers": 2}, 1, 4, "pipelineParallelSize 4 exceeds the model's 2 layers"),
    ],
)
def test_check_parallelism_rejects(cfg, tp: int, pp: int, message: str) -> None:
    with pytest.raises(SpecError) as ei:
        Layout(tp, pp).check_model(cfg)
    assert message in ei.value.message
    assert ei.value.permanent


@pytest.mark.parametrize(
    ("cfg", "tp"),
    [
        ({"num_attention_heads": 2, "num_key_value_heads": 1}, 2),  # KV heads replicated
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, 8),
        ({"num_attention_heads": 8, "num_key_value_heads": 8}, 4),
        ({"num_attention_heads": 64}, 8),
    ],
)
def test_check_parallelism_accepts(cfg, tp: int) -> None:
    Layout(tp, 1).check_model(cfg)


def test_copy_non_weight_files(tmp_path: Path) -> None:
    src = write_model(tmp_path / "src")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "chat_template.jinja",
    ):
        (src / name).write_text(name)
    for name in (
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "consolidated.pth",
        "model-rank-0-part-0.safetensors",
        "preshard-manifest.json",
        ".gitattributes",
    ):
        (src / name).write_text(name)
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = common.copy_non_weight_files(src, dst)
    expected = sorted(
        [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "chat_template.jinja",
        ]
    )
    assert copied == expected
    assert sorted(p.name for p in dst.iterdir()) == expected
    assert (dst / "tokenizer.model").read_text() == "tokenizer.model"
    # the source is untouched
    assert (src / "pytorch_model.bin").exists() and (
        src / "model-00001-of-00002.safetensors"
    ).exists()


def test_prepare_work_dir_cleans_partial_output_keeps_source(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "shards").mkdir(parents=True)
    (work / "shards" / "model-rank-0-part-0.safetensors").write_bytes(b"partial")
    (work / "source").mkdir()
    (work / "source" / "model.safetensors").write_bytes(b"fetched")
    shards = common.prepare_work_dir(work)
    assert shards == work / "shards" and list(shards.iterdir()) == []
    assert (work / "source" / "model.safetensors").read_bytes() == b"fetched"
    fresh = common.prepare_work_dir(tmp_path / "new" / "dir")
    assert fresh.is_dir()


def test_manifest_fields(tmp_path: Path) -> None:
    req = common.ConvertRequest.from_args(
        parse(
            "--source",
            "hf://org/model@abc",
            "-tp",
            "2",
            "-pp",
            "2",
            "--output",
            "s3://bucket-a/x/",
            "--quantization",
            "fp8",
            "--work-dir",
            str(tmp_path),
        )
    )
    assert conversion_fields(req.plan, ConversionFacts("0.32.0", source_revision="0123abc"))[
        "source_revision"
    ] == ("0123abc")
    assert conversion_fields(req.plan, ConversionFacts("0.32.0")) == {
        "source_uri": "hf://org/model@abc",
        "source_revision": "abc",
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
        "quantization": "fp8",
        "dtype": "auto",
        "vllm_version": "0.32.0",
        "file_pattern": "model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors",
        "load_format": "sharded_state",
        "state_format": "raw",
        "converted_on": {},
        "sharding_key": "preshard-sharding.json",
        "verification": None,
        "identity": None,
    }
    fields = conversion_fields(
        req.plan, ConversionFacts("0.32.0", platform="cpu", verification={"engine": {}})
    )
    assert fields["converted_on"] == {"platform": "cpu"}
    assert fields["verification"] == {"engine": {}}
    fields = conversion_fields(req.plan, ConversionFacts("0.32.0", platform="cpu", engine="none"))
    assert fields["converted_on"] == {"platform": "cpu", "engine": "none"}
    ident = "sha256:" + "ab" * 32
    req2 = common.ConvertRequest.from_args(
        parse(
            "--source", "hf://org/model@abc", "-tp", "2", "--output", "s3://bucket-a/x/",
            "--work-dir", str(tmp_path), "--identity", ident,
        )
    )  # fmt: skip
    assert (
        conversion_fields(req2.plan, ConversionFacts("0.32.0"))["identity"] == ident
    )  # recorded in the manifest


def test_engine_error_classification() -> None:
    from preshard.worker.engine.process import EngineError

    perm = engine_path._conversion_error(
        EngineError("ValueError: x", stage="load", kind="ValueError")
    )
    assert (
        perm.permanent and perm.reason == "EngineRefused"
    )  # was ConversionFailed: one permanence per reason
    assert perm.message == "vLLM cannot load the model at this configuration: ValueError: x"
    oom = engine_path._conversion_error(EngineError("killed", stage="load", kind=""))
    assert not oom.permanent
    bad = engine_path._verification_error(
        EngineError("ValueError: Missing keys", stage="load", kind="ValueError")
    )
    assert bad.reason == "VerificationFailed" and bad.permanent
    assert "load_format=sharded_state failed: ValueError: Missing keys" in bad.message
    died = engine_path._verification_error(EngineError("exited with code 9", stage="load"))
    assert died.reason == "ConversionFailed" and not died.permanent


def test_format_timings() -> None:
    assert common.format_timings({"download": 1.234, "total": 10}) == "download 1.2 s, total 10.0 s"


def test_a_pre_quantized_checkpoint_records_its_method(tmp_path: Path) -> None:
    req = common.ConvertRequest.from_args(
        parse(
            "--source",
            "s3://models/x/",
            "-tp",
            "2",
            "--output",
            "s3://out-b/x/",
            "--work-dir",
            str(tmp_path),
        )
    )
    assert (
        common.checkpoint_quantization({"quantization_config": {"quant_method": "gptq"}}) == "gptq"
    )
    assert common.checkpoint_quantization({"quantization_config": "x"}) is None
    assert common.checkpoint_quantization({}) is None
    fields = conversion_fields(req.plan, ConversionFacts("0.32.0", detected_quantization="gptq"))
    assert fields["quantization"] == "gptq"
