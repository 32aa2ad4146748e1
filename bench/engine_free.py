"""Engine-free conversion against the engine, a local copy and s5cmd (issue 20, item 7).

    python bench/engine_free.py                    # 1.5 GiB and 4 GiB random Llamas, TP=2
    BENCH_ENGINE_FREE_SIZES=0.5 python bench/engine_free.py     # a quick run
    python bench/engine_free.py --no-engine       # skip the (slow) vLLM conversions
    python bench/engine_free.py --engine-max-gib 5  # the engine at 4 GiB too (~15 GiB)
    python bench/engine_free.py --no-s3           # local output only

For each size, in the same run and on the same model (preshard_dev.tinymodel, bf16,
hidden 2048, 32 heads of 64, 8 KV heads, intermediate 5632, vocabulary 32000, as many
layers as the size needs), each step in a fresh process whose wall time and peak memory
are measured (peak of the SUM of the proportional set size of the process and all its
descendants, sampled every 0.2 s from /proc: vLLM's engine runs several processes):

* ``preshard convert --engine none`` at TP=2, local source -> local directory, and
  local source -> S3 (a real ``rclone serve s3`` on 127.0.0.1);
* ``preshard convert --engine vllm --no-verify`` at TP=2, local -> local (the engine's
  load and raw save, without the engine check);
* ``cp`` of the model's safetensors to another local directory (the same bytes);
* ``s5cmd cp`` S3 -> S3 of the same bytes on the same server (the transfer floor).

It prints the figures and the ratios the issue sets as targets: peak memory of the
engine-free path flat across sizes and under 1 GiB, at least 10x faster than the
engine, within 2x of copying the same bytes (and against s5cmd for S3); and, from the
conversion's own stage timings, how much of its time streamed the bytes (the convert
and upload stages, against ``cp``) and how much was the fixed start (vLLM's import and
the planning). Client and server share this machine's cores: compare ratios of one
run, never absolute figures. Not a test: it never fails on a number.

The engine-free part runs only when ``preshard convert --engine none`` really is
engine-free: a probe conversion of a tiny model must record ``convertedOn.engine:
none`` in its manifest (the streaming writer's), otherwise that part is skipped with a
message and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
MiB = 2**20
BUCKET = "bench"
# The model family of the other benches (bf16): per layer q, o 2048^2; k, v 2048x512;
# gate, up, down 2048x5632; 2 norms of 2048. Embeddings and lm_head 32000x2048 (untied).
HIDDEN, KV_DIM, INTER, VOCAB = 2048, 512, 5632, 32000
TARGET_PEAK = GiB  # the targets
TARGET_SPEEDUP = 10.0
TARGET_COPY_RATIO = 2.0


# ------------------------------------------------------------------------ pure helpers


def model_bytes(layers: int) -> int:
    """Bytes of the bench model's tensors (bf16) with ``layers`` layers."""
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + 3 * HIDDEN * INTER + 2 * HIDDEN
    return 2 * (layers * per_layer + 2 * VOCAB * HIDDEN + HIDDEN)


def layers_for(target_bytes: int) -> int:
    """The fewest layers (at least 1) whose model holds at least ``target_bytes``."""
    layers = 1
    while model_bytes(layers) < target_bytes:
        layers += 1
    return layers


def parse_sizes(text: str) -> list[float]:
    """``"1.5,4"`` -> [1.5, 4.0] GiB (positive, in the given order)."""
    sizes = [float(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive GiB values, not {text!r}")
    return sizes


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """``root`` and every process whose parent chain reaches it (pid -> ppid map)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class Run:
    what: str
    seconds: float
    peak_bytes: int | None  # None: not measured (a copy of bytes, no process tree)
    ok: bool = True
    note: str = ""
    # the conversion's own stage timings (its last line: "plan 9.1 s, convert 3.2 s, ...")
    stages: dict[str, float] = field(default_factory=dict)


_STAGE = re.compile(r"\b(plan|convert|upload|total) (\d+(?:\.\d+)?) s\b")


def stage_timings(output: str) -> dict[str, float]:
    """The stage timings of ``preshard convert``'s result line (the last one that has
    them): ``{"plan": 9.1, "convert": 3.2, "upload": 0.0, "total": 12.4}``."""
    for line in reversed(output.splitlines()):
        found = dict(_STAGE.findall(line))
        if "plan" in found and "total" in found:
            return {k: float(v) for k, v in found.items()}
    return {}


def verdicts(size_gib: float, runs: dict[str, Run]) -> list[str]:
    """The issue's targets for one size, as lines: measured value, target, met or not."""
    out = []
    none, engine, cp = runs.get("none"), runs.get("engine"), runs.get("cp")
    if none and none.ok and none.peak_bytes is not None:
        met = none.peak_bytes < TARGET_PEAK
        out.append(
            f"{size_gib:g} GiB: engine-free peak {none.peak_bytes / MiB:.0f} MiB "
            f"(target < {TARGET_PEAK / MiB:.0f} MiB): {'met' if met else 'NOT met'}"
        )
    if none and none.ok and engine and engine.ok:
        x = engine.seconds / none.seconds
        met = x >= TARGET_SPEEDUP
        out.append(
            f"{size_gib:g} GiB: engine / engine-free = {x:.1f}x "
            f"(target >= {TARGET_SPEEDUP:g}x): {'met' if met else 'NOT met'}"
        )
    if none and none.ok and cp and cp.ok:
        x = none.seconds / cp.seconds
        met = x <= TARGET_COPY_RATIO
        out.append(
            f"{size_gib:g} GiB: engine-free / cp = {x:.2f}x "
            f"(target <= {TARGET_COPY_RATIO:g}x): {'met' if met else 'NOT met'}"
        )
        streamed = none.stages.get("convert", 0.0) + none.stages.get("upload", 0.0)
        if streamed > 0:
            fixed = none.seconds - streamed
            out.append(
                f"{size_gib:g} GiB: of which streaming the bytes (convert + upload stages) "
                f"{streamed:.1f} s = {streamed / cp.seconds:.2f}x cp, the rest {fixed:.1f} s "
                "(start-up, vLLM's import, planning: fixed, independent of the size)"
            )
    s3, s5 = runs.get("none_s3"), runs.get("s5cmd")
    if s3 and s3.ok and s5 and s5.ok:
        out.append(
            f"{size_gib:g} GiB: engine-free to S3 / s5cmd S3->S3 = {s3.seconds / s5.seconds:.2f}x"
        )
    return out


def flatness(peaks: Iterable[tuple[float, int]]) -> str | None:
    """How the engine-free peak moves with the model's size: ``largest / smallest``."""
    pts = sorted(peaks)
    if len(pts) < 2:
        return None
    (s0, p0), (s1, p1) = pts[0], pts[-1]
    return (
        f"engine-free peak at {s1:g} GiB / at {s0:g} GiB = {p1 / p0:.2f}x "
        f"(the model grew {s1 / s0:.2f}x; flat means about 1)"
    )


# ------------------------------------------------------------------------- measuring


def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak process-tree PSS in bytes, output tail: stdout
    then stderr) of argv."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sum(_pss(p) for p in descendants(proc.pid, _parents())))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err, _ = proc.communicate()
    dt = time.monotonic() - t0
    stop.set()
    sampler.join()
    return proc.returncode, dt, peak, err.decode(errors="replace")[-4000:]


def convert_argv(model: Path, output: str, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "preshard.cli", "convert", "--source", str(model),
        "-tp", "2", "--output", output, "--work-dir", str(work), "--progress", "lines",
        *extra,
    ]  # fmt: skip


def engine_free_available(base: Path) -> str | None:
    """None when ``preshard convert --engine none`` converts without an engine (a probe
    conversion's manifest records ``convertedOn.engine: none``), else why not."""
    import importlib.util

    from preshard_dev.tinymodel import make_tiny_llama

    if importlib.util.find_spec("preshard.worker.planner") is None:
        # no probe then: an --engine flag without the planner would run the engine
        return (
            "`preshard convert --engine none` is not available yet: preshard.worker.planner "
            "is not installed (the planner and the streaming writer are not merged)"
        )
    model = make_tiny_llama(base / "probe-model", tokenizer=False)
    out = base / "probe-out"
    rc, _, _, err = measured(convert_argv(model, str(out), base / "probe-work", "--engine", "none"))
    shutil.rmtree(base / "probe-work", ignore_errors=True)
    if rc != 0:
        line = err.strip().splitlines()[-1:] or ["no message"]
        return f"`preshard convert --engine none` failed (exit {rc}: {line[0][:200]})"
    try:
        engine = json.loads((out / "preshard-manifest.json").read_text())["convertedOn"].get(
            "engine"
        )
    except (OSError, ValueError, KeyError, AttributeError):
        engine = None
    if engine != "none":
        return (
            "`preshard convert --engine none` is not available yet: its manifest records "
            f"convertedOn.engine={engine!r}, not 'none' (the planner and the streaming writer "
            "are not merged)"
        )
    return None


def timed_copy(fn: Callable[[], None], what: str) -> Run:
    t0 = time.monotonic()
    fn()
    return Run(what, time.monotonic() - t0, None)


def run_size(
    size_gib: float, base: Path, server: object | None, engine_free: bool, engine: bool
) -> dict[str, Run]:
    from preshard_dev.tinymodel import make_tiny_llama

    layers = layers_for(int(size_gib * GiB))
    t0 = time.monotonic()
    model = make_tiny_llama(
        base / "model", hidden=HIDDEN, heads=32, num_kv_heads=8, layers=layers,
        intermediate=INTER, vocab=VOCAB, tokenizer=False, seed=0,
    )  # fmt: skip
    nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(
        f"\n-- {size_gib:g} GiB: {layers} layers, {nbytes / GiB:.2f} GiB of safetensors "
        f"(generated in {time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    runs: dict[str, Run] = {}

    def conv(key: str, output: str, *extra: str, env: dict[str, str] | None = None) -> None:
        work = base / f"work-{key}"
        rc, dt, peak, err = measured(convert_argv(model, output, work, *extra), env)
        shutil.rmtree(work, ignore_errors=True)
        note = "" if rc == 0 else f"exit {rc}: {err.strip().splitlines()[-1:]}"
        runs[key] = Run(key, dt, peak, rc == 0, note, stage_timings(err))

    if engine_free:
        conv("none", str(base / "out-none"), "--engine", "none")
        shutil.rmtree(base / "out-none", ignore_errors=True)
    if engine:
        conv("engine", str(base / "out-engine"), "--engine", "vllm", "--no-verify")
        shutil.rmtree(base / "out-engine", ignore_errors=True)
    dest = base / "copy"
    dest.mkdir()
    files = [str(p) for p in sorted(model.glob("*.safetensors"))]
    runs["cp"] = timed_copy(lambda: subprocess.run(["cp", *files, str(dest)], check=True), "cp")
    shutil.rmtree(dest)
    if server is not None:
        from preshard_dev.s3server import tool_path

        env = {**os.environ, **server.env()}  # type: ignore[attr-defined]
        prefix = f"s3://{BUCKET}/{size_gib:g}"
        if engine_free:
            conv("none_s3", f"{prefix}/none/", "--engine", "none", env=env)
        client = server.client()  # type: ignore[attr-defined]
        for p in sorted(model.iterdir()):  # the same bytes on S3, untimed
            client.upload_file(str(p), BUCKET, f"{size_gib:g}/model/{p.name}")
        s5 = [tool_path("s5cmd"), "--endpoint-url", server.endpoint]  # type: ignore[attr-defined]
        runs["s5cmd"] = timed_copy(
            lambda: subprocess.run(
                [*s5, "cp", f"{prefix}/model/*", f"{prefix}/copy/"],
                env=env, check=True, stdout=subprocess.DEVNULL,
            ),
            "s5cmd",
        )  # fmt: skip
    shutil.rmtree(model)
    return runs


def report(size_gib: float, runs: dict[str, Run]) -> None:
    labels = {
        "none": "preshard convert --engine none (local)",
        "none_s3": "preshard convert --engine none (-> S3)",
        "engine": "preshard convert --engine vllm --no-verify",
        "cp": "cp (the same bytes, local)",
        "s5cmd": "s5cmd cp S3 -> S3 (the same bytes)",
    }
    print(f"{'':<46}{'seconds':>9}{'peak MiB':>10}")
    for key, label in labels.items():
        r = runs.get(key)
        if r is None:
            continue
        peak = f"{r.peak_bytes / MiB:.0f}" if r.peak_bytes is not None else "-"
        text = f"{r.seconds:>9.1f}{peak:>10}" if r.ok else f"  failed: {r.note[:120]}"
        print(f"{label:<46}{text}")
        if r.ok and r.stages:
            print(f"{'':<4}stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.stages.items()))
    for line in verdicts(size_gib, runs):
        print("  " + line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=os.environ.get("BENCH_ENGINE_FREE_SIZES", "1.5,4"))
    ap.add_argument("--no-engine", action="store_true", help="skip the vLLM conversions")
    ap.add_argument(
        "--engine-max-gib",
        type=float,
        default=float(os.environ.get("BENCH_ENGINE_MAX_GIB", "2")),
        help="run the vLLM conversion only for models up to this size (default 2: the 4 GiB "
        "model's engine needs about 15 GiB, more than this shared machine spares)",
    )
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 output and s5cmd")
    a = ap.parse_args(argv)
    sizes = parse_sizes(a.sizes)
    with tempfile.TemporaryDirectory(prefix="preshard-bench-engine-free-") as tmp:
        base = Path(tmp)
        why = engine_free_available(base)
        if why:
            print(f"SKIPPED the engine-free part: {why}", flush=True)
        server = None
        if not a.no_s3:
            from preshard_dev.s3server import RcloneS3

            server = RcloneS3(base / "s3")
            server.start()
            server.client().create_bucket(Bucket=BUCKET)
        peaks = []
        try:
            for size in sizes:
                sub = base / f"size-{size:g}"
                sub.mkdir()
                engine = not a.no_engine and size <= a.engine_max_gib
                if not a.no_engine and not engine:
                    print(f"\n(the engine is not run at {size:g} GiB: --engine-max-gib)")
                runs = run_size(size, sub, server, why is None, engine)
                report(size, runs)
                none = runs.get("none")
                if none and none.ok and none.peak_bytes:
                    peaks.append((size, none.peak_bytes))
                shutil.rmtree(sub, ignore_errors=True)
        finally:
            if server is not None:
                server.stop()
        flat = flatness(peaks)
        if flat:
            print("\n" + flat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
