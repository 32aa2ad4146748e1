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
from preshard.cliflags import gate_flags, non_negative, positive, s3_flags, step_parsers
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
    s3_flags(p)

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
        type=non_negative,
        default=None,
        help="only this global rank's shard files (plus config and tokenizer files)",
    )
    ranks.add_argument(
        "--node-rank",
        type=non_negative,
        default=None,
        help="multi-node serving: only the ranks vLLM runs on node K of --nodes M "
        "(vLLM's --node-rank; ranks K*W/M .. (K+1)*W/M-1 of W = TP x PP)",
    )
    p.add_argument("--nodes", type=positive, default=None, help="number of nodes (vLLM's --nnodes)")
    gate_flags(p, required=False)
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto")
    s3_flags(p)

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
    gate_flags(p, required=True)
    p.add_argument(
        "--load-format",
        choices=["runai_streamer_sharded", "sharded_state"],
        default="runai_streamer_sharded",
        help="how vLLM will load it (default runai_streamer_sharded)",
    )
    s3_flags(p)

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
    s3_flags(p)

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
    s3_flags(p)

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

    step_parsers(sub)
    _plugin_commands(sub)
    return parser


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
