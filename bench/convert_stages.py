"""Conversion wall time by stage: a random Llama of at least 1 GiB at TP=2 through the
real pipeline.

    python bench/convert_stages.py [--tp 2] [--no-verify] [--local] [--tiny]

The model (preshard.worker.tinymodel.make_tiny_llama, bf16, hidden 2048, 32 heads of 64,
8 KV heads, intermediate 5632, vocabulary 32000, ``BENCH_CONVERT_LAYERS`` layers, default
10: about 1.1 GiB) is big enough that loading, saving, verifying and moving the weights
show in the split; ``--tiny`` uses the tiny 2-layer model instead, which measures little
more than process start-up.

The source is uploaded to a real S3 server on 127.0.0.1 (preshard_dev.s3server) and the
output is published there, so every stage does its real work: fetch (download), vLLM
load, save_sharded_state, verify (a second engine load with load_format=sharded_state
plus the token comparison) and upload. ``--local`` uses a local source and output
directory instead. The figures are wall times on a shared machine: compare shares, not
absolute numbers.

It prints the time per stage and the share of the total that is NOT vLLM's own load and
save (process start, imports, fetch, checks, verification, upload): preshard's overhead
over a bare ``save_sharded_state`` run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from preshard.cli import build_parser
from preshard.worker import convert
from preshard.worker.progress import Reporter
from preshard.worker.tinymodel import make_tiny_llama


def _s3_setup(model: Path, root: Path):
    """Start an S3 server, upload the source, return (server, source URI, output URI)."""
    from preshard_dev.s3server import RcloneS3

    server = RcloneS3(root)
    server.start()
    server.create_bucket("models")
    server.create_bucket("shards")
    client = server.client()
    for p in model.iterdir():
        client.upload_file(str(p), "models", f"tiny/{p.name}")
    return server, "s3://models/tiny/", "s3://shards/tiny-tp2/"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--local", action="store_true", help="local source and output, no S3")
    ap.add_argument("--tiny", action="store_true", help="the tiny 2-layer model (start-up only)")
    a = ap.parse_args(argv)
    layers = int(os.environ.get("BENCH_CONVERT_LAYERS", "10"))

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
        if not a.local:
            server, source, output = _s3_setup(model, base / "s3")
            os.environ.update(server.env())
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
            req = convert.ConvertRequest.from_args(args)
            outcome = convert.convert(req, Reporter(mode="lines"))
        finally:
            if server is not None:
                server.stop()

    t = outcome.timings
    total = t["total"]
    vllm_own = t.get("vllm_load", 0.0) + t.get("vllm_save", 0.0)
    rows = [
        ("fetch (download)", t.get("download", 0.0)),
        ("vLLM load", t.get("vllm_load", 0.0)),
        ("save_sharded_state", t.get("vllm_save", 0.0)),
        ("reference tokens", t.get("reference_generate", 0.0)),
        (
            "engine process start/stop",
            t.get("convert", 0.0)
            - t.get("vllm_load", 0.0)
            - t.get("vllm_save", 0.0)
            - t.get("reference_generate", 0.0),
        ),
        ("file checks", t.get("check_files", 0.0)),
        ("verify (reload + compare)", t.get("verify", 0.0)),
        ("upload", t.get("upload", 0.0)),
    ]
    # Stages the conversion times that the rows above do not name (new steps show up
    # without editing this table; "convert" is the engine process, split above).
    known = {
        "download",
        "vllm_load",
        "vllm_save",
        "reference_generate",
        "convert",
        "check_files",
        "verify",
        "upload",
        "total",
    }
    rows += [(name, sec) for name, sec in sorted(t.items()) if name not in known]
    size = "tiny Llama" if a.tiny else f"Llama of {model_bytes / 2**30:.2f} GiB"
    print(
        f"{size} (model generation {make_model:.1f} s, not counted), TP={a.tp}, "
        f"{'local dirs' if a.local else 'S3 on 127.0.0.1'}, verify={'off' if a.no_verify else 'on'}"
    )
    print(f"{'stage':<28}{'seconds':>9}{'share':>8}")
    for name, sec in rows:
        print(f"{name:<28}{sec:>9.2f}{sec / total:>8.1%}")
    print(f"{'total':<28}{total:>9.2f}{1:>8.1%}")
    print(
        f"not vLLM's own load+save: {total - vllm_own:.2f} s = "
        f"{(total - vllm_own) / total:.1%} of the wall time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
