"""Conversion wall time by stage: a random Llama of at least 1 GiB at TP=2 through the
real pipeline.

    python bench/convert_stages.py [--tp 2] [--engine-cpus 0] [--no-verify] [--local] [--tiny]
                                   [--no-baseline]

Without arguments (``bench/run.py convert_stages``) it runs two scenarios: TP=2 with the
engines on both cores (a CPU conversion, where the engine check and the upload compete
for the same cores), and TP=1 with the engines bound to core 0 (the other core stands for
the host CPU that a GPU node leaves free while the accelerator verifies).

The model (preshard_dev.tinymodel.make_tiny_llama, bf16, hidden 2048, 32 heads of 64,
8 KV heads, intermediate 5632, vocabulary 32000, ``BENCH_CONVERT_LAYERS`` layers, default
10: about 1.1 GiB) is big enough that loading, saving, verifying and moving the weights
show in the split; ``--tiny`` uses the tiny 2-layer model instead, which measures little
more than process start-up.

The source is uploaded to a real S3 server on 127.0.0.1 (preshard_dev.s3server) and the
output is published there, so every stage does its real work: fetch (download), vLLM
load and raw save, the engine-free check, verify (a second engine load with
load_format=sharded_state plus the token comparison) and upload. ``--local`` uses a local source and output
directory instead. The figures are wall times on a shared machine: compare shares, not
absolute numbers.

It prints the time per stage (download, convert, engine-free verification, engine
verification, the upload that ran meanwhile and what was left of it afterwards) and the
overlap's saving, measured in the same run: after the overlapped conversion, the same
shards are verified by one more engine alone and published alone to another prefix
(what preshard did before it overlapped them), and the sum is compared with the
overlapped verify + remaining upload. The S3 server stands for a remote store: it runs
at the lowest CPU priority (nice 19), so it takes only CPU time the conversion leaves
idle; the worker's background upload runs at nice 19 too (what preshard does).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from preshard.cli import build_parser
from preshard.core.contract import LOAD_FORMAT_LOCAL
from preshard.core.manifestfields import ConversionFacts, conversion_fields
from preshard.worker.conversion import common, engine_path
from preshard.worker.progress import Reporter
from preshard_dev.tinymodel import make_tiny_llama


def _s3_setup(model: Path, root: Path):
    """Start an S3 server, upload the source, return (server, source URI, output URI)."""
    from preshard_dev.s3server import RcloneS3

    server = RcloneS3(root)
    server.start()
    # The store is remote in a cluster: its CPU is not the conversion pod's. Here it
    # shares the two cores, so it runs at the lowest priority (every thread of it)
    # and takes only the CPU time the conversion leaves idle.
    assert server.proc is not None
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), 19)
    server.create_bucket("models")
    server.create_bucket("shards")
    client = server.client()
    for p in model.iterdir():
        client.upload_file(str(p), "models", f"tiny/{p.name}")
    return server, "s3://models/tiny/", "s3://shards/tiny-tp2/"


def _sequential_baseline(
    req: common.ConvertRequest, shards: Path, output: str, vllm_version: str
) -> dict[str, float]:
    """The same run's verification and upload one after the other, as preshard did before
    the overlap: one more engine check of the same shards, alone, then a publish of the
    same files to a fresh prefix, alone."""
    import json

    from preshard.worker.engine.process import default_prompts, has_tokenizer, run_engine
    from preshard.worker.store import publication

    config = json.loads((shards / "config.json").read_text())
    prompts = default_prompts(config, tokenizer=has_tokenizer(shards))
    t = time.monotonic()
    run_engine(req.engine_request(shards, prompts, load_format=LOAD_FORMAT_LOCAL))
    engine = time.monotonic() - t
    t = time.monotonic()
    publication.publish(
        shards,
        output,
        manifest_fields=conversion_fields(req.plan, ConversionFacts(vllm_version)),
        owner="bench/sequential/uid",
        endpoint_url=req.endpoint_url,
        concurrency=req.concurrency,
    )
    return {"verify_engine": engine, "upload": time.monotonic() - t}


SCENARIOS = [
    (
        "TP=2, the engines on both cores (a CPU conversion: engine and upload share them)",
        ["--tp", "2"],
    ),
    (
        "TP=1, the engines on core 0 only (core 1 stands for the host CPU a GPU node "
        "leaves free while its accelerator verifies)",
        ["--tp", "1", "--engine-cpus", "0"],
    ),
]


def main(argv: list[str] | None = None) -> int:
    """With arguments: one run. Without (``bench/run.py convert_stages``): each scenario."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        return run_one(argv)
    for title, args in SCENARIOS:
        print(f"\n--- {title}", flush=True)
        rc = run_one(args)
        if rc:
            return rc
    return 0


def run_one(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument(
        "--engine-cpus",
        help="VLLM_CPU_OMP_THREADS_BIND for the engines (default: the worker's, every core)",
    )
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--local", action="store_true", help="local source and output, no S3")
    ap.add_argument("--tiny", action="store_true", help="the tiny 2-layer model (start-up only)")
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the sequential verify-then-upload baseline (one engine load less)",
    )
    a = ap.parse_args(argv)
    layers = int(os.environ.get("BENCH_CONVERT_LAYERS", "10"))
    if a.engine_cpus:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = a.engine_cpus
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)

    with tempfile.TemporaryDirectory(prefix="preshard-bench-") as tmp:
        base = Path(tmp)
        t0 = time.monotonic()
        if a.tiny:
            model = make_tiny_llama(base / "model", num_kv_heads=1, tie_embeddings=True, seed=0)
        else:
            model = make_tiny_llama(
                base / "model",
                hidden=2048,
                heads=32,
                num_kv_heads=8,
                layers=layers,
                intermediate=5632,
                vocab=32000,
                tokenizer=False,
                seed=0,
            )
        make_model = time.monotonic() - t0
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        server = None
        source, output = str(model), str(base / "out")
        baseline_output = str(base / "out-sequential")
        if not a.local:
            server, source, output = _s3_setup(model, base / "s3")
            baseline_output = "s3://shards/sequential/"
            os.environ.update(server.env())
        baseline: dict[str, float] | None = None
        try:
            args = build_parser().parse_args(
                [
                    "convert",
                    "--source",
                    source,
                    "--tensor-parallel-size",
                    str(a.tp),
                    "--output",
                    output,
                    "--work-dir",
                    str(base / "work"),
                    "--verify" if not a.no_verify else "--no-verify",
                ]
            )
            req = common.ConvertRequest.from_args(args)
            outcome = engine_path.convert(req, Reporter(mode="lines"))
            if not a.no_verify and not a.no_baseline:
                baseline = _sequential_baseline(
                    req, outcome.shards_dir, baseline_output, outcome.vllm_version
                )
        finally:
            if server is not None:
                server.stop()

    t = outcome.timings
    total = t["total"]
    rows = [
        ("download", t.get("download", 0.0)),
        ("convert (engine process)", t.get("convert", 0.0)),
        ("  of it: vLLM load + raw save", t.get("vllm_load_and_save", 0.0)),
        ("  of it: reference tokens", t.get("reference_generate", 0.0)),
        ("file checks", t.get("check_files", 0.0)),
        ("verify engine-free", t.get("verify_engine_free", 0.0)),
        ("verify engine (reload)", t.get("verify_engine", 0.0)),
        ("  upload meanwhile", t.get("upload_during_verify", 0.0)),
        ("upload after verification", t.get("upload", 0.0)),
    ]
    known = {
        "download",
        "convert",
        "vllm_load_and_save",
        "reference_generate",
        "check_files",
        "verify_engine_free",
        "verify_engine",
        "upload_during_verify",
        "upload",
        "total",
    }
    rows += [(name, sec) for name, sec in sorted(t.items()) if name not in known]
    size = "tiny Llama" if a.tiny else f"Llama of {model_bytes / 2**30:.2f} GiB"
    print(
        f"{size} (model generation {make_model:.1f} s, not counted), TP={a.tp}, "
        f"{'local dirs' if a.local else 'S3 on 127.0.0.1'}, verify={'off' if a.no_verify else 'on'}"
    )
    print(f"{'stage':<32}{'seconds':>9}{'share':>8}")
    for name, sec in rows:
        print(f"{name:<32}{sec:>9.2f}{sec / total:>8.1%}")
    print(f"{'total':<32}{total:>9.2f}{1:>8.1%}")
    if baseline is not None:
        overlapped = t.get("verify_engine", 0.0) + t.get("upload", 0.0)
        sequential = baseline["verify_engine"] + baseline["upload"]
        print(
            "overlap (same run): verify engine alone "
            f"{baseline['verify_engine']:.2f} s + upload alone {baseline['upload']:.2f} s = "
            f"{sequential:.2f} s sequential; overlapped {overlapped:.2f} s "
            f"(verify {t.get('verify_engine', 0.0):.2f} s + upload after it "
            f"{t.get('upload', 0.0):.2f} s): saved {sequential - overlapped:.2f} s, "
            f"{overlapped / sequential:.2f}x of the sequential time; the whole conversion "
            f"would have taken {total - overlapped + sequential:.2f} s, "
            f"{total / (total - overlapped + sequential):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
