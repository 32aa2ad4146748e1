"""The architecture matrix: every model family preshard claims, converted at TP=2 with the
real ``preshard convert`` CLI and real vLLM (CPU build), must

* publish (the convert runs the engine-free and the engine verification itself),
* pass ``preshard verify --against SOURCE URI`` (every checkpoint tensor rebuilt from the
  rank files and compared bit for bit with the source),
* reload with ``load_format=sharded_state`` at TP=2 giving the source model's outputs
  (the same greedy tokens, and the top-5 logprobs at each of 16 positions of 4 prompts
  within preshard's tolerance: two engines over the same bits are not bit-identical on
  every CPU, see docs/verification.md), compared with the source loaded normally at TP=2
  by stock vLLM, through tests/vllm/logprob_probe.py (plain ``vllm.LLM``, none of
  preshard's engine code; the comparison is this file's own).

And a tampered shard (one element changed by its lowest bit, the manifest's sha256
recomputed so the file checks pass) must fail ``verify --against`` (exit 3) naming the
checkpoint tensor, the rank and the element.

Families (preshard_dev.tinymodel.FAMILIES, plus a 4-bit GPTQ checkpoint written by
tinymodel.quantize_gptq): the default matrix is the smallest set that covers every
feature the raw-shard save must handle (dense GQA, tied embeddings, padded vocabulary,
KV-head replication, qkv bias, q/k norm, HF-fused qkv, two MoE families, GPTQ), several
features per model, so that it fits its time budget (about 12 minutes on the 2-core test
machine);
``PRESHARD_ARCH_MATRIX=all`` adds one model per feature (Qwen2 qkv bias, Qwen3 q/k norm,
untied padded vocabulary) and two more MoE families (Qwen2-MoE with a shared expert,
DeepSeek-V2-Lite style MLA + MoE), or a comma-separated list picks families. Per family
the source model is generated once and converted once; the reference runs and the
reloads of all families share one vLLM process (one engine after another).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard.worker.verify.shards import LOGPROB_TOLERANCE
from preshard_dev.tinymodel import FAMILIES, dequantize_gptq, make_tiny_model, quantize_gptq

pytestmark = pytest.mark.vllm

PROBE = Path(__file__).with_name("logprob_probe.py")
GPTQ = "gptq-llama"
# The dense model GPTQ's weights stand for (only run as a reference, never converted).
GPTQ_DENSE = "gptq-llama-dequantized"
# The default set and what each covers (the others: see the module docstring).
DEFAULT_MATRIX = (
    "llama-gqa",  # dense GQA (1 KV head per rank), q/k/v/o biases, HF-separate q/k/v
    "llama-tied",  # tied embeddings, padded vocabulary (500), 1 KV head on both ranks
    "phi3",  # HF-fused qkv_proj / gate_up_proj split per rank
    "mixtral",  # MoE, w1/w2/w3 experts (a family the processed save could not convert)
    "qwen3-moe",  # MoE + q/k norm (a family the processed save published wrong)
    GPTQ,  # 4-bit GPTQ of llama-gqa (CPU WNA16 kernels repack the weights)
)
ALL = (*FAMILIES, GPTQ)
# GPTQ on vLLM's CPU backend: convert refuses it before any engine (sharded_state cannot
# reload its raw shards there; preshard.core.modelconfig.cpu_raw_reload_refusal), so the
# published-checkpoint tests run over the others.
# Per log-probability, the reload may differ from the source by at most preshard's own
# tolerance (LOGPROB_TOLERANCE); the comparison below (_differences) is this file's.


def _selected() -> tuple[str, ...]:
    want = os.environ.get("PRESHARD_ARCH_MATRIX", "").strip()
    if not want:
        return DEFAULT_MATRIX
    if want == "all":
        return ALL
    names = tuple(n.strip() for n in want.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise pytest.UsageError(f"PRESHARD_ARCH_MATRIX: unknown families {unknown}; {ALL}")
    return names


MATRIX = _selected()


# --------------------------------------------------------------------------- runners


@dataclass
class Proc:
    rc: int
    stdout: str
    stderr: str
    elapsed: float


def _run(cmd: list[str], *, timeout: float, cwd: Path | None = None) -> Proc:
    """Run ``cmd`` in its own session; whatever it leaves behind (vLLM engine processes)
    is killed with its process group when it ends or times out."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        err += f"\n[test] killed after {timeout} s"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Proc(p.returncode, out, err, time.monotonic() - t0)


def preshard(*args: str, timeout: float = 900, cwd: Path | None = None) -> Proc:
    return _run([sys.executable, "-m", "preshard.cli", *args], timeout=timeout, cwd=cwd)


def probe(jobs: list[tuple[Path, Path, str]], *, tp: int = 2) -> Proc:
    """Greedy tokens and top-5 logprobs in stock vLLM (logprob_probe.py), one engine per
    (out, model, load_format) job, all in one process (vLLM imported once)."""
    specs = [f"{out}={model}@{load_format}" for out, model, load_format in jobs]
    cmd = [sys.executable, str(PROBE), *specs, "--tp", str(tp)]
    return _run(cmd, timeout=120 + 180 * len(jobs))


def probe_result(out: Path, proc: Proc) -> dict[str, Any]:
    assert out.is_file(), f"vLLM run for {out.name} failed:\n{proc.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ------------------------------------------------------------------------ the matrix


class Matrix:
    """Everything per family, computed once per session on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._cache: dict[tuple[str, str], Any] = {}

    def _once(self, key: tuple[str, str], fn: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def model(self, family: str) -> Path:
        def make() -> Path:
            if family == GPTQ_DENSE:
                return dequantize_gptq(self.model(GPTQ), self.base / "models" / GPTQ_DENSE)
            if family == GPTQ:
                dense = make_tiny_model("llama-gqa", self.base / "models" / "gptq-dense")
                return quantize_gptq(dense, self.base / "models" / GPTQ, group_size=32)
            return make_tiny_model(family, self.base / "models" / family)

        path: Path = self._once((family, "model"), make)
        return path

    def converted(self, family: str) -> tuple[Proc, Path]:
        def run() -> tuple[Proc, Path]:
            base = self.base / "convert" / family
            base.mkdir(parents=True, exist_ok=True)
            out = base / "out"
            proc = preshard(
                "convert",
                "--source",
                str(self.model(family)),
                "-tp",
                "2",
                "--output",
                str(out),
                "--work-dir",
                str(base / "work"),
                # Several parts per rank: tensors of one rank are spread over files.
                "--max-file-size",
                "256Ki",
                # the engine's raw save: what the planner's plans are compared with
                "--engine",
                "vllm",
                "--owner",
                f"matrix/{family}/uid",
                "--progress",
                "lines",
                # the engine's conversion, whatever auto would choose: its rank files and
                # traces (kept in <work>/traces) are what the engine-free path is held to
                "--engine",
                "vllm",
                cwd=base,
            )
            return proc, out

        result: tuple[Proc, Path] = self._once((family, "convert"), run)
        return result

    def engine_traces(self, family: str) -> list[dict[str, Any]]:
        """The per-rank traces the engine's preshard_raw loader wrote in the conversion
        (``preshard-trace-rank-N.json``, kept by convert in ``<work-dir>/traces``)."""
        self.published(family)
        traces = self.base / "convert" / family / "work" / "traces"
        return [
            json.loads(p.read_text()) for p in sorted(traces.glob("preshard-trace-rank-*.json"))
        ]

    def published(self, family: str) -> Path:
        proc, out = self.converted(family)
        assert proc.rc == 0, f"convert {family} failed (rc {proc.rc}):\n{proc.stderr[-4000:]}"
        return out

    def plans(self) -> dict[tuple[str, int, int], Any]:
        """The engine-free planner's rank traces (``python -m preshard.worker.planner``,
        one process, no engine) for every family of the matrix at TP=2 and for mixtral
        at TP=1 x PP=2; each value is the list of rank traces or {"error", "reason"}."""

        def run() -> dict[tuple[str, int, int], Any]:
            want = [(f, 2, 1) for f in MATRIX]
            if "mixtral" in MATRIX:
                want.append(("mixtral", 1, 2))
            outs = {w: self.base / "plans" / f"{w[0]}-tp{w[1]}-pp{w[2]}.json" for w in want}
            outs[want[0]].parent.mkdir(parents=True, exist_ok=True)
            jobs = [f"{self.model(f)}:{tp}:{pp}:{outs[(f, tp, pp)]}" for f, tp, pp in want]
            proc = _run([sys.executable, "-m", "preshard.worker.planner", *jobs], timeout=900)
            assert proc.rc == 0, proc.stderr[-4000:]
            for line in proc.stdout.splitlines():  # the planning time per family, in -s runs
                print("planner:", line)
            return {w: json.loads(o.read_text()) for w, o in outs.items()}

        result: dict[tuple[str, int, int], Any] = self._once(("*", "plans"), run)
        return result

    def _probe(self, jobs: list[tuple[str, str, Path, str]]) -> None:
        """Run the probe jobs [(family, kind, model, load_format)] in one process and
        cache each result file (or the failure) under (family, kind)."""
        outs = [self.base / f"{kind}-{f}.json" for f, kind, _, _ in jobs]
        proc = probe([(o, m, lf) for o, (_, _, m, lf) in zip(outs, jobs, strict=True)])
        for o, (f, kind, _, _) in zip(outs, jobs, strict=True):
            self._cache[(f, kind)] = (o, proc)

    def _run_engines(self) -> None:
        """On first use, in ONE vLLM process (one engine after another): every family's
        source loaded normally at TP=2 ("reference"; plus the dequantized GPTQ model) and
        every converted family's shards loaded with sharded_state ("reload")."""
        if self._cache.get(("*", "engines")):
            return
        self._cache[("*", "engines")] = True
        jobs = [(f, "reference", self.model(f), "auto") for f in MATRIX]
        if GPTQ in MATRIX:
            jobs.append((GPTQ_DENSE, "reference", self.model(GPTQ_DENSE), "auto"))
        for f in MATRIX:
            proc, out = self.converted(f)
            if proc.rc == 0:
                jobs.append((f, "reload", out, "sharded_state"))
        self._probe(jobs)

    def reference(self, family: str) -> dict[str, Any]:
        """The source loaded normally at TP=2 by stock vLLM."""
        self._run_engines()
        return probe_result(*self._cache[(family, "reference")])

    def reloaded(self, family: str) -> dict[str, Any]:
        """The published shards loaded with ``sharded_state`` at TP=2 by stock vLLM."""
        self._run_engines()
        self.published(family)  # a clear message when the conversion itself failed
        return probe_result(*self._cache[(family, "reload")])


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("arch-matrix"))


def _manifest(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / MANIFEST_NAME).read_text())
    return data


# ---------------------------------------------------------------------------- tests


def _converted_families() -> tuple[str, ...]:
    return tuple(f for f in MATRIX if f != GPTQ)


def test_gptq_on_the_cpu_backend_is_refused_before_any_engine(matrix: Matrix) -> None:
    if GPTQ not in MATRIX:
        pytest.skip(f"{GPTQ} is not in PRESHARD_ARCH_MATRIX")
    proc, out = matrix.converted(GPTQ)
    assert proc.rc == 3, f"rc {proc.rc}\n{proc.stderr[-3000:]}"
    errors = [x for x in proc.stderr.splitlines() if x.startswith("preshard: error:")]
    assert len(errors) == 1 and "quantized with gptq" in errors[0]
    assert "cannot reload its shards on the CPU backend" in errors[0]
    assert '"stage":"Converting"' not in proc.stdout  # no engine was started
    assert not (out / MANIFEST_NAME).exists()


@pytest.mark.parametrize("family", _converted_families())
def test_family_converts_and_publishes_raw_shards(matrix: Matrix, family: str) -> None:
    proc, out = matrix.converted(family)
    assert proc.rc == 0, f"rc {proc.rc}\n{proc.stderr[-4000:]}"
    man = _manifest(out)
    assert man["tensorParallelSize"] == 2 and man["pipelineParallelSize"] == 1
    assert man["stateFormat"] == "raw"
    assert man["convertedOn"]["platform"] == "cpu"
    # The sharding metadata is a listed file (its sha256 checked like the shards).
    keys = {f["key"] for f in man["files"]}
    assert man["sharding"]["key"] in keys
    assert (out / man["sharding"]["key"]).is_file()
    for rank in (0, 1):
        assert any(k.startswith(f"model-rank-{rank}-part-") for k in keys)
    # The convert ran both verifications and recorded them.
    assert man["verification"], "no verification recorded in the manifest"


@pytest.mark.parametrize("family", _converted_families())
def test_family_passes_verify_against_source(matrix: Matrix, family: str) -> None:
    out = matrix.published(family)
    proc = preshard("verify", "--against", str(matrix.model(family)), str(out), "--json")
    assert proc.rc == 0, f"rc {proc.rc}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert report["ok"] is True


@pytest.mark.parametrize("family", _converted_families())
def test_streaming_writer_reproduces_the_engine_files(
    matrix: Matrix, family: str, tmp_path: Path
) -> None:
    """The engine-free writer, given the ENGINE's traces and the source, writes the same
    rank files as the engine's raw save: the same names and the same sha256 (the planner's
    traces are compared with the engine's next to this, so together: planner + writer ==
    engine)."""
    from preshard.worker.shardwriter import write_shards
    from preshard.worker.sources import open_source

    out = matrix.published(family)
    traces = matrix.engine_traces(family)
    assert sorted(t["rank"] for t in traces) == [0, 1]
    source = open_source(str(matrix.model(family)))
    report = write_shards(traces, source, tmp_path, max_size=256 * 1024)
    want = {f["key"]: f["sha256"] for f in _manifest(out)["files"] if f["key"].startswith("model-")}
    assert {f.name: f.sha256 for f in report.files} == want
    # both ranks from one read of each source tensor they use
    used = {
        w["source"]
        for t in traces
        for key in t["saved"]
        for w in t["writes"].get(key, [])
        if w["op"] == "copy"
    }
    assert report.source_reads == len(used)


def _differences(a: list[list[Any]], b: list[list[Any]]) -> list[str]:
    """Where top-k lists [[token, logprob], ...] of one position disagree: a value off by
    more than LOGPROB_TOLERANCE, or a token in one top-k only that is not a near-tie with the
    other's lowest entry."""
    da, db = {int(t): lp for t, lp in a}, {int(t): lp for t, lp in b}
    out = [
        f"token {t}: {da[t]!r} vs {db[t]!r}"
        for t in da.keys() & db.keys()
        if abs(da[t] - db[t]) > LOGPROB_TOLERANCE
    ]
    for mine, theirs in ((da, db), (db, da)):
        floor = min(theirs.values())
        out += [
            f"token {t} ({lp!r}) in one top-k only"
            for t, lp in mine.items()
            if t not in theirs and lp > floor + LOGPROB_TOLERANCE
        ]
    return out


def test_differences_catches_what_it_must() -> None:
    top = [[1, -0.5], [2, -1.0], [3, -2.0]]
    assert _differences(top, [[1, -0.50001], [2, -1.0], [3, -2.0]]) == []
    assert _differences(top, [[1, -0.5], [2, -1.06], [3, -2.0]]) == ["token 2: -1.0 vs -1.06"]
    assert _differences(top, [[1, -0.5], [2, -1.0], [4, -1.99]]) == []  # near-tie
    assert _differences(top, [[1, -0.5], [3, -2.0], [4, -2.1]]) == [
        "token 2 (-1.0) in one top-k only"
    ]


@pytest.mark.parametrize("family", _converted_families())
def test_family_reload_gives_the_source_outputs(matrix: Matrix, family: str) -> None:
    ref = matrix.reference(family)
    got = matrix.reloaded(family)
    assert (ref["load_format"], got["load_format"]) == ("auto", "sharded_state")
    assert len(ref["sequences"]) == 4
    for seq in ref["sequences"]:
        assert len(seq["tokens"]) == 16 and len(seq["logprobs"]) == 16
        # top-5 at every position (plus the sampled token when it is not among them)
        assert all(len(pos) >= 5 for pos in seq["logprobs"])
    # Random weights must still give a non-degenerate answer.
    assert len({t for s in ref["sequences"] for t in s["tokens"]}) > 8
    for i, (a, b) in enumerate(zip(ref["sequences"], got["sequences"], strict=True)):
        assert b["tokens"] == a["tokens"], f"prompt {i}: tokens differ"
        for pos, (pa, pb) in enumerate(zip(a["logprobs"], b["logprobs"], strict=True)):
            assert not _differences(pa, pb), f"prompt {i} position {pos}: {_differences(pa, pb)}"


def test_gptq_checkpoint_computes_its_dequantized_weights(matrix: Matrix) -> None:
    """The hand-written GPTQ checkpoint is what it claims: stock vLLM's CPU WNA16 kernels
    on it follow the dense model of its dequantized weights (same first token for every
    prompt, long common prefixes; 4-bit kernels round differently, so not exactly). A
    wrong packing order would give unrelated tokens from the first one on."""
    if GPTQ not in MATRIX:
        pytest.skip(f"{GPTQ} is not in PRESHARD_ARCH_MATRIX")
    q, dense = matrix.reference(GPTQ), matrix.reference(GPTQ_DENSE)
    prefixes = []
    for a, b in zip(q["sequences"], dense["sequences"], strict=True):
        n = 0
        while n < len(a["tokens"]) and a["tokens"][n] == b["tokens"][n]:
            n += 1
        prefixes.append(n)
    assert min(prefixes) >= 1 and sum(prefixes) >= 3 * len(prefixes), prefixes


# ------------------------------------------------------------------------ tampering


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    return 8 + n, header


def _find(out: Path, rank: int, tensor: str) -> tuple[Path, int, dict[str, Any]]:
    for p in sorted(out.glob(f"model-rank-{rank}-part-*.safetensors")):
        start, header = _safetensors_header(p)
        if tensor in header:
            return p, start, header[tensor]
    raise AssertionError(f"{tensor} not in rank {rank}'s files: {sorted(out.iterdir())}")


_ESIZE = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}


def tamper(out: Path, rank: int, tensor: str, index: tuple[int, ...]) -> Path:
    """Flip the lowest bit of one element of ``tensor`` in ``rank``'s file, then put the
    file's new sha256 into the manifest so that every file check passes."""
    path, start, info = _find(out, rank, tensor)
    shape = info["shape"]
    assert len(index) == len(shape) and all(0 <= i < n for i, n in zip(index, shape, strict=True))
    flat = 0
    for i, n in zip(index, shape, strict=True):
        flat = flat * n + i
    offset = start + info["data_offsets"][0] + flat * _ESIZE[info["dtype"]]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    man = _manifest(out)
    for f in man["files"]:
        if f["key"] == path.name:
            f["sha256"] = hashlib.sha256(data).hexdigest()
            assert f["size"] == len(data)
    (out / MANIFEST_NAME).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    return path


def _names_element(text: str, index: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """The report names the element as a multi-index ``(r, c)``/``[r, c]`` or a flat one."""
    flat = 0
    for i, n in zip(index, shape, strict=True):
        flat = flat * n + i
    multi = r"[\[(]\s*" + r"\s*,\s*".join(str(i) for i in index) + r"\s*[\])]"
    return bool(re.search(multi, text) or re.search(rf"\b{flat}\b", text))


# (family, saved tensor, rank, index in the rank's tensor) -> (checkpoint tensor, its shape,
# index in the checkpoint tensor). Sizes: see tinymodel (hidden 128/256, head_dim 64,
# intermediate 256/512, MoE intermediate 128, 4 experts).
TAMPER_CASES = {
    # down_proj is split along its input dim: rank 1 holds columns 256..511.
    "dense-row-parallel": (
        "llama-gqa",
        "model.layers.1.mlp.down_proj.weight",
        1,
        (17, 3),
        "model.layers.1.mlp.down_proj.weight",
        (256, 512),
        (17, 259),
    ),
    # qkv_proj of rank 1 = [q rows 128..255 | k rows 64..127 | v rows 64..127]: row 200 of
    # the rank's tensor is v_proj row 64 + (200 - 128 - 64) = 72.
    "fused-qkv": (
        "llama-gqa",
        "model.layers.0.self_attn.qkv_proj.weight",
        1,
        (200, 5),
        "model.layers.0.self_attn.v_proj.weight",
        (128, 256),
        (72, 5),
    ),
    # The fused bias the same way: element 200 of rank 1's qkv_proj.bias is v_proj.bias[72].
    "fused-qkv-bias": (
        "llama-gqa",
        "model.layers.0.self_attn.qkv_proj.bias",
        1,
        (200,),
        "model.layers.0.self_attn.v_proj.bias",
        (128,),
        (72,),
    ),
    # o_proj's bias is replicated, and vLLM adds it on rank 0 only: a change in rank 1's
    # copy never shows in any output, only the bitwise check can see it.
    "replicated-unused-bias": (
        "llama-gqa",
        "model.layers.1.self_attn.o_proj.bias",
        1,
        (33,),
        "model.layers.1.self_attn.o_proj.bias",
        (256,),
        (33,),
    ),
    # One KV head replicated on both ranks: rank 1's copy of k_proj differs from rank 0's.
    "replicated-kv-head": (
        "llama-tied",
        "model.layers.0.self_attn.qkv_proj.weight",
        1,
        (64 + 9, 11),
        "model.layers.0.self_attn.k_proj.weight",
        (64, 128),
        (9, 11),
    ),
    # w13 of rank 1: [experts, (w1 rows 64..127 | w3 rows 64..127), hidden]; expert 2,
    # row 64 + 3 is w3 row 64 + 3 = 67.
    "moe-w13": (
        "mixtral",
        "model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight",
        1,
        (2, 64 + 3, 9),
        "model.layers.0.block_sparse_moe.experts.2.w3.weight",
        (128, 128),
        (67, 9),
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPER_CASES))
def test_tampered_shard_fails_verify_against(matrix: Matrix, case: str, tmp_path: Path) -> None:
    family, saved, rank, local, ckpt, ckpt_shape, ckpt_index = TAMPER_CASES[case]
    if family not in MATRIX:
        pytest.skip(f"{family} is not in PRESHARD_ARCH_MATRIX")
    copy = tmp_path / "out"
    shutil.copytree(matrix.published(family), copy)
    tamper(copy, rank, saved, local)
    # The file checks pass: sizes and sha256 match the (rewritten) manifest ...
    man = _manifest(copy)
    for f in man["files"]:
        assert hashlib.sha256((copy / f["key"]).read_bytes()).hexdigest() == f["sha256"]
    # ... but the bitwise comparison with the source does not.
    proc = preshard("verify", "--against", str(matrix.model(family)), str(copy), "--json")
    text = proc.stdout + proc.stderr
    assert proc.rc == 3, f"rc {proc.rc}\n{text[-3000:]}"
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    # The report names the checkpoint tensor, the rank and the element.
    assert ckpt in text, text[-3000:]
    assert re.search(rf"rank\W*{rank}\b", text), text[-3000:]
    assert _names_element(text, ckpt_index, ckpt_shape), text[-3000:]


# ------------------------------------------------------------------ pipeline parallel


def test_pp2_moe_shards_pass_verify_against(matrix: Matrix, tmp_path: Path) -> None:
    """PP=2 (TP=1) of an MoE family: each stage's rank files hold their own layers and
    experts, and the engine-free check rebuilds every checkpoint tensor from both stages.
    vLLM 0.32's CPU backend loads PP=2 but cannot generate with it (vLLM #32701), so the
    engine comparison is skipped (--no-verify) and only the bitwise check runs."""
    family = "mixtral"
    if family not in MATRIX:
        pytest.skip(f"{family} is not in PRESHARD_ARCH_MATRIX")
    out = tmp_path / "out"
    proc = preshard(
        "convert",
        "--source",
        str(matrix.model(family)),
        "-tp",
        "1",
        "-pp",
        "2",
        "--engine",
        "vllm",
        "--no-verify",
        "--output",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
        "--progress",
        "lines",
        cwd=tmp_path,
    )
    assert proc.rc == 0, proc.stderr[-4000:]
    names = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert names == ["model-pp-0-tp-0-part-0.safetensors", "model-pp-1-tp-0-part-0.safetensors"]
    assert _manifest(out)["pipelineParallelSize"] == 2
    proc = preshard("verify", "--against", str(matrix.model(family)), str(out), "--json")
    assert proc.rc == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["ok"] is True
    # The planner's PP=2 plan is this conversion's, rank for rank, file for file.
    assert_plan_is_the_engines(matrix.plans()[(family, 1, 2)], out, None)


# ------------------------------------------------------------ engine-free planner


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "int32": 4, "int64": 8,
             "float8_e4m3fn": 1, "uint8": 1, "int8": 1, "bool": 1}  # fmt: skip


def _planned_parts(saved: dict[str, Any], max_size: int | None) -> list[list[str]]:
    """The rank's files as vLLM's ``ShardedStateLoader.save_model`` splits them: the
    saved tensors in order, a new part when the next one would exceed ``max_size``."""
    parts: list[list[str]] = []
    part: list[str] = []
    total = 0
    for key, info in saved.items():
        size = _ITEMSIZE[info["dtype"]]
        for n in info["shape"]:
            size *= n
        if max_size is not None and total + size > max_size:
            parts.append(part)  # (vLLM writes this part even when it is empty)
            part, total = [], 0
        part.append(key)
        total += size
    if part:
        parts.append(part)
    return parts


def _engine_parts(out: Path, rank: int, tp: int, pp: int) -> list[dict[str, Any]]:
    """Each part file's safetensors header of ``rank``, in part order."""
    from preshard.worker.verify.against import rank_files

    files = sorted(
        rank_files(out, rank, tp, pp), key=lambda p: int(p.name.rsplit("-", 1)[1].split(".")[0])
    )
    return [_safetensors_header(p)[1] for p in files]


def assert_plan_is_the_engines(plan: list[dict[str, Any]], out: Path, max_size: int | None) -> None:
    """The planner's traces give the engine's sharding metadata exactly, and the rank
    files the writer would make from them (names, tensors per part, shapes, dtypes) are
    the engine's."""
    from preshard.core.sharding import build_document

    assert isinstance(plan, list), f"the planner refused: {plan}"
    stored = json.loads((out / _manifest(out)["sharding"]["key"]).read_text())
    mine = build_document(plan)
    for key in ("tensorParallelSize", "pipelineParallelSize", "sources", "skippedSources"):
        assert mine[key] == stored[key], key
    for a, b in zip(mine["ranks"], stored["ranks"], strict=True):
        assert a["rank"] == b["rank"]
        assert list(a["tensors"]) == list(b["tensors"]), f"rank {a['rank']}: tensors differ"
        for key, entry in b["tensors"].items():
            # The planner also records the value the model initialises a tensor no loader
            # writes with ("initial": on the meta device there is no memory to save it
            # from); the engine's file simply holds it. Every other field is the same.
            mine_entry = {k: v for k, v in a["tensors"][key].items() if k != "initial"}
            assert mine_entry == entry, f"rank {a['rank']} {key}"
            if "initial" in a["tensors"][key]:
                assert not entry["writes"], f"rank {a['rank']} {key}: initial besides writes"
    tp, pp = stored["tensorParallelSize"], stored["pipelineParallelSize"]
    for doc in plan:
        headers = _engine_parts(out, doc["rank"], tp, pp)
        parts = _planned_parts(doc["saved"], max_size)
        assert [sorted(p) for p in parts] == [
            sorted(k for k in h if k != "__metadata__") for h in headers
        ], f"rank {doc['rank']}: the part split differs"
        for h in headers:
            for key, info in h.items():
                if key == "__metadata__":
                    continue
                assert info["shape"] == doc["saved"][key]["shape"], key
                st = _ST_DTYPE[doc["saved"][key]["dtype"]]
                assert info["dtype"] == st, key


_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32",
             "int64": "I64", "float8_e4m3fn": "F8_E4M3", "uint8": "U8", "int8": "I8",
             "bool": "BOOL"}  # fmt: skip


@pytest.mark.parametrize("family", _converted_families())
def test_planner_gives_the_engines_sharding_and_files(matrix: Matrix, family: str) -> None:
    """The engine-free planner (vLLM's model for each rank built on the meta device, its
    weight loaders run over shape-only tensors) records exactly the writes the engine's
    loaders recorded, the same saved tensors in the same order (the same part files)."""
    out = matrix.published(family)
    assert_plan_is_the_engines(matrix.plans()[(family, 2, 1)], out, 256 * 1024)


def test_planner_plans_gptq_that_the_cpu_engine_refuses(matrix: Matrix) -> None:
    """4-bit GPTQ cannot convert with the CPU engine here; the planner plans it: every
    packed tensor of every rank copied from its checkpoint tensor's slice."""
    if GPTQ not in MATRIX:
        pytest.skip(f"{GPTQ} is not in PRESHARD_ARCH_MATRIX")
    plan = matrix.plans()[(GPTQ, 2, 1)]
    assert isinstance(plan, list), plan
    for doc in plan:
        saved = doc["saved"]
        # down_proj is row-parallel: the input dim (packed 8 per int32) is split
        assert saved["model.layers.0.mlp.down_proj.qweight"] == {
            "shape": [32, 256],
            "dtype": "int32",
        }
        assert saved["model.layers.0.mlp.down_proj.scales"]["shape"] == [8, 256]
        # gate_up is column-parallel: rank r holds gate's and up's output columns r*256..
        assert saved["model.layers.0.mlp.gate_up_proj.qweight"]["shape"] == [32, 512]
        writes = doc["writes"]["model.layers.0.mlp.down_proj.qweight"]
        assert [w["op"] for w in writes] == ["copy"]
        assert writes[0]["src"][0] == doc["tpRank"] * 32 * 256  # rows 32r.. of [64, 256]


def test_lying_sharding_file_is_refused(matrix: Matrix, tmp_path: Path) -> None:
    """A sharding file that leaves a source tensor out and gives a saved tensor no
    writes (its sha256 in the manifest made to match) passed verify --against while it
    trusted the file; re-planned from the source, it is refused naming the tensor."""
    family = "llama-gqa"
    if family not in MATRIX:
        pytest.skip(f"{family} is not in PRESHARD_ARCH_MATRIX")
    copy = tmp_path / "out"
    shutil.copytree(matrix.published(family), copy)
    victim = "model.layers.1.mlp.down_proj.weight"
    path = copy / "preshard-sharding.json"
    doc = json.loads(path.read_text())
    del doc["sources"][victim]
    for r in doc["ranks"]:
        r["tensors"][victim]["writes"] = []
        r["tensors"][victim]["placement"] = []
    # ... and the rank files changed to match (another model's values would pass too)
    data = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
    path.write_bytes(data)
    man = _manifest(copy)
    for f in man["files"]:
        if f["key"] == path.name:
            f["sha256"], f["size"] = hashlib.sha256(data).hexdigest(), len(data)
    man["totalBytes"] = sum(f["size"] for f in man["files"])
    (copy / MANIFEST_NAME).write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    tamper(copy, 1, victim, (17, 3))
    proc = preshard("verify", "--against", str(matrix.model(family)), str(copy), "--json")
    text = proc.stdout + proc.stderr
    assert proc.rc == 3, text[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False and victim in report["error"], report
    assert "differs from vLLM's plan" in report["error"]


@pytest.mark.parametrize("family", _converted_families())
def test_engine_free_files_are_the_engines(matrix: Matrix, family: str, tmp_path: Path) -> None:
    """The engine-free proof in one step: the PLANNER's traces (no engine) given to the
    streaming writer with the source give the engine's raw save, file for file: the same
    names and the same sha256."""
    from preshard.worker.shardwriter import write_shards
    from preshard.worker.sources import open_source

    plan = matrix.plans()[(family, 2, 1)]
    assert isinstance(plan, list), f"the planner refused: {plan}"
    report = write_shards(
        plan, open_source(str(matrix.model(family))), tmp_path, max_size=256 * 1024
    )
    out = matrix.published(family)
    want = {f["key"]: f["sha256"] for f in _manifest(out)["files"] if f["key"].startswith("model-")}
    assert {f.name: f.sha256 for f in report.files} == want
