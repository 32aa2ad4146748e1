"""``preshard verify --against``: wall time and peak memory per GiB of checkpoint.

    python bench/verify_against.py                 # a ~1.1 GiB random Llama, TP=2
    BENCH_VERIFY_LAYERS=2 python bench/verify_against.py    # a quick, smaller run
    python bench/verify_against.py --model DIR --shards DIR   # an existing pair

It writes a random Llama of at least 1 GiB (bf16, hidden 2048, ``BENCH_VERIFY_LAYERS``
layers, default 10, vocabulary 32000; preshard_dev.tinymodel), converts it once at
TP=2 with the real ``preshard convert`` (CPU vLLM, untimed here: bench/convert_stages.py
measures that) and then times, each in a fresh process whose RSS high-water mark is read
with ``getrusage(RUSAGE_CHILDREN)`` of a wrapper process:

* the baseline: reading every byte of the source and of the rank files once and hashing
  it (sha256), the I/O floor of any bitwise check; and the RSS of a process that only
  imports torch and safetensors (what any check pays before reading a byte);
* ``preshard verify --against SOURCE SHARDS``: rebuilds every checkpoint tensor from the
  rank files with the sharding metadata and compares it bit for bit.

It prints seconds per GiB of checkpoint (source bytes), the ratio to the baseline, and
the peak RSS above the import-only process next to the largest tensor of the checkpoint:
the check is bounded when that stays a small multiple of one tensor, independent of the
checkpoint size. Not a test: it never fails on a number; it exits non-zero only when a
step cannot run (e.g. ``verify --against`` reports a mismatch or does not exist).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30

# A wrapper that runs argv and prints the child's RSS high-water mark (KiB on Linux).
_WRAP = (
    "import resource, subprocess, sys, time\n"
    "t0 = time.monotonic()\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "dt = time.monotonic() - t0\n"
    "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)
_HASH_ALL = (
    "import hashlib, sys\n"
    "for p in sys.argv[1:]:\n"
    "    h = hashlib.sha256()\n"
    "    with open(p, 'rb') as f:\n"
    "        while b := f.read(8 << 20):\n"
    "            h.update(b)\n"
)
_IMPORTS = "import torch, safetensors.torch, preshard.cli\n"


def measured(argv: list[str]) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS in bytes) of ``argv`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAP, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]) * 1024


def checkpoint_bytes(d: Path) -> tuple[int, int, str]:
    """(bytes of tensor data, largest tensor in bytes, its name) of the safetensors in d."""
    total, largest, name = 0, 0, ""
    for p in sorted(d.glob("*.safetensors")):
        with p.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            size = v["data_offsets"][1] - v["data_offsets"][0]
            total += size
            if size > largest:
                largest, name = size, k
    return total, largest, name


def make_pair(base: Path, layers: int) -> tuple[Path, Path]:
    from preshard_dev.tinymodel import make_tiny_llama

    model = make_tiny_llama(
        base / "model",
        hidden=2048,
        heads=32,
        num_kv_heads=8,
        layers=layers,
        intermediate=5632,
        vocab=32000,
        max_positions=256,
        tokenizer=False,
        seed=0,
    )
    out = base / "shards"
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preshard.cli",
            "convert",
            "--source",
            str(model),
            "-tp",
            "2",
            "--output",
            str(out),
            "--work-dir",
            str(base / "work"),
            "--progress",
            "lines",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"preshard convert failed with exit code {proc.returncode}")
    print(f"converted at TP=2 in {time.monotonic() - t0:.0f} s (not part of the figures)")
    return model, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an existing source checkpoint directory")
    ap.add_argument("--shards", help="its converted (published) directory")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_VERIFY_ROUNDS", "2")))
    a = ap.parse_args(argv)
    layers = int(os.environ.get("BENCH_VERIFY_LAYERS", "10"))

    with tempfile.TemporaryDirectory(prefix="preshard-bench-verify-") as tmp:
        if a.model and a.shards:
            model, shards = Path(a.model), Path(a.shards)
        else:
            model, shards = make_pair(Path(tmp), layers)
        src_bytes, largest, largest_name = checkpoint_bytes(model)
        files = [str(p) for p in sorted(model.glob("*.safetensors"))]
        files += [str(p) for p in sorted(shards.glob("model-*.safetensors"))]
        shard_bytes = sum(os.path.getsize(p) for p in files) - sum(
            p.stat().st_size for p in model.glob("*.safetensors")
        )
        gib = src_bytes / GiB

        _, _, import_rss = measured([sys.executable, "-c", _IMPORTS])
        base_t, base_rss, ver_t, ver_rss = [], [], [], []
        for _ in range(a.rounds):
            _, t, rss = measured([sys.executable, "-c", _HASH_ALL, *files])
            base_t.append(t)
            base_rss.append(rss)
            cmd = [sys.executable, "-m", "preshard.cli", "verify", "--against"]
            rc, t, rss = measured([*cmd, str(model), str(shards)])
            if rc != 0:
                print(f"preshard verify --against exited with {rc}", file=sys.stderr)
                return 1
            ver_t.append(t)
            ver_rss.append(rss)

    bt, vt = min(base_t), min(ver_t)
    vr = max(ver_rss)
    print(
        f"checkpoint: {src_bytes / GiB:.2f} GiB of tensors ({shard_bytes / GiB:.2f} GiB of "
        f"rank files), largest tensor {largest_name} = {largest / 2**20:.0f} MiB; "
        f"best of {a.rounds} rounds"
    )
    print(f"{'':<34}{'s/GiB':>8}{'x base':>8}{'peak RSS MiB':>14}")
    print(
        f"{'baseline: read + sha256 all bytes':<34}{bt / gib:>8.2f}{1:>8.2f}{max(base_rss) / 2**20:>14.0f}"
    )
    print(f"{'preshard verify --against':<34}{vt / gib:>8.2f}{vt / bt:>8.2f}{vr / 2**20:>14.0f}")
    above = vr - import_rss
    print(
        f"peak RSS above an import-only process ({import_rss / 2**20:.0f} MiB): "
        f"{above / 2**20:.0f} MiB = {above / largest:.1f} x the largest tensor = "
        f"{above / src_bytes:.1%} of the checkpoint"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
