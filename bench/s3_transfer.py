"""S3 transfer throughput: preshard vs a naive boto3 loop vs s5cmd, against one local
S3 server (``rclone serve s3`` on 127.0.0.1).

    python bench/s3_transfer.py            # 8 files x 128 MiB = 1 GiB
    BENCH_S3_MIB=64 BENCH_S3_ROUNDS=1 python bench/s3_transfer.py    # a quick run

The checkpoint is ``BENCH_S3_FILES`` (default 8) files of random bytes totalling
``BENCH_S3_MIB`` MiB (default 1024). Each tool uploads it to its own prefix and downloads
it back into an empty directory: all uploads, then all downloads (after one untimed HEAD
of every object, see ``warm``), ``BENCH_S3_ROUNDS`` times (default 3, each round starting
with another tool); the best round of each tool counts. ``BENCH_TMPDIR`` picks the disk.
Besides MiB/s it prints CPU seconds per GiB of client and server (steadier than wall
time on a busy machine).

* preshard: ``publication.publish`` (sha256 of every file, parallel multipart upload with
  Content-MD5 per part, which rclone checks, manifest last) and the ``Downloader``
  (parallel ranged GETs written in place, every file's sha256 computed as its bytes
  arrive and checked against the manifest), as ``preshard convert`` and ``preshard
  fetch`` run them; so preshard's figures include its integrity work;
* naive boto3: ``upload_file``/``download_file`` one file at a time, default settings;
* s5cmd: ``s5cmd cp`` of the whole directory / prefix (its default parallelism).

Server CPU depends on the client's requests: rclone hashes what it serves for a GET that
starts at offset 0 (its VFS checks a file read from its start; measured here, 128 MiB
objects read whole cost it about 2.5 CPU s/GiB, from offset 1 about 0.85), so a tool that
fetches more of each file from offset 0 in one request costs the server more. preshard's
32 MiB ranges read a quarter of each 128 MiB file that way, s5cmd's 50 MiB parts (its
default) over a third, a whole-object GET all of it; real S3 has no such cost.

Client and server share this machine's cores (and, on a shared machine, other work's):
compare the ratios of one run, never absolute figures across machines. Not a test: it
never fails on a number.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preshard.core.manifest import MANIFEST_NAME
from preshard.worker.store import publication
from preshard.worker.store import s3 as s3mod
from preshard.worker.store.download import Downloader, DownloadItem
from preshard.worker.store.transfer import sha256_file
from preshard_dev.s3server import RcloneS3, tool_path

MiB = 2**20
BUCKET = "bench"
MANIFEST_FIELDS = {
    "source_uri": "hf://bench/random@main",
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "vllm_version": "0.32.0",
}


def make_files(root: Path, total_mib: int, nfiles: int) -> list[Path]:
    """Random, incompressible files (os.urandom in 8 MiB blocks), rank-file names."""
    root.mkdir(parents=True)
    per_file = max(1, total_mib * MiB // nfiles)
    block = 8 * MiB
    paths = []
    for i in range(nfiles):
        path = root / f"model-rank-0-part-{i}.safetensors"
        with open(path, "wb") as f:
            left = per_file
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n
        paths.append(path)
    return paths


@dataclass
class Run:
    seconds: float
    client_cpu: float  # this process and its waited-for children (s5cmd)
    server_cpu: float | None  # the rclone process, where /proc tells


def process_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], Any], server: RcloneS3) -> Run:
    # Dirty pages of the previous step (written files, the server's copy) are flushed
    # first, so no tool pays for another one's writeback.
    os.sync()
    pid = server.proc.pid if server.proc is not None else -1
    s0, c0, t0 = process_cpu(pid), client_cpu(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    s1 = process_cpu(pid)
    return Run(seconds, client_cpu() - c0, s1 - s0 if s0 is not None and s1 is not None else None)


def warm(server: RcloneS3, prefix: str) -> None:
    """HEAD every object once, untimed. rclone computes an object's MD5 (its ETag) on the
    first request after the object is written, and once per concurrent request until
    then, so parallel ranged GETs of a cold object would measure that, not the transfer
    (boto3 and preshard HEAD each object first; other tools may not). Real S3 has no
    such first-read cost."""
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            client.head_object(Bucket=BUCKET, Key=obj["Key"])


def check_download(dest: Path, files: list[Path]) -> None:
    for p in files:
        got = dest / p.name
        if not got.is_file() or got.stat().st_size != p.stat().st_size:
            raise RuntimeError(f"download incomplete: {got}")


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- the tools


def preshard_up(src: Path, server: RcloneS3, prefix: str) -> None:
    publication.publish(
        src,
        f"s3://{BUCKET}/{prefix}",
        manifest_fields=dict(MANIFEST_FIELDS),
        endpoint_url=server.endpoint,
    )


def preshard_down(server: RcloneS3, prefix: str, dest: Path, verify: bool = True) -> None:
    from preshard.core.manifest import Manifest

    client = s3mod.make_client(s3mod.output_settings(server.endpoint))
    body = client.get_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME)["Body"].read()
    manifest = Manifest.from_json(body)
    items = [
        DownloadItem(prefix + f.key, dest / f.key, f.size, f.sha256 if verify else None)
        for f in manifest.files
    ]
    Downloader(client, BUCKET).download(items)


def boto3_up(src: Path, server: RcloneS3, prefix: str) -> None:
    client = server.client()
    for p in sorted(src.iterdir()):
        client.upload_file(str(p), BUCKET, prefix + p.name)


def boto3_down(server: RcloneS3, prefix: str, dest: Path) -> None:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    for key in sorted(keys):
        client.download_file(BUCKET, key, str(dest / key[len(prefix) :]))


def s5cmd(server: RcloneS3, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | server.env()
    subprocess.run(
        [tool_path("s5cmd"), "--endpoint-url", server.endpoint, *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def s5cmd_up(src: Path, server: RcloneS3, prefix: str) -> None:
    s5cmd(server, "cp", f"{src}/*", f"s3://{BUCKET}/{prefix}")


def s5cmd_down(server: RcloneS3, prefix: str, dest: Path) -> None:
    s5cmd(server, "cp", f"s3://{BUCKET}/{prefix}*", f"{dest}/")


TOOLS: list[tuple[str, Callable[..., None], Callable[..., None]]] = [
    ("preshard", preshard_up, preshard_down),
    ("naive boto3 (1 file at a time)", boto3_up, boto3_down),
    ("s5cmd", s5cmd_up, s5cmd_down),
]


def main() -> int:
    total_mib = int(os.environ.get("BENCH_S3_MIB", "1024"))
    nfiles = int(os.environ.get("BENCH_S3_FILES", "8"))
    rounds = max(1, int(os.environ.get("BENCH_S3_ROUNDS", "3")))
    tool_path("s5cmd")  # fail early, with the install hint, when it is missing
    base_dir = os.environ.get("BENCH_TMPDIR") or tempfile.gettempdir()
    # source, one server copy per tool, download, margin
    need = (2 + len(TOOLS)) * total_mib * MiB + 256 * MiB
    free = shutil.disk_usage(base_dir).free
    if free < need:
        print(
            f"not enough disk in {base_dir}: {free // MiB} MiB free, {need // MiB} MiB "
            "needed (set BENCH_S3_MIB lower or BENCH_TMPDIR elsewhere)",
            file=sys.stderr,
        )
        return 1

    with tempfile.TemporaryDirectory(prefix="preshard-bench-s3-", dir=base_dir) as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        files = make_files(base / "src", total_mib, nfiles)
        size_mib = sum(p.stat().st_size for p in files) / MiB
        print(
            f"{len(files)} files x {size_mib / len(files):.0f} MiB = {size_mib:.0f} MiB of random "
            f"bytes (generated in {time.perf_counter() - t0:.1f} s); rclone serve s3 on "
            f"127.0.0.1; {os.cpu_count()} cores shared by client and server",
            flush=True,
        )
        t0 = time.perf_counter()
        for p in files:  # sha256 alone, one file after another
            sha256_file(p)
        hash_s = time.perf_counter() - t0
        runs: dict[str, list[tuple[Run, Run]]] = {name: [] for name, _, _ in TOOLS}
        unverified: list[Run] = []
        with RcloneS3(base / "s3") as server:
            old_env = dict(os.environ)
            os.environ.update(server.env())  # preshard reads credentials from the env
            try:
                server.client().create_bucket(Bucket=BUCKET)
                for r in range(rounds):
                    # All uploads, then all downloads (the first read after a burst of
                    # writes is slower here, whoever does it), each round starting with
                    # another tool.
                    order = TOOLS[r % len(TOOLS) :] + TOOLS[: r % len(TOOLS)]
                    ups: dict[str, Run] = {}
                    for name, up, _ in order:
                        prefix = f"r{r}-{name.split()[0]}/"
                        ups[name] = timed(
                            lambda up=up, p=prefix: up(base / "src", server, p), server
                        )
                    for name, _, _ in order:
                        warm(server, f"r{r}-{name.split()[0]}/")
                    for name, _, down in order:
                        prefix = f"r{r}-{name.split()[0]}/"
                        dest = fresh(base / "down")
                        got = timed(lambda down=down, p=prefix, d=dest: down(server, p, d), server)
                        check_download(dest, files)
                        runs[name].append((ups[name], got))
                        print(
                            f"  round {r + 1}: {name}: upload {ups[name].seconds:.1f} s, "
                            f"download {got.seconds:.1f} s",
                            flush=True,
                        )
                    # Reference, not a tool: preshard's download of its own objects with the
                    # sha256 check off (what the check costs here).
                    dest = fresh(base / "down")
                    got = timed(
                        lambda d=dest, p=f"r{r}-preshard/": preshard_down(server, p, d, False),
                        server,
                    )
                    check_download(dest, files)
                    unverified.append(got)
                    for name, _, _ in order:
                        prefix = f"r{r}-{name.split()[0]}/"
                        shutil.rmtree(server.object_path(BUCKET, prefix), ignore_errors=True)
            finally:
                os.environ.clear()
                os.environ.update(old_env)

    gib = size_mib / 1024
    # Best of the rounds: on a shared machine, slower runs measure the neighbours. CPU
    # time is steadier than wall time there: the median round's is shown per GiB.
    rate: dict[str, tuple[float, float]] = {}
    print(f"\nbest of {rounds} round(s); CPU seconds per GiB, median round, client+server")
    print(f"{'':<32}{'upload MiB/s':>13}{'download MiB/s':>16}{'CPU up':>14}{'CPU down':>14}")
    for name, rs in runs.items():
        up = max(size_mib / u.seconds for u, _ in rs)
        down = max(size_mib / d.seconds for _, d in rs)
        rate[name] = (up, down)
        cpu = []
        for col in (0, 1):
            c = statistics.median(x[col].client_cpu for x in rs) / gib
            srv = [x[col].server_cpu for x in rs if x[col].server_cpu is not None]
            cpu.append(f"{c:.1f}+{statistics.median(srv) / gib:.1f}" if srv else f"{c:.1f}")
        print(f"{name:<32}{up:>13.1f}{down:>16.1f}{cpu[0]:>14}{cpu[1]:>14}")
    ref = max(size_mib / d.seconds for d in unverified)
    c = statistics.median(d.client_cpu for d in unverified) / gib
    srv = [d.server_cpu for d in unverified if d.server_cpu is not None]
    cpu_ref = f"{c:.1f}+{statistics.median(srv) / gib:.1f}" if srv else f"{c:.1f}"
    print(f"{'(preshard, sha256 check off)':<32}{'-':>13}{ref:>16.1f}{'-':>14}{cpu_ref:>14}")
    ours = rate["preshard"]
    for name, (up, down) in rate.items():
        if name != "preshard":
            label = f"preshard / {name.split(' (')[0]}"
            print(f"{label:<32}{ours[0] / up:>12.2f}x{ours[1] / down:>15.2f}x")
    print(
        f"\npreshard's figures include its integrity work: sha256 of every file before the "
        f"upload ({size_mib / hash_s:.0f} MiB/s alone on this machine) and during the "
        "download, Content-MD5 per part; the baselines verify nothing beyond what the server "
        "checks. The row in parentheses is preshard's download with the sha256 check off "
        "(a reference for what the check costs, not a mode preshard fetch has)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
