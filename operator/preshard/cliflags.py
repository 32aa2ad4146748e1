"""The flags several ``preshard`` subcommands share, and the parsers of the steps before a
conversion (preflight, adopt, copy, withdraw): declared for :mod:`preshard.cli`, which
builds the one parser (one place for ``--help`` and the README)."""

from __future__ import annotations

import argparse
import os


def s3_flags(p: argparse.ArgumentParser) -> None:
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


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return n


def non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return n


def sha256_pin(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(
            "must be 64 lowercase hex digits (status.artifact.manifestSha256)"
        )
    return value


def gate_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("serving gate (refuse before vLLM starts)")
    g.add_argument(
        "--manifest-sha256",
        type=sha256_pin,
        required=required,
        default=None,
        help="refuse unless the manifest's sha256 is this (the serving ConfigMap's "
        "MANIFEST_SHA256): a replaced shard with a rewritten manifest is caught",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive,
        required=required,
        default=None,
        help="the serving TP size: refuse unless it equals the checkpoint's"
        + ("" if required else "; also checks the state format (as 'preshard check')"),
    )
    g.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=positive,
        default=1 if required else None,
        help="the serving PP size: refuse unless it equals the checkpoint's (default 1)",
    )
    g.add_argument(
        "--serving-vllm-version",
        default=None,
        help="the serving container's vLLM version, when this runs in another image "
        "(default: the vLLM installed here, from package metadata)",
    )


def owner_flag(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument("--owner", required=True, help=help_)


def against_flags(p: argparse.ArgumentParser) -> None:
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


def step_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    owner_flag(p, "the resource asking (namespace/name/uid); recorded nowhere")
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
    s3_flags(p)

    p = sub.add_parser(
        "adopt",
        help="verify a published checkpoint and take over its ownership",
        description="Check every object's size and sha256 against the manifest (and with "
        "--against, every tensor against the requester's own source), then rewrite "
        "the manifest's owner, last and conditionally (If-Match, and a re-read right before "
        "the write). Refuses when the manifest names another owner or identity than expected.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/ of the checkpoint")
    owner_flag(p, "the new owner (namespace/name/uid)")
    p.add_argument("--expect-owner", default=None, help="the owner the manifest must name now")
    p.add_argument("--expect-identity", required=True, help="the identity it must record")
    p.add_argument("--expect-manifest-sha256", default=None, help="the manifest's sha256")
    against_flags(p)
    s3_flags(p)

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
    owner_flag(p, "the owner of the copy (namespace/name/uid)")
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
    against_flags(p)
    s3_flags(p)

    p = sub.add_parser(
        "withdraw",
        help="delete a gone owner's manifest so a conversion can replace its checkpoint",
        description="Delete preshard-manifest.json when it still is exactly what the "
        "preflight saw (sha256); with --delete-listed also the objects it lists, else "
        "nothing else is touched.",
    )
    p.add_argument("--output", required=True, help="s3://bucket/prefix/")
    owner_flag(p, "the resource taking the prefix over (namespace/name/uid)")
    p.add_argument("--expect-owner", default=None, help="the gone owner the manifest names")
    p.add_argument("--expect-manifest-sha256", required=True, help="the manifest's sha256")
    p.add_argument(
        "--delete-listed",
        action="store_true",
        help="also delete the objects the manifest lists (the operator passes it only for a "
        "manifest it saw published; else the manifest alone is deleted)",
    )
    s3_flags(p)
