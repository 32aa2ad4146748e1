"""``preshard`` console script.

Every subcommand's flags are declared here (one place for ``--help`` and the README);
the implementation is imported only when the subcommand runs, so ``preshard operator``
never imports vLLM and ``preshard convert`` never imports kopf.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from preshard import __version__
from preshard.core.errors import PreshardError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMANENT = 3

# subcommand -> module with ``run(args: argparse.Namespace) -> int``
COMMANDS = {
    "operator": "preshard.runner",
    "convert": "preshard.worker.convert",
    "fetch": "preshard.worker.commands",
    "verify": "preshard.worker.commands",
    "purge": "preshard.worker.commands",
    "render": "preshard.render",
    "demo": "preshard_dev.demo",
}


def _s3_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 connection (credentials only from the environment)")
    g.add_argument(
        "--endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="S3-compatible endpoint, e.g. http://minio:9000 (env AWS_ENDPOINT_URL_S3)",
    )
    g.add_argument(
        "--region",
        default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        help="S3 region (env AWS_REGION)",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=int(os.environ.get("PRESHARD_S3_CONCURRENCY", "16")),
        help="parallel part transfers (default 16, env PRESHARD_S3_CONCURRENCY)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preshard",
        description="Pre-shard LLM checkpoints for vLLM: operator, conversion worker and tools.",
    )
    parser.add_argument("--version", action="version", version=f"preshard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # -- operator -------------------------------------------------------------------------
    p = sub.add_parser(
        "operator",
        help="run the Kubernetes operator (kopf)",
        description="Run the ShardedCheckpoint operator. Configuration comes from flags or "
        "PRESHARD_* environment variables (see the chart's values).",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch only this namespace (repeatable; env PRESHARD_NAMESPACES, comma-separated)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus /metrics port (default 8080, 0 disables)",
    )
    p.add_argument(
        "--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    p.add_argument("--standalone", action="store_true", default=True, help=argparse.SUPPRESS)

    # -- convert --------------------------------------------------------------------------
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint into per-rank vLLM shards and publish it",
        description="Fetch a model, save it with vLLM's save_sharded_state at the given "
        "parallelism, verify it, and upload it with preshard-manifest.json written last.",
    )
    p.add_argument(
        "--source",
        required=True,
        help="s3://bucket/prefix/, pvc://claim/path, hf://org/name[@rev] or a local directory",
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, required=True, help="tensor-parallel size (>= 1)"
    )
    p.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="pipeline-parallel size (default 1)",
    )
    p.add_argument("--quantization", default=None, help="vLLM quantization method, e.g. fp8")
    p.add_argument(
        "--dtype", default="auto", help="auto, float16, bfloat16 or float32 (default auto)"
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ (or a local directory)")
    p.add_argument(
        "--max-file-size",
        default="5Gi",
        help="largest safetensors file per rank, bytes or a quantity like 5Gi (default 5Gi)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reload the shards and compare greedy tokens (default on)",
    )
    p.add_argument(
        "--work-dir",
        default=os.environ.get("PRESHARD_WORK_DIR", "./preshard-work"),
        help="local scratch directory (env PRESHARD_WORK_DIR)",
    )
    p.add_argument(
        "--owner",
        default=os.environ.get("PRESHARD_OWNER"),
        help="owner recorded in the manifest (namespace/name/uid); a prefix owned by another owner is never overwritten",
    )
    p.add_argument(
        "--source-endpoint-url",
        default=os.environ.get("PRESHARD_SOURCE_ENDPOINT_URL"),
        help="S3 endpoint of the source, if different (env PRESHARD_SOURCE_ENDPOINT_URL)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vLLM gpu_memory_utilization (default: vLLM's, 0.2 on CPU)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="vLLM max_model_len for the conversion engines",
    )
    p.add_argument(
        "--progress",
        choices=["auto", "bar", "lines"],
        default="auto",
        help="progress display: a bar on a terminal, lines otherwise",
    )
    _s3_flags(p)

    # -- fetch ----------------------------------------------------------------------------
    p = sub.add_parser(
        "fetch",
        help="download a published checkpoint and verify every file against its manifest",
        description="Download a published checkpoint (refuses a prefix with no manifest) and "
        "check every file's sha256. Serving pods run this as an init container.",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="s3://bucket/prefix/ of a published checkpoint"
    )
    p.add_argument("--to", dest="dest", required=True, help="local directory")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="only this rank's shard files (plus config and tokenizer files)",
    )
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto")
    _s3_flags(p)

    # -- verify ---------------------------------------------------------------------------
    p = sub.add_parser(
        "verify",
        help="check a published checkpoint's objects against its manifest",
        description="Download every object of a published checkpoint, compare sizes and "
        "sha256 with preshard-manifest.json, print a summary; non-zero on any problem.",
    )
    p.add_argument("uri", help="s3://bucket/prefix/ of a published checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _s3_flags(p)

    # -- purge ----------------------------------------------------------------------------
    p = sub.add_parser(
        "purge",
        help="delete a checkpoint prefix (manifest first), as deletionPolicy: Delete does",
        description="Delete preshard-manifest.json first, then every object under the prefix, "
        "and abort unfinished multipart uploads.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ to delete")
    p.add_argument(
        "--owner",
        default=os.environ.get("PRESHARD_OWNER"),
        help="refuse unless the manifest (if any) names this owner",
    )
    _s3_flags(p)

    # -- render ---------------------------------------------------------------------------
    p = sub.add_parser(
        "render",
        help="print the Jobs the operator would create for a ShardedCheckpoint (no cluster)",
        description="Print, as YAML, the conversion Job (and for deletionPolicy: Delete the "
        "purge Job) that the operator creates for each ShardedCheckpoint in FILE, from the "
        "operator's own builders and its configuration (PRESHARD_* variables, the same "
        "defaults). A spec the operator would refuse fails with its message (exit 3).",
    )
    p.add_argument("-f", "--filename", dest="file", required=True, help="YAML file, or - for stdin")
    p.add_argument(
        "--namespace",
        "-n",
        default="default",
        help="namespace of resources without metadata.namespace (default: default)",
    )
    p.add_argument(
        "--uid",
        default="00000000-0000-0000-0000-000000000000",
        help="the resource's uid (assigned by the API server at creation; default a placeholder)",
    )

    # -- demo -----------------------------------------------------------------------------
    p = sub.add_parser(
        "demo",
        help="run the whole product locally (API emulator, S3, operator, job runner, vLLM)",
        description="Start a Kubernetes API emulator, an S3 server, the operator and a local "
        "Job runner on 127.0.0.1, apply examples/tiny-tp2.yaml and watch it to Ready. "
        "Dev tooling: on a real cluster Kubernetes runs the Job.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running and print a kubeconfig path and the S3 endpoint",
    )
    p.add_argument(
        "--dir", default=".preshard-demo", help="state and log directory (default .preshard-demo)"
    )
    p.add_argument(
        "--example",
        default=None,
        help="the ShardedCheckpoint to apply (default examples/tiny-tp2.yaml)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Also under -v: the kubernetes client logs whole response bodies at DEBUG, Secrets
    # included, and botocore logs request headers; neither may reach a log.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        module = importlib.import_module(COMMANDS[args.command])
    except ModuleNotFoundError as exc:
        print(
            f"preshard: error: '{args.command}' is not available in this installation ({exc.name} is missing)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        return int(module.run(args) or 0)
    except PreshardError as exc:
        print(f"preshard: error: {exc.message}", file=sys.stderr)
        return EXIT_PERMANENT if exc.permanent else EXIT_FAILED
    except KeyboardInterrupt:
        print("preshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
