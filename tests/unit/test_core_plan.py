"""The conversion plan (preshard.core.plan): one value from the spec to the Job
arguments, the worker, the manifest and status; one rule and one wording per field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from preshard.cli import build_parser
from preshard.core.children.conversion import conversion_args
from preshard.core.contract import FILE_PATTERN, PP_FILE_PATTERN, STATE_RAW, WORK_DIR
from preshard.core.errors import SpecError
from preshard.core.manifest import Manifest
from preshard.core.manifestfields import ConversionFacts, manifest_for
from preshard.core.plan import MAX_PARALLEL, ConversionPlan, Layout
from preshard.core.serving import parallel_args
from preshard.core.spec import parse_spec
from preshard.core.uris import parse_output_uri
from preshard.worker.conversion.common import ConvertRequest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UID = "6f1c2b9e-3d4a-4f5b-8c7d-0e1f2a3b4c5d"
SHA = "ab" * 32

SPECS: dict[str, dict[str, Any]] = {
    "s3": {
        "source": {"uri": "s3://models/llama/"},
        "tensorParallelSize": 2,
        "output": {"uri": "s3://ckpt/llama/tp2/"},
    },
    "pvc-pp-fp8": {
        "source": {"uri": "pvc://weights/llama-70b"},
        "tensorParallelSize": 8,
        "pipelineParallelSize": 2,
        "quantization": "fp8",
        "dtype": "bfloat16",
        "verify": False,
        "output": {"uri": "s3://ckpt/llama70b/", "maxFileSize": "2Gi"},
    },
    "hf": {
        "source": {"uri": "hf://org/model@v1.0"},
        "tensorParallelSize": 4,
        "output": {"uri": "s3://ckpt/m"},
    },
}


def job_plan(args: list[str]) -> ConversionPlan:
    """What a conversion pod parses from the Job's arguments (the CLI's own parser)."""
    assert args[0] == "convert"
    return ConvertRequest.from_args(build_parser().parse_args(args)).plan


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_to_job_to_worker_is_the_same_plan(name: str) -> None:
    spec = parse_spec(SPECS[name])
    ident = "sha256:" + SHA
    plan = spec.plan(owner=f"ml/{name}/{UID}", identity=ident)
    args = conversion_args(name, "ml", UID, spec, ident)
    assert job_plan(args) == plan  # every field, through the real command line
    assert ConversionPlan.from_argv(plan.to_argv()) == plan
    assert args[args.index("--work-dir") + 1] == WORK_DIR


def test_plan_fields_from_the_spec() -> None:
    plan = parse_spec(SPECS["pvc-pp-fp8"]).plan()
    assert plan.layout == Layout(8, 2) and plan.world_size == 16
    assert plan.layout.file_pattern == PP_FILE_PATTERN
    assert Layout(4).file_pattern == FILE_PATTERN
    assert plan.quantization == "fp8" and plan.dtype == "bfloat16"
    assert plan.max_file_size == 2 * 2**30 and plan.verify is False
    assert plan.state_format == STATE_RAW
    assert plan.source.scheme == "pvc" and str(plan.output) == "s3://ckpt/llama70b/"
    assert plan.serving_args() == [
        "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
        "--quantization", "fp8", "--dtype", "bfloat16",
    ]  # fmt: skip
    assert parallel_args(parse_spec(SPECS["pvc-pp-fp8"])) == plan.serving_args()
    assert plan.artifact_fields() == {
        "tensorParallelSize": 8,
        "pipelineParallelSize": 2,
        "stateFormat": "raw",
        "dtype": "bfloat16",
        "quantization": "fp8",
    }


def test_golden_conversion_jobs_parse_as_their_specs_plans() -> None:
    """The pinned Jobs' argument lists round-trip through the worker's parser."""
    seen = 0
    for path in sorted(GOLDEN.glob("conversion_job_*.json")):
        job = json.loads(path.read_text())
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        plan = job_plan(args)
        assert plan.to_argv() == args[1 : 1 + len(plan.to_argv())]
        assert plan.owner and plan.owner.count("/") == 2
        seen += 1
    assert seen >= 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-tp", "0"], "--tensor-parallel-size must be an integer from 1 to 1024 (got 0)"),
        (["-tp", "2", "-pp", "1025"], "--pipeline-parallel-size must be an integer from 1 to"),
        (["-tp", "2", "--quantization", "int3"], "unknown quantization 'int3'"),
        (["-tp", "2", "--dtype", "fp4"], "unknown dtype 'fp4'"),
        (["-tp", "2", "--max-file-size", "0"], "--max-file-size must be a positive number"),
        (["-tp", "2", "--max-file-size", "5GB"], "--max-file-size: '5GB' is not a quantity"),
        (["-tp", "2", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["-tp", "x"], "invalid int value: 'x'"),
    ],
)
def test_from_argv_refuses(argv: list[str], message: str) -> None:
    base = ["--source", "s3://models/a/", "--output", "s3://ckpt/a/"]
    with pytest.raises(SpecError) as ei:
        ConversionPlan.from_argv(base + argv)
    assert message in ei.value.message and ei.value.permanent


def test_one_rule_one_wording_for_spec_and_command_line() -> None:
    with pytest.raises(SpecError) as spec_err:
        parse_spec({**SPECS["s3"], "quantization": "int3"})
    with pytest.raises(SpecError) as cli_err:
        ConversionPlan.from_argv(
            [
                "--source",
                "s3://models/a/",
                "-tp",
                "1",
                "--output",
                "s3://ckpt/a/",
                "--quantization",
                "int3",
            ]
        )
    assert cli_err.value.reason == "UnknownQuantization"
    assert cli_err.value.message in spec_err.value.message


def test_plan_rules() -> None:
    plan = parse_spec(SPECS["s3"]).plan()
    src, out = plan.source, plan.output
    with pytest.raises(SpecError, match="overlaps the source"):
        ConversionPlan(src, parse_output_uri("s3://models/llama/tp2/"), Layout(1))
    with pytest.raises(SpecError, match=f"from 1 to {MAX_PARALLEL}"):
        Layout(MAX_PARALLEL + 1)
    with pytest.raises(SpecError, match="from 1 to"):
        Layout(True)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="maxFileSize must be a positive"):
        ConversionPlan(src, out, Layout(1), max_file_size=0)
    with pytest.raises(SpecError, match="unknown state format"):
        ConversionPlan(src, out, Layout(1), state_format="cooked")


@pytest.mark.parametrize(
    ("config", "tp", "pp", "message"),
    [
        ({"num_attention_heads": 12}, 8, 1, "does not divide the model's 12 attention heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 6}, 4, 1, "6 key/value heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, 4, 1, "multiple of the model's 3"),
        ({"text_config": {"num_hidden_layers": 2}}, 1, 4, "exceeds the model's 2 layers"),
    ],
)
def test_layout_check_model(config: dict[str, Any], tp: int, pp: int, message: str) -> None:
    with pytest.raises(SpecError, match=message) as ei:
        Layout(tp, pp).check_model(config)
    assert ei.value.permanent and ei.value.reason.endswith("SizeMismatch")


def test_manifest_from_the_plan() -> None:
    spec = parse_spec(SPECS["hf"])
    plan = spec.plan(owner=f"ml/m/{UID}", identity="sha256:" + SHA)
    files = [(f"model-rank-{r}-part-0.safetensors", 10 + r, f"{r:064x}") for r in range(4)] + [
        ("preshard-sharding.json", 5, "f" * 64),
        ("config.json", 3, "e" * 64),
    ]
    facts = ConversionFacts(
        vllm_version="0.32.0",
        platform="cpu",
        source_revision="0123abc",
        detected_quantization="gptq",
        verification={"engineFree": {"ok": True}},
    )
    m = manifest_for(plan, files, facts, created_at="2026-12-01T00:00:00Z")
    back = Manifest.from_json(m.to_json())  # what readers see
    assert back == m
    assert (back.tensor_parallel_size, back.pipeline_parallel_size) == (4, 1)
    assert back.source_uri == "hf://org/model@v1.0" and back.source_revision == "0123abc"
    assert back.quantization == "gptq"  # detected: the plan asked for none
    assert back.owner == plan.owner and back.identity == plan.identity
    assert back.state_format == "raw" and back.converted_on == {"platform": "cpu"}
    assert back.sharding_key == "preshard-sharding.json"
    assert back.file_pattern == FILE_PATTERN and back.load_format == "sharded_state"
    assert [f.rank for f in back.shard_files()] == [0, 1, 2, 3]
    asked = manifest_for(parse_spec({**SPECS["hf"], "quantization": "fp8"}).plan(), files, facts)
    assert asked.quantization == "fp8"  # what was asked wins over what was detected
    assert manifest_for(plan, files, ConversionFacts("0.32.0")).source_revision == "v1.0"


@pytest.mark.parametrize("pin", ["sha256:" + "ab" * 32, "c" * 40])
def test_the_source_pin_travels_from_the_job_to_the_worker(pin: str) -> None:
    spec = parse_spec(
        {"source": {"uri": "hf://org/m@main"}, "tensorParallelSize": 2,
         "output": {"uri": "s3://out/m/"}}
    )  # fmt: skip
    args = conversion_args("m", "ns", "uid", spec, "sha256:" + "1" * 64, pin)
    assert args[args.index("--source-digest") + 1] == pin
    ns = build_parser().parse_args(args)
    assert ConvertRequest.from_args(ns).plan.source_digest == pin
    plan = ConversionPlan.from_argv(args[1 : args.index("--work-dir")])
    assert plan.source_digest == pin and plan.to_argv() == args[1 : args.index("--work-dir")]
    assert "--source-digest" not in conversion_args("m", "ns", "uid", spec)


@pytest.mark.parametrize("bad", ["main", "sha256:xyz", "sha256:" + "A" * 64, "c" * 39])
def test_a_malformed_source_pin_is_refused(bad: str) -> None:
    argv = ["--source", "hf://o/m", "-tp", "1", "--output", "s3://out/p/", "--source-digest", bad]
    with pytest.raises(SpecError, match="--source-digest"):
        ConversionPlan.from_argv(argv)


@pytest.mark.parametrize(
    ("quantization", "extra", "quantized"),
    [
        ("fp8_per_tensor", [], True),  # the default: pre-quantized shards
        ("fp8_per_block", [], True),
        ("fp8_per_tensor", ["--weights", "raw"], False),
        ("fp8_per_tensor", ["--engine", "vllm"], False),  # an engine writes raw weights
        ("fp8_per_tensor", ["--weights", "quantized", "--engine", "none"], True),
        ("fp8_per_channel", [], False),  # no stock FP8 format: raw, serving quantizes
        ("fp8", [], False),
        (None, [], False),
    ],
)
def test_pre_quantized_shards_are_served_without_the_online_method(
    quantization: str | None, extra: list[str], quantized: bool
) -> None:
    argv = ["--source", "hf://o/m", "-tp", "2", "--output", "s3://out/p/", *extra]
    if quantization:
        argv += ["--quantization", quantization]
    plan = ConversionPlan.from_argv(argv)
    assert plan.quantized_shards is quantized
    # the flag travels to the worker unchanged
    back = ConversionPlan.from_argv(plan.to_argv())
    assert back == plan and back.weights == plan.weights
    ns = build_parser().parse_args(["convert", *plan.to_argv(), "--work-dir", "/w"])
    assert ConvertRequest.from_args(ns).plan.weights == plan.weights
    args = plan.serving_args()
    if quantized:
        # an FP8 checkpoint: vLLM reads quantization_config from config.json
        assert "--quantization" not in args
    elif quantization:
        assert args[args.index("--quantization") + 1] == quantization
    assert args[:2] == ["--tensor-parallel-size", "2"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantization", "fp8_per_channel", "--weights", "quantized"], "fp8_per_channel"),
        (["--weights", "quantized"], "needs --quantization"),
        (["--quantization", "fp8_per_tensor", "--weights", "quantized", "--engine", "vllm"],
         "without an engine"),
        (["--weights", "bf16"], "invalid choice"),
    ],
)  # fmt: skip
def test_weights_quantized_refusals(extra: list[str], message: str) -> None:
    argv = ["--source", "hf://o/m", "-tp", "1", "--output", "s3://out/p/", *extra]
    with pytest.raises(SpecError, match=message):
        ConversionPlan.from_argv(argv)
