"""A fast stand-in for the conversion worker (dev tooling, for load tests and demos).

``python -m preshard_dev.standin convert ...`` takes exactly ``preshard convert``'s
arguments (the same parser) and does everything the real worker does except running vLLM:
it checks the S3 source exists, writes one small safetensors file per rank in vLLM's file
pattern, reports progress through the real reporter, publishes with the real
``publication.publish`` (parallel upload, manifest last) and writes the real termination
message. Any other subcommand (``purge``, ``fetch``, ``verify``) runs the real CLI.

It exists so that tests can run many conversions at once on a 2-core machine; the e2e
happy path and the demo use the real worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from preshard import cli
from preshard.core.errors import PreshardError, SourceNotFound
from preshard.core.progress import Result
from preshard.worker.progress import Reporter

STANDIN_VERSION = "standin"


def standin_weights() -> bytes:
    """A tiny, valid safetensors file: a source the stand-in "converts" and that the
    real ``verify --against`` of the adopt and copy steps can open."""
    import numpy as np
    from safetensors.numpy import save

    return bytes(save({"model.embed_tokens.weight": np.zeros((4, 4), dtype=np.float32)}))


class StallingReporter(Reporter):
    """Stalls every transfer thread after ``after`` progress steps of the upload: the
    process then hangs mid-upload until something kills it (fault tests). With
    ``once_marker``, only the first attempt stalls (the file records that it did)."""

    def __init__(self, after: int, once_marker: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.after = after
        self.once_marker = Path(once_marker) if once_marker else None
        self.enabled = self.once_marker is None or not self.once_marker.exists()
        self.count = 0
        self.guard = threading.Lock()

    def advance(self, n: int) -> None:
        if self.enabled:
            with self.guard:
                self.count += 1
                stall = self.count > self.after
            if stall:
                if self.once_marker is not None:
                    self.once_marker.touch()
                print("preshard (stand-in): stalling mid-upload", file=sys.stderr, flush=True)
                while True:
                    time.sleep(3600)
        super().advance(n)


def _reporter() -> Reporter:
    kw: dict[str, Any] = {"mode": "lines", "line_interval": 1.0, "record_interval": 0.2}
    after = os.environ.get("PRESHARD_STANDIN_STALL_AFTER")
    if after is None:
        return Reporter(**kw)
    return StallingReporter(int(after), os.environ.get("PRESHARD_STANDIN_STALL_ONCE"), **kw)


def _fake_shards(dest: Path, tp: int, pp: int, pattern: str, swapped: bool = False) -> None:
    """``swapped``: rank 0 holds other values than the metadata says (a conversion that
    published bytes other than its source's, e.g. weights swapped after the preflight)."""
    import numpy as np
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for p in range(pp):
        for r in range(tp):
            rank = p * tp + r
            value = 99 if swapped and rank == 0 else rank + 1
            tensors = {f"model.layers.{rank}.weight": np.full((64, 64), value, dtype=np.float32)}
            name = pattern.format(rank=rank, part=0, pp_rank=p, tp_rank=r)
            save_file(tensors, str(dest / name))
    (dest / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))


def _fake_sharding(shards: Any, tp: int, pp: int) -> None:
    """A well-formed preshard-sharding.json for the fake shards: each rank's one tensor is
    filled with rank + 1 by a ``fill`` write, so the real ``verify --against`` (the adopt
    and copy steps' check) passes against any source and catches a changed element."""
    import json

    from preshard.core.manifest import SHARDING_NAME
    from preshard.core.sharding import SHARDING_FORMAT, SHARDING_FORMAT_VERSION

    doc = {
        "format": SHARDING_FORMAT,
        "formatVersion": SHARDING_FORMAT_VERSION,
        "stateFormat": "raw",
        "tensorParallelSize": tp,
        "pipelineParallelSize": pp,
        "sources": {},
        "skippedSources": [],
        "ranks": [
            {
                "rank": r,
                "tpRank": r % tp,
                "ppRank": r // tp,
                "tensors": {
                    f"model.layers.{r}.weight": {
                        "shape": [64, 64],
                        "dtype": "float32",
                        "writes": [{"op": "fill", "value": r + 1, "dst": [0, [64, 1], [64, 64]]}],
                    }
                },
            }
            for r in range(tp * pp)
        ],
    }
    (shards / SHARDING_NAME).write_text(json.dumps(doc) + "\n")


def convert(args: Any) -> int:
    from preshard.core.manifestfields import ConversionFacts, conversion_fields
    from preshard.worker.conversion.common import ConvertRequest
    from preshard.worker.progress import write_result
    from preshard.worker.store import publication, s3
    from preshard.worker.verify.shards import shard_pattern

    reporter = _reporter()
    try:
        req = ConvertRequest.from_args(args)
        reporter.stage("Downloading")
        if req.plan.source.scheme == "s3":
            settings = s3.source_settings(req.source_endpoint_url, None, 4)
            client = s3.make_client(settings)
            listing = s3.with_translation(
                lambda: s3.list_objects(client, req.plan.source.bucket, req.plan.source.prefix),
                str(req.plan.source),
                "list",
            )
            if not listing:
                raise SourceNotFound(
                    f"source {req.plan.source} is empty or does not exist",
                )
            if req.plan.source_digest:  # the real worker's pin check (store.fetch.fetch_source)
                from preshard.worker.store import source_files

                entries = s3.with_translation(
                    lambda: source_files.s3_entries(client, req.plan.source), str(req.plan.source)
                )
                source_files.check_pin(str(req.plan.source), entries, req.plan.source_digest)
        delay = float(os.environ.get("PRESHARD_STANDIN_SECONDS", "0.5"))
        reporter.stage("Converting")
        time.sleep(delay)
        shards = req.work_dir / "shards"
        pattern = shard_pattern(req.plan.pipeline_parallel_size)
        # attack tests: the resources of this namespace publish swapped weights
        swap_ns = os.environ.get("PRESHARD_STANDIN_SWAP_NAMESPACE")
        swapped = bool(swap_ns) and (req.plan.owner or "").split("/", 1)[0] == swap_ns
        _fake_shards(
            shards,
            req.plan.tensor_parallel_size,
            req.plan.pipeline_parallel_size,
            pattern,
            swapped,
        )
        _fake_sharding(shards, req.plan.tensor_parallel_size, req.plan.pipeline_parallel_size)
        reporter.stage("Verifying")
        reporter.stage("Uploading", total_bytes=sum(p.stat().st_size for p in shards.iterdir()))
        artifact = publication.publish(
            shards,
            str(req.plan.output),
            manifest_fields=conversion_fields(req.plan, ConversionFacts(STANDIN_VERSION)),
            owner=req.plan.owner,
            endpoint_url=req.endpoint_url,
            region=req.region,
            concurrency=4,
            reporter=reporter,
        )
    except PreshardError as exc:
        reporter.done()
        write_result(Result(result="Failed", reason=exc.reason, message=exc.message))
        print(f"preshard: error: {exc.message}", file=sys.stderr)
        return 3 if exc.permanent else 1
    reporter.done()
    write_result(Result(result="Succeeded", artifact=artifact))
    print(f"preshard (stand-in): published {artifact.get('uri')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "convert":
        return cli.main(argv)
    args = cli.build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return convert(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
