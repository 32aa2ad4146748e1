"""The engine-free conversion against recorded real engine runs.

``tests/golden/engine-traces/<family>/`` holds, for three families of
``preshard_dev.tinymodel`` (tied embeddings over a padded vocabulary with one KV head
replicated; Mixtral-style MoE; Phi-3 with HF-fused qkv/gate_up from a float32 checkpoint
converted to bfloat16), the per-rank traces the engine's ``preshard_raw`` loader wrote
in a real ``preshard convert --engine vllm`` at TP=2 with ``--max-file-size 256Ki``, and
the names, sizes and sha256 of the rank files that engine run wrote
(``engine-files.json``). The tiny models are regenerated here (seeded: the same bytes),
so these tests prove, without an engine, that the streaming writer reproduces the
engine's files byte for byte from its traces (the architecture matrix re-proves it
against a fresh engine run: tests/vllm/test_arch_matrix.py).

The ``--engine none`` conversion is tested here with a TEST-ONLY PLANNER STAND-IN: the
real planner's ``plan_ranks`` is replaced by one that returns the recorded engine traces
(or declines), so the pipeline around it (sources, writer, per-file checks, streaming
publication, manifest, cleanup) runs for real without vLLM; the real planner is proven
against the engine in tests/vllm/test_planner.py and the architecture matrix.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from preshard.cli import build_parser
from preshard.core.errors import PlannerUnsupported, PreshardError
from preshard.core.manifest import MANIFEST_NAME, SHARDING_NAME, Manifest
from preshard.worker import shardlayout
from preshard.worker import shardwriter as sw
from preshard.worker.commands import runner
from preshard.worker.conversion import common
from preshard.worker.sources import open_source
from preshard_dev.tinymodel import make_tiny_model

GOLDEN = Path(__file__).parents[1] / "golden" / "engine-traces"
FAMILIES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def recorded(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    d = GOLDEN / name
    traces = [json.loads(p.read_text()) for p in sorted(d.glob("preshard-trace-rank-*.json"))]
    return traces, json.loads((d / "engine-files.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name in FAMILIES:
        info = recorded(name)[1]
        out[name] = make_tiny_model(
            info["family"],
            tmp_path_factory.mktemp(name) / "model",
            dtype=info.get("source_dtype", "bfloat16"),
        )
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_writer_reproduces_the_engine_files(
    name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    traces, info = recorded(name)
    source = open_source(str(models[name]))
    report = sw.write_shards(traces, source, tmp_path, max_size=info["maxFileSize"])
    got = {f.name: {"size": f.size, "sha256": f.sha256} for f in report.files}
    assert got == info["files"]
    # the source read once for both ranks
    assert report.source_reads == len(
        {
            w["source"]
            for t in traces
            for key in t["saved"]
            for w in t["writes"].get(key, [])
            if w["op"] == "copy"
        }
    )


def test_one_changed_source_element_changes_the_files(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The identity above can fail: the same traces over a source with one element
    changed give different bytes in the file that holds it."""
    from safetensors.torch import load_file, save_file

    traces, info = recorded("llama-tied")
    d = tmp_path / "m"
    d.mkdir()
    for p in models["llama-tied"].iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    t = load_file(str(d / "model.safetensors"))
    w = t["model.layers.1.mlp.down_proj.weight"]
    w.view(-1)[5] = w.view(-1)[5] * 2 + 1
    save_file(t, str(d / "model.safetensors"))
    report = sw.write_shards(
        traces, open_source(str(d)), tmp_path / "o", max_size=info["maxFileSize"]
    )
    differ = [f.name for f in report.files if f.sha256 != info["files"][f.name]["sha256"]]
    assert differ == ["model-rank-0-part-1.safetensors"]


# ----------------------------------------------------------------- convert --engine none


@pytest.fixture
def planner_stand_in(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """TEST-ONLY: ``preshard.worker.planner.plan_ranks`` returning recorded engine traces."""
    from preshard.worker import planner

    calls: dict[str, Any] = {"traces": None, "supports": None, "args": []}

    def plan_ranks(
        model_dir: Path, tensors: Any, *, tp: int, pp: int, dtype: str, quantization: Any
    ) -> Any:
        calls["args"].append((Path(model_dir), len(list(tensors)), tp, pp, dtype, quantization))
        if calls["supports"] is not None:  # the planner declines (as PlannerUnsupported does)
            raise PlannerUnsupported(calls["supports"])
        return calls["traces"]

    monkeypatch.setattr(planner, "plan_ranks", plan_ranks)
    return calls


def _run(*argv: str) -> int:
    return runner.run(build_parser().parse_args(["convert", *argv]))


def test_convert_engine_none_publishes_the_engine_files(
    planner_stand_in: dict[str, Any],
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traces, info = recorded("mixtral")
    planner_stand_in["traces"] = traces
    term = tmp_path / "termination-log"
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(term))
    monkeypatch.delenv("PRESHARD_WORK_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    uploaded_while_writing: list[int] = []
    real_ready = None

    from preshard.worker import shardpublish

    real_ready = shardpublish.StreamingPublication.ready

    def ready(self: Any, rel: str, sha: str) -> None:
        uploaded_while_writing.append(len(list((tmp_path / "out").glob("model-*"))))
        real_ready(self, rel, sha)

    monkeypatch.setattr(shardpublish.StreamingPublication, "ready", ready)
    out = tmp_path / "out"
    rc = _run(
        "--source", str(models["mixtral"]), "-tp", "2", "--output", str(out),
        "--max-file-size", "256Ki", "--engine", "none", "--owner", "ns/m/uid", "--progress", "lines",
    )  # fmt: skip
    assert rc == 0
    man = Manifest.from_json((out / MANIFEST_NAME).read_bytes())
    assert man.engine == "none" and man.converted_on == {"engine": "none"}
    files = {
        f.key: {"size": f.size, "sha256": f.sha256} for f in man.files if f.key.startswith("model-")
    }
    assert files == info["files"]
    for key, want in info["files"].items():  # the published bytes themselves
        import hashlib

        assert hashlib.sha256((out / key).read_bytes()).hexdigest() == want["sha256"]
    assert {f.key for f in man.files} >= {SHARDING_NAME, "config.json"}
    sharding = json.loads((out / SHARDING_NAME).read_text())
    assert sharding["tensorParallelSize"] == 2 and len(sharding["ranks"]) == 2
    # files went out while later ones were still being written
    assert any(n > 0 for n in uploaded_while_writing[:-1])
    # the planner was given the prepared model dir and every source tensor
    (model_dir, n_tensors, tp, pp, dtype, quant) = planner_stand_in["args"][0]
    assert (model_dir / "config.json").is_file() and n_tensors == len(
        open_source(str(models["mixtral"])).tensors()
    )
    assert (tp, pp, dtype, quant) == (2, 1, "auto", None)
    result = json.loads(term.read_text())
    assert result["artifact"]["engine"] == "none"
    assert result["verification"]["passed"] is True
    assert "no engine ran" in result["verification"]["summary"]
    # no --work-dir: the temporary work dir is gone after the run
    assert list((tmp_path / "tmp").iterdir()) == []


def test_convert_auto_falls_back_to_the_engine_when_the_planner_declines(
    planner_stand_in: dict[str, Any],
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from preshard.worker import enginefree

    planner_stand_in["supports"] = "a derived write in model.layers.0.mlp (family X)"
    req = common.ConvertRequest.from_args(
        build_parser().parse_args(
            [
                "convert",
                "--source",
                str(models["llama-tied"]),
                "-tp",
                "2",
                "--output",
                str(tmp_path / "o"),
                "--work-dir",
                str(tmp_path / "w"),
            ]
        )
    )
    source = open_source(str(models["llama-tied"]))
    assert enginefree.choose_engine(req, source, models["llama-tied"])[:2] == (
        "vllm",
        "--engine auto: a derived write in model.layers.0.mlp (family X)",
    )
    planner_stand_in["supports"] = None
    planner_stand_in["traces"] = [{"rank": 0}]
    assert enginefree.choose_engine(req, source, models["llama-tied"]) == (
        "none",
        "--engine auto: the planner plans the model",
        [{"rank": 0}],
    )
    none = common.ConvertRequest.from_args(
        build_parser().parse_args(
            [
                "convert",
                "--source",
                str(models["llama-tied"]),
                "-tp",
                "2",
                "--output",
                str(tmp_path / "o"),
                "--work-dir",
                str(tmp_path / "w"),
                "--engine",
                "none",
            ]
        )
    )
    planner_stand_in["supports"] = "MLA is not planned yet"

    with pytest.raises(PreshardError, match="MLA is not planned yet") as e:
        enginefree.choose_engine(none, source, models["llama-tied"])
    assert e.value.permanent and e.value.reason == "PlannerUnsupported"


def test_temporary_work_dir_is_removed_after_a_failure_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRESHARD_WORK_DIR", raising=False)
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(tmp_path / "t"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    rc = _run(
        "--source",
        str(tmp_path / "missing"),
        "-tp",
        "1",
        "--output",
        str(tmp_path / "o"),
        "--engine",
        "vllm",
    )
    assert rc == 3
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "preshard-work").exists()  # nothing left in the current directory


def test_a_published_checkpoint_source_is_a_reshard(
    planner_stand_in: dict[str, Any],
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TEST-ONLY STAND-IN for the re-shard source (``preshard.worker.sources.checkpoint``,
    merged separately): ``open_source`` asks it first for file/pvc/s3 URIs, and the
    conversion records its ``resharded_from`` in the manifest's ``extra``."""
    from preshard.worker.sources.local import LocalSource

    traces, info = recorded("llama-tied")
    planner_stand_in["traces"] = traces
    mod = types.ModuleType("preshard.worker.sources.checkpoint")

    class CheckpointSource(LocalSource):
        pass

    def open_checkpoint(uri: str, **kw: Any) -> Any:
        return CheckpointSource(models["llama-tied"], uri) if uri.endswith("published") else None

    mod.CheckpointSource = CheckpointSource  # type: ignore[attr-defined]
    mod.open_checkpoint = open_checkpoint  # type: ignore[attr-defined]
    mod.resharded_from = lambda s: {"uri": s.uri, "tensorParallelSize": 4}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "preshard.worker.sources.checkpoint", mod)
    assert type(open_source(str(models["llama-tied"]))) is LocalSource
    published = tmp_path / "published"
    published.mkdir()
    assert isinstance(open_source(str(published)), CheckpointSource)
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(tmp_path / "t"))
    out = tmp_path / "out"
    rc = _run("--source", str(published), "-tp", "2", "--output", str(out), "--max-file-size", "256Ki", "--engine", "none", "--work-dir", str(tmp_path / "w"))  # fmt: skip
    assert rc == 0
    man = Manifest.from_json((out / MANIFEST_NAME).read_bytes())
    assert man.extra == {"reshardedFrom": {"uri": str(published), "tensorParallelSize": 4}}
    assert {f.key: f.sha256 for f in man.files if f.key.startswith("model-")} == {
        k: v["sha256"] for k, v in info["files"].items()
    }


def test_read_back_check_catches_a_changed_byte_and_a_wrong_header(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine-free writer reads every buffer back from the file as it writes it and
    compares it with what it built (one changed byte is refused: VerificationFailed,
    permanent, and no file is left), and each completed file is read back through its
    own header before it is uploaded: a header that leads a name to another tensor's
    bytes is refused."""
    from preshard.worker import enginefree

    traces, info = recorded("llama-tied")
    ranks = shardlayout.plan_files(traces, max_size=info["maxFileSize"])
    layouts = {layout.name: layout for _, ls in ranks for layout in ls}
    # a write that does not land as built: one bit of the first tensor's data flipped on
    # its way to the file (a faulty disk or file system stands in: nothing else can)
    real = sw._pwrite
    first = {"done": False}

    def faulty(fd: int, data: Any, offset: int) -> int:
        if not first["done"] and offset > 0 and len(data) > 3:
            first["done"] = True
            bad = bytearray(data)
            bad[3] ^= 0x01
            real(fd, bytes(bad), offset)
            return len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(sw, "_pwrite", faulty)
    source = open_source(str(models["llama-tied"]))
    with pytest.raises(PreshardError, match="read back at offset") as e:
        sw.write_shards(traces, source, tmp_path / "bad", max_size=info["maxFileSize"])
    assert e.value.reason == "VerificationFailed" and e.value.permanent
    assert first["done"] and not list((tmp_path / "bad").iterdir())
    monkeypatch.setattr(sw, "_pwrite", real)
    report = sw.write_shards(traces, source, tmp_path, max_size=info["maxFileSize"])
    f = report.files[0]
    enginefree.check_written(f, layouts[f.name])  # as written: passes
    # a header whose offsets swap two tensors of one size
    layout = layouts[f.name]
    a, b = [t for t in layout.tensors if t.dtype == "bfloat16" and t.shape == (128,)][:2]
    body = bytearray(f.path.read_bytes())
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n])
    header[a.key]["data_offsets"], header[b.key]["data_offsets"] = (
        header[b.key]["data_offsets"],
        header[a.key]["data_offsets"],
    )
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    f.path.write_bytes(bytes(body[:8]) + text + bytes(body[8 + n :]))
    with pytest.raises(PreshardError, match=r"header leads .* not to those written") as e:
        enginefree.check_written(f, layout)
    assert e.value.reason == "VerificationFailed" and e.value.permanent


def _streamed(work: Path, out: Path, files: dict[str, bytes], sha: dict[str, str]) -> list[Any]:
    """Stream ``files`` (written into ``work`` one by one) to the local output ``out``:
    the upload's result, or its error."""
    from preshard.worker.shardpublish import StreamingPublication

    work.mkdir(parents=True, exist_ok=True)
    pub = StreamingPublication(
        work,
        str(out),
        [(name, len(data)) for name, data in files.items()],
        delete_after=frozenset(files),
        owner="ns/m/uid",
    )
    pub.begin()
    handle = pub.start(None)
    for name, data in files.items():
        (work / name).write_bytes(data)
        pub.ready(name, sha[name])
    pub.finish_writing()
    return handle.wait()


def test_streamed_local_output_renames_on_one_file_system_and_copies_checked_across(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank file bound for a local output on the work dir's file system is renamed
    into place (the same inode: no copy, no second hash); across file systems it is
    copied and hashed, and a file whose bytes are not those the writer hashed is
    refused there."""
    import hashlib
    import os
    import shutil
    import tempfile

    data = {"model-rank-0-part-0.safetensors": b"x" * 4096 + b"abc"}
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    name = next(iter(data))
    work, out = tmp_path / "work", tmp_path / "out"
    renamed: list[int] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renamed.append(os.stat(src).st_ino)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert _streamed(work, out, data, sha) == [(name, len(data[name]), sha[name])]
    monkeypatch.undo()
    assert (out / name).read_bytes() == data[name] and not (work / name).exists()
    assert os.stat(out / name).st_ino in renamed  # renamed into place, not copied
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here to copy across")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        got = _streamed(other / "w", tmp_path / "out2", data, sha)
        assert got == [(name, len(data[name]), sha[name])]
        assert (tmp_path / "out2" / name).read_bytes() == data[name]
        wrong = {name: hashlib.sha256(b"other bytes").hexdigest()}
        with pytest.raises(PreshardError, match="changed on disk after it was written"):
            _streamed(other / "w2", tmp_path / "out3", data, wrong)
    finally:
        shutil.rmtree(other, ignore_errors=True)
