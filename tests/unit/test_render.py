"""`preshard render`: its input handling and output form (the equality with what the
operator creates is tests/integration/test_render.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from preshard.cli import main
from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.purge import build_purge_job
from preshard.core.config import OperatorConfig
from preshard.core.errors import SpecError
from preshard.core.spec import parse_spec
from preshard.render import PLACEHOLDER_UID, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-tp2.yaml"


def test_the_example_renders_its_conversion_and_purge_jobs() -> None:
    out = io.StringIO()
    config = OperatorConfig()
    render(EXAMPLE.read_text(), config, out=out)
    docs = list(yaml.safe_load_all(out.getvalue()))
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = parse_spec(doc["spec"])
    name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
    assert docs == [
        build_conversion_job(name, ns, PLACEHOLDER_UID, spec, config),
        build_purge_job(name, ns, PLACEHOLDER_UID, spec, config),  # deletionPolicy: Delete
    ]
    assert "&id" not in out.getvalue() and "*id" not in out.getvalue()  # plain YAML
    res = docs[0]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in str(res)  # the example converts on CPU


def test_cli_reads_the_operator_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRESHARD_CONVERTER_CPU_IMAGE", "reg.example.com/cpu:9")
    assert main(["render", "-f", str(EXAMPLE), "--uid", "u-1"]) == 0
    out = capsys.readouterr().out
    assert "image: reg.example.com/cpu:9" in out and "uid: u-1" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: ConfigMap\napiVersion: v1\n", "has no ShardedCheckpoint"),
        ("a: [1, 2\n", "is not valid YAML"),
        (
            "apiVersion: preshard.io/v1alpha1\nkind: ShardedCheckpoint\nmetadata: {}\nspec: {}\n",
            "metadata.name is required",
        ),
    ],
)
def test_bad_input(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        render(text, OperatorConfig(), out=io.StringIO())


def test_missing_file_and_bad_operator_config_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", "-f", str(tmp_path / "nope.yaml")]) == 3
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.setenv("PRESHARD_DEFAULT_ACCELERATOR", "tpu")
    assert main(["render", "-f", str(EXAMPLE)]) == 3
    assert "PRESHARD_DEFAULT_ACCELERATOR" in capsys.readouterr().err


LLAMA_70B_CONFIG = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
TP8 = """apiVersion: preshard.io/v1alpha1
kind: ShardedCheckpoint
metadata: {name: llama-70b-tp8}
spec:
  source: {uri: "s3://models/llama-70b/"}
  tensorParallelSize: 8
  output: {uri: "s3://ckpt/llama-70b/tp8/"}
  converter: {accelerator: cpu%s}
"""


@pytest.mark.parametrize(
    ("extra", "requests"),
    [
        ("", {"cpu": "8", "memory": "212.3Gi"}),  # the engine on CPU: the whole model
        (", engine: none", {"cpu": "2", "memory": "9.8Gi"}),  # no engine
    ],
)
def test_render_with_the_model_config_requests_the_estimate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, requests: dict[str, str]
) -> None:
    import json

    (tmp_path / "r.yaml").write_text(TP8 % extra)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
    argv = ["render", "-f", str(tmp_path / "r.yaml")]
    assert main([*argv, "--model-config", str(tmp_path / "config.json")]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": requests}
    # without the config.json: no memory request, and a comment says where it comes from
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# requests.memory: the operator adds the preflight's estimate")
    job = yaml.safe_load(out)
    assert "memory" not in job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]


def test_render_model_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(TP8 % "")
    (tmp_path / "bad.json").write_text("[1")
    (tmp_path / "odd.json").write_text('{"model_type": "mystery"}')
    base = ["render", "-f", str(tmp_path / "r.yaml"), "--model-config"]
    assert main([*base, str(tmp_path / "bad.json")]) == 3
    assert "is not valid JSON" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "odd.json")]) == 3
    assert "no memory estimate" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "missing.json")]) == 3
    assert "cannot read" in capsys.readouterr().err
