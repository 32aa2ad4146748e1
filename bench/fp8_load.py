"""Pre-quantized FP8 shards vs bf16 shards: bytes per rank and load time (issue 21).

Used by ``bench/serving.py`` (its start-up (d)); also runnable alone on a small model:

    python bench/fp8_load.py [--layers 4] [--hidden 1024] [--method fp8_per_block]

Measured, always: every rank's bytes (bf16 rank files vs pre-quantized FP8 rank files of
the same model, ``preshard convert --engine none`` with and without the method), and the
time to read and deserialize each rank's files (``safetensors.torch.load_file`` after the
page cache is dropped where permitted: what any loader must do at least). Measured where
this machine has the kernels (``preshard.worker.engine.kernels.probe_quantization``: the fp8
checkpoint's linear kernel), by ``bench/serving.py``: ``vllm serve --load-format
sharded_state`` of the FP8 shards next to the bf16 ones. Where the probe finds no kernel
the bench prints the probe's reason verbatim and what it measured without an engine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preshard.core.quantity import format_bytes

TP = 2


def convert(model: Path, out: Path, work: Path, *extra: str) -> float:
    t = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "preshard.cli", "convert", "--source", str(model),
         "-tp", str(TP), "--engine", "none", "--no-verify", "--output", str(out),
         "--work-dir", str(work), "--progress", "lines", *extra],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.monotonic() - t


def rank_bytes(ckpt: Path) -> list[int]:
    return [
        sum(p.stat().st_size for p in ckpt.glob(f"model-rank-{r}-part-*.safetensors"))
        for r in range(TP)
    ]


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_seconds(ckpt: Path) -> list[float]:
    """Per rank: seconds to read and deserialize its files into tensors."""
    from safetensors.torch import load_file

    out = []
    for r in range(TP):
        _drop_caches()
        t = time.monotonic()
        for p in sorted(ckpt.glob(f"model-rank-{r}-part-*.safetensors")):
            tensors = load_file(str(p))
            for v in tensors.values():  # touch every page (load_file may map lazily)
                v.view(-1)[-1:].clone()
            del tensors
        out.append(time.monotonic() - t)
    return out


def fp8_reason(method: str) -> str | None:
    """Why this machine cannot serve ``method``'s pre-quantized shards (None: it can)."""
    from preshard.worker import fp8shards
    from preshard.worker.engine.kernels import probe_quantization

    return probe_quantization("fp8", fp8shards.SCHEMES[method].quantization_config())


def report(bf16: Path, fp8: Path, method: str) -> None:
    a, b = rank_bytes(bf16), rank_bytes(fp8)
    print(f"\nbytes per rank, bf16 vs pre-quantized {method} (TP={TP}):")
    for r in range(TP):
        print(f"  rank {r}: {format_bytes(a[r])} vs {format_bytes(b[r])} ({b[r] / a[r]:.2f}x)")
    cold = _drop_caches()
    ra, rb = read_seconds(bf16), read_seconds(fp8)
    print(
        f"read + deserialize per rank (safetensors load_file, page cache "
        f"{'dropped' if cold else 'warm: dropping it is not permitted here'}):"
    )
    for r in range(TP):
        print(f"  rank {r}: bf16 {ra[r]:.2f} s, {method} {rb[r]:.2f} s ({rb[r] / ra[r]:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    from preshard_dev.tinymodel import make_tiny_llama

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument(
        "--method", default="fp8_per_block", choices=["fp8_per_block", "fp8_per_tensor"]
    )
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="preshard-bench-fp8-") as tmp:
        base = Path(tmp)
        model = make_tiny_llama(
            base / "model", layers=a.layers, hidden=a.hidden, heads=a.hidden // 64,
            num_kv_heads=max(1, a.hidden // 256), intermediate=int(a.hidden * 2.75),
            vocab=32000, seed=0, tokenizer=False,
        )  # fmt: skip
        t_bf16 = convert(model, base / "bf16", base / "w1")
        t_fp8 = convert(model, base / "fp8", base / "w2", "--quantization", a.method)
        print(f"convert (engine-free, TP={TP}): bf16 {t_bf16:.1f} s, {a.method} {t_fp8:.1f} s")
        report(base / "bf16", base / "fp8", a.method)
        reason = fp8_reason(a.method)
        print(
            "vLLM load of the FP8 shards: "
            + (
                f"not measured here: {reason}"
                if reason
                else "this machine has the kernel: bench/serving.py measures it (start-up (d))"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
