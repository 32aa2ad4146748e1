"""``preshard`` console script.

Every subcommand's flags are declared here (one place for ``--help`` and the README),
except those other installed distributions add through the ``preshard.commands``
entry-point group (the dev install's ``preshard demo``, see ``PLUGIN_GROUP``); the
implementation is imported only when the subcommand runs, so ``preshard operator``
never imports vLLM and ``preshard convert`` never imports kopf.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from preshard import __version__
from preshard.core import plan
from preshard.core.contract import EXIT_FAILED, EXIT_PERMANENT, EXIT_USAGE
from preshard.core.errors import PreshardError

WORKER_RUNNER = "preshard.worker.commands.runner"
# subcommand -> module with ``run(args: argparse.Namespace) -> int``
COMMANDS = {
    "operator": "preshard.runner",
    # the worker's commands: one runner (result, termination message, exit code), one
    # module per command under preshard.worker.commands
    "convert": WORKER_RUNNER,
    "fetch": WORKER_RUNNER,
    "check": WORKER_RUNNER,
    "verify": WORKER_RUNNER,
    "purge": WORKER_RUNNER,
    "preflight": WORKER_RUNNER,
    "adopt": WORKER_RUNNER,
    "copy": WORKER_RUNNER,
    "withdraw": WORKER_RUNNER,
    "render": "preshard.render",
}

# Subcommands other installed distributions contribute: each entry point in this group is
# ``register(subparsers) -> run`` (adds its parser, returns ``run(args) -> int``). The dev
# install's ``preshard-dev`` (dev/pyproject.toml) adds ``preshard demo`` this way, so the
# product never names its dev tooling and the wheel runs without it.
PLUGIN_GROUP = "preshard.commands"
_PLUGIN_RUN = "_preshard_plugin_run"


def _plugin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:
            continue  # a built-in command (or the same plugin found twice on the path)
        try:
            register = ep.load()
        except ImportError:
            continue  # a stale install whose code is gone: the command is simply absent
        run = register(sub)
        if ep.name in sub.choices:
            sub.choices[ep.name].set_defaults(**{_PLUGIN_RUN: run})


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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return n


def _sha256_pin(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(
            "must be 64 lowercase hex digits (status.artifact.manifestSha256)"
        )
    return value


def _gate_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("serving gate (refuse before vLLM starts)")
    g.add_argument(
        "--manifest-sha256",
        type=_sha256_pin,
        required=required,
        default=None,
        help="refuse unless the manifest's sha256 is this (the serving ConfigMap's "
        "MANIFEST_SHA256): a replaced shard with a rewritten manifest is caught",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive,
        required=required,
        default=None,
        help="the serving TP size: refuse unless it equals the checkpoint's"
        + ("" if required else "; also checks the state format (as 'preshard check')"),
    )
    g.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=_positive,
        default=1 if required else None,
        help="the serving PP size: refuse unless it equals the checkpoint's (default 1)",
    )
    g.add_argument(
        "--serving-vllm-version",
        default=None,
        help="the serving container's vLLM version, when this runs in another image "
        "(default: the vLLM installed here, from package metadata)",
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
    # what to produce: the conversion plan's flags (preshard.core.plan, one definition)
    plan.add_arguments(p)
    p.set_defaults(owner=os.environ.get("PRESHARD_OWNER"))
    p.add_argument(
        "--work-dir",
        default=os.environ.get("PRESHARD_WORK_DIR") or None,
        help="local scratch directory, kept for a resumed run (env PRESHARD_WORK_DIR; "
        "default: a temporary directory, removed after a successful run)",
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
        "check every file's sha256. Serving pods run this as an init container; with "
        "--manifest-sha256 and --tensor-parallel-size it is also the serving gate (see "
        "'preshard check'), run before anything is downloaded.",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="s3://bucket/prefix/ of a published checkpoint"
    )
    p.add_argument("--to", dest="dest", required=True, help="local directory")
    ranks = p.add_mutually_exclusive_group()
    ranks.add_argument(
        "--rank",
        type=_non_negative,
        default=None,
        help="only this global rank's shard files (plus config and tokenizer files)",
    )
    ranks.add_argument(
        "--node-rank",
        type=_non_negative,
        default=None,
        help="multi-node serving: only the ranks vLLM runs on node K of --nodes M "
        "(vLLM's --node-rank; ranks K*W/M .. (K+1)*W/M-1 of W = TP x PP)",
    )
    p.add_argument(
        "--nodes", type=_positive, default=None, help="number of nodes (vLLM's --nnodes)"
    )
    _gate_flags(p, required=False)
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto")
    _s3_flags(p)

    # -- check ----------------------------------------------------------------------------
    p = sub.add_parser(
        "check",
        help="the serving gate before streaming: may this vLLM load this checkpoint? (no download)",
        description="Check a published checkpoint before vLLM streams it "
        "(runai_streamer_sharded): the manifest's sha256 equals the pin, the serving "
        "TP/PP equal the checkpoint's, the vLLM installed here (or --serving-vllm-version) "
        "can load its state format, and every listed object exists with its size (HEAD "
        "requests; contents are not read). Exit 0 ok, 2 usage, 3 refused, 1 transient.",
    )
    p.add_argument(
        "--from", dest="source", required=True, help="s3://bucket/prefix/ of a published checkpoint"
    )
    _gate_flags(p, required=True)
    p.add_argument(
        "--load-format",
        choices=["runai_streamer_sharded", "sharded_state"],
        default="runai_streamer_sharded",
        help="how vLLM will load it (default runai_streamer_sharded)",
    )
    _s3_flags(p)

    # -- verify ---------------------------------------------------------------------------
    p = sub.add_parser(
        "verify",
        help="check a published checkpoint against its manifest (and its source)",
        description="Download every object of a published checkpoint, compare sizes and "
        "sha256 with preshard-manifest.json, print a summary; non-zero on any problem. "
        "With --against SOURCE: the engine-free check instead: the sharding is re-planned "
        "from the source with the installed vLLM's weight loaders (no engine), a stored "
        "preshard-sharding.json that differs is refused, and every tensor of every rank is "
        "rebuilt from the source and compared bit for bit (exit 3 naming the first tensor, "
        "rank and element that differ).",
    )
    p.add_argument(
        "uri", help="s3://bucket/prefix/ of a published checkpoint (with --against: or a directory)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--against",
        metavar="SOURCE",
        default=None,
        help="the source it was converted from: any source convert accepts "
        "(s3://, pvc://, hf://org/name[@rev] or a directory)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="with --against: where remote files are downloaded (default: a temporary dir, removed)",
    )
    p.add_argument(
        "--allow-derived",
        action="store_true",
        help="with --against: pass tensors vLLM's loaders computed rather than copied "
        "(listed; only an engine can check them)",
    )
    _s3_flags(p)

    # -- purge ----------------------------------------------------------------------------
    p = sub.add_parser(
        "purge",
        help="delete a checkpoint (manifest first), as deletionPolicy: Delete does",
        description="Delete preshard-manifest.json first, then the objects it lists (and those "
        "an unfinished publication recorded in preshard-publish.json), and abort their "
        "unfinished multipart uploads. Nothing else under the prefix is touched. Refuses when "
        "the manifest names another owner than --owner or cannot be read, or when another "
        "owner's checkpoint lies below the prefix; a prefix with nothing left succeeds.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ to delete")
    p.add_argument(
        "--owner",
        default=os.environ.get("PRESHARD_OWNER"),
        help="refuse unless the manifest (if any) names this owner (env PRESHARD_OWNER)",
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
    p.add_argument(
        "--model-config",
        default=None,
        help="the model's config.json: a Job without an accelerator (accelerator: cpu, "
        "engine: none) then requests the memory of the operator's estimate, as it does "
        "after its preflight (without it, no requests.memory is shown)",
    )

    _step_parsers(sub)
    _plugin_commands(sub)
    return parser


def _owner_flag(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument("--owner", required=True, help=help_)


def _against_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("check against the requester's own source (verify --against)")
    g.add_argument(
        "--against",
        default=None,
        help="the requester's source (s3://, pvc://, hf:// or a directory): every tensor of "
        "the checkpoint must be rebuilt from it bit for bit before the manifest is written "
        "(read with this process's PRESHARD_SOURCE_* / HF_TOKEN credentials)",
    )
    g.add_argument(
        "--source-digest",
        default=None,
        help="the source content the preflight pinned (sha256:... or the hf:// commit): a "
        "source that differs fails with SourceChanged",
    )
    g.add_argument(
        "--source-endpoint-url",
        default=os.environ.get("PRESHARD_SOURCE_ENDPOINT_URL"),
        help="S3 endpoint of the source, if different (env PRESHARD_SOURCE_ENDPOINT_URL)",
    )


def _step_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """preflight, adopt, copy, withdraw: the CPU-only Jobs that run before (or instead
    of) a conversion. Findings and results go to the termination message."""
    p = sub.add_parser(
        "preflight",
        help="report what a conversion would start from, before any accelerator",
        description="Pin the source (S3: names, sizes, ETags; PVC/local: sha256; hf://: the "
        "commit), read config.json's size fields, report the vLLM version installed here and "
        "what the output prefix holds (its manifest's owner, identity and sha256; other "
        "checkpoints above or below it). Prints the findings as JSON; reads only.",
    )
    p.add_argument("--source", required=True, help="s3://, pvc://, hf:// or a local directory")
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ to convert into")
    _owner_flag(p, "the resource asking (namespace/name/uid); recorded nowhere")
    p.add_argument(
        "--quantization",
        default=None,
        help="probe this method's kernel with this machine's vLLM (the findings' kernels: "
        "{method: null | reason}); the operator passes it for accelerator: cpu",
    )
    p.add_argument(
        "--source-endpoint-url",
        default=os.environ.get("PRESHARD_SOURCE_ENDPOINT_URL"),
        help="S3 endpoint of the source, if different (env PRESHARD_SOURCE_ENDPOINT_URL)",
    )
    _s3_flags(p)

    p = sub.add_parser(
        "adopt",
        help="verify a published checkpoint and take over its ownership",
        description="Check every object's size and sha256 against the manifest (and with "
        "--against, every tensor against the requester's own source), then rewrite "
        "the manifest's owner, last and conditionally (If-Match, and a re-read right before "
        "the write). Refuses when the manifest names another owner or identity than expected.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ of the checkpoint")
    _owner_flag(p, "the new owner (namespace/name/uid)")
    p.add_argument("--expect-owner", default=None, help="the owner the manifest must name now")
    p.add_argument("--expect-identity", required=True, help="the identity it must record")
    p.add_argument("--expect-manifest-sha256", default=None, help="the manifest's sha256")
    _against_flags(p)
    _s3_flags(p)

    p = sub.add_parser(
        "copy",
        help="server-side copy of a published checkpoint to another prefix",
        description="Refuse another owner's checkpoint or unfinished publication at, below or "
        "above --to; write this owner's preshard-publish.json first; copy every object listed "
        "in the source manifest with S3 CopyObject (UploadPartCopy above "
        "--multipart-threshold), verify sizes and sha256 against the source manifest (and "
        "with --against, every tensor against the requester's own source: on a difference "
        "what the copy wrote is removed), and write a new manifest naming --owner last. "
        "Deletes only keys this owner's record lists. Uses this process's credentials for "
        "both prefixes.",
    )
    p.add_argument("--from", dest="source", required=True, help="s3:// prefix of the original")
    p.add_argument("--to", dest="dest", required=True, help="s3:// prefix to create")
    _owner_flag(p, "the owner of the copy (namespace/name/uid)")
    p.add_argument("--expect-identity", required=True, help="the identity the original records")
    p.add_argument("--expect-manifest-sha256", default=None, help="the original manifest's sha256")
    p.add_argument(
        "--multipart-threshold",
        type=int,
        default=5 * 2**30,
        help="objects larger than this many bytes are copied in parts (default 5 GiB)",
    )
    p.add_argument(
        "--part-size", type=int, default=512 * 2**20, help="part size of a multipart copy"
    )
    _against_flags(p)
    _s3_flags(p)

    p = sub.add_parser(
        "withdraw",
        help="delete a gone owner's manifest so a conversion can replace its checkpoint",
        description="Delete preshard-manifest.json when it still is exactly what the "
        "preflight saw (sha256); with --delete-listed also the objects it lists, else "
        "nothing else is touched.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/")
    _owner_flag(p, "the resource taking the prefix over (namespace/name/uid)")
    p.add_argument("--expect-owner", default=None, help="the gone owner the manifest names")
    p.add_argument("--expect-manifest-sha256", required=True, help="the manifest's sha256")
    p.add_argument(
        "--delete-listed",
        action="store_true",
        help="also delete the objects the manifest lists (the operator passes it only for a "
        "manifest it saw published; else the manifest alone is deleted)",
    )
    _s3_flags(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "fetch" and (args.node_rank is None) != (args.nodes is None):
        parser.error("fetch: --node-rank and --nodes go together")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Also under -v: the kubernetes client logs whole response bodies at DEBUG, Secrets
    # included, and botocore logs request headers; neither may reach a log.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kubernetes.client.rest"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run = getattr(args, _PLUGIN_RUN, None)
    if run is None:
        try:
            run = importlib.import_module(COMMANDS[args.command]).run
        except ModuleNotFoundError as exc:
            print(
                f"preshard: error: '{args.command}' is not available in this installation ({exc.name} is missing)",
                file=sys.stderr,
            )
            return EXIT_FAILED
    try:
        return int(run(args) or 0)
    except PreshardError as exc:
        print(f"preshard: error: {exc.message}", file=sys.stderr)
        return EXIT_PERMANENT if exc.permanent else EXIT_FAILED
    except KeyboardInterrupt:
        print("preshard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
