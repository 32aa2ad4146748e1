"""CPU-only worker commands that decide and reuse before any accelerator is requested:

* ``preshard preflight``: what the source is (pinned revision/digest, config.json
  fields), which vLLM the image has, and what the output prefix holds; findings in the
  termination message (``artifact`` with ``kind: preflight``, at most 4 KiB).
* ``preshard adopt``: verify every object of a published checkpoint (size and sha256
  against its manifest), then rewrite the manifest's owner, last and conditionally.
* ``preshard copy``: server-side copy of a published checkpoint to another prefix
  (CopyObject; UploadPartCopy for large objects), verified, with a new manifest last.
* ``preshard withdraw``: delete a gone owner's manifest (conditionally) so a conversion
  can replace its checkpoint, as a re-run withdraws its own.

Conditional writes: the manifest is replaced with ``If-Match: <ETag read>`` (S3, moto
and MinIO reject a changed object with 412), and because some servers ignore the header
(``rclone serve s3`` does), the manifest is also re-read and compared right before the
write. Residual race on servers that ignore If-Match: a writer that replaces the
manifest between that re-read and our PUT (milliseconds) is overwritten; both writers
must then be preshard resources racing for one prefix, which the operator's claim index
already serialises within a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import botocore.exceptions

from preshard.core.contract import JOURNAL_NAME, utc_timestamp
from preshard.core.decide import EMPTY, INCOMPLETE, INVALID, MANIFEST, PREFLIGHT_KIND
from preshard.core.errors import PreshardError
from preshard.core.identity import files_digest
from preshard.core.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    artifact_status,
)
from preshard.core.progress import TERMINATION_MESSAGE_LIMIT, Result
from preshard.core.uris import StorageURI, parse_output_uri, parse_uri
from preshard.worker.engine.installed import vllm_version
from preshard.worker.progress import write_result
from preshard.worker.store import records, s3
from preshard.worker.store.transfer import with_retries

log = logging.getLogger(__name__)

# config.json fields later checks (memory estimate) need; nothing else is reported.
CONFIG_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "torch_dtype",
    "tie_word_embeddings",
)
MAX_OVERLAPS = 3
COPY_MULTIPART_THRESHOLD = 5 * 2**30  # S3's CopyObject limit
COPY_PART_SIZE = 512 * 2**20


def run(args: argparse.Namespace) -> int:
    commands = {"preflight": preflight, "adopt": adopt, "copy": copy, "withdraw": withdraw}
    fn = commands[args.command]
    try:
        artifact = fn(args)
    except PreshardError as exc:
        write_result(Result(result="Failed", reason=exc.reason, message=exc.message))
        raise
    write_result(Result(result="Succeeded", artifact=artifact))
    print(json.dumps(artifact, indent=2, sort_keys=True))
    return 0


def _client(args: argparse.Namespace) -> Any:
    return s3.make_client(s3.output_settings(args.endpoint_url, args.region, args.concurrency))


def _s3(uri: str, what: str) -> StorageURI:
    u = parse_uri(uri)
    if u.scheme != "s3":
        raise PreshardError(f"{what} {uri} is not an s3:// prefix", reason="Usage", permanent=True)
    return u


# ------------------------------------------------------------------------- preflight


def config_fields(config: Any) -> dict[str, Any]:
    """The small subset of config.json the operator needs (text_config for multimodal)."""
    if not isinstance(config, dict):
        return {}
    base = dict(config)
    text = config.get("text_config")
    if isinstance(text, dict):
        base = {**text, **{k: v for k, v in config.items() if k == "architectures"}}
    out: dict[str, Any] = {}
    for k in CONFIG_FIELDS:
        v = base.get(k, config.get(k))
        if isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 64):
            out[k] = v
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = [x[:64] for x in v[:4]]
    q = config.get("quantization_config")
    if isinstance(q, dict) and isinstance(q.get("quant_method"), str):
        out["quantization_config"] = {"quant_method": q["quant_method"][:64]}
        # what the kernel probe needs to pick the checkpoint's kernel (block FP8 or not)
        block = q.get("weight_block_size")
        if isinstance(block, list) and len(block) == 2 and all(type(x) is int for x in block):
            out["quantization_config"]["weight_block_size"] = block
        if isinstance(q.get("activation_scheme"), str):
            out["quantization_config"]["activation_scheme"] = q["activation_scheme"][:16]
    return out


def _source_pin(uri: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(source findings, config fields)."""
    u = parse_uri(uri, allow_local=True)
    if u.scheme == "s3":
        return _s3_source(u, args)
    if u.scheme == "hf":
        return _hf_source(u)
    from preshard.worker.store.source_files import local_source_dir

    # The same link check as convert and publish: never a file outside the source.
    path = local_source_dir(u, uri)
    if not path.is_dir():
        raise PreshardError(
            f"source {uri} does not exist (no directory {path})",
            reason="SourceNotFound",
            permanent=True,
        )
    from preshard.worker.store.source_files import local_entries

    entries = local_entries(path)
    config = _json_file(path / "config.json", uri)
    return _source_record(uri, None, entries), config


def _json_file(path: Path, uri: str) -> dict[str, Any]:
    try:
        return config_fields(json.loads(path.read_text()))
    except FileNotFoundError:
        raise PreshardError(
            f"source {uri} has no config.json: not a Hugging Face-format model directory",
            reason="InvalidSource",
            permanent=True,
        ) from None
    except ValueError:
        raise PreshardError(
            f"source {uri}: config.json is not valid JSON", reason="InvalidSource", permanent=True
        ) from None


def _source_record(
    uri: str, revision: str | None, entries: list[tuple[str, int, str]]
) -> dict[str, Any]:
    if not any(n.endswith(".safetensors") for n, _, _ in entries):
        raise PreshardError(
            f"source {uri} has no *.safetensors weights", reason="InvalidSource", permanent=True
        )
    return {
        "uri": uri,
        "revision": revision,
        "digest": revision if revision and not entries else files_digest(entries),
        "files": len(entries),
        "bytes": sum(s for _, s, _ in entries),
    }


def _s3_source(u: StorageURI, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    settings = s3.source_settings(args.source_endpoint_url, None, 4)
    client = s3.make_client(settings)
    uri = str(u)
    from preshard.worker.store.source_files import list_source

    entries = list_source(client, u, uri)
    try:
        raw = records.read_bounded(client, u.bucket, u.key("config.json"), MAX_MANIFEST_BYTES)
    except ManifestError as exc:
        raise PreshardError(
            f"source {uri}: config.json is too large ({exc})",
            reason="InvalidSource",
            permanent=True,
        ) from None
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            raise PreshardError(
                f"source {uri} has no config.json: not a Hugging Face-format model directory",
                reason="InvalidSource",
                permanent=True,
            ) from None
        raise s3.translate(exc, uri, "read the source") from None
    try:
        config = config_fields(json.loads(raw))
    except ValueError:
        raise PreshardError(
            f"source {uri}: config.json is not valid JSON", reason="InvalidSource", permanent=True
        ) from None
    return _source_record(uri, None, entries), config


def _hf_source(u: StorageURI) -> tuple[dict[str, Any], dict[str, Any]]:
    from huggingface_hub import HfApi, hf_hub_download

    from preshard.worker.store.hf import hf_error, quiet_hf_client

    quiet_hf_client()
    token = os.environ.get("HF_TOKEN") or None
    uri = str(u)
    try:
        info = HfApi().model_info(u.authority, revision=u.revision, token=token)
        if not info.sha:
            raise PreshardError(
                f"the Hugging Face Hub returned no commit for {uri}", reason="StorageUnavailable"
            )
        # a fresh folder: never a config.json an earlier download left (another repo)
        work = Path(os.environ.get("PRESHARD_WORK_DIR") or "/tmp") / "preflight" / info.sha
        shutil.rmtree(work, ignore_errors=True)
        path = hf_hub_download(
            u.authority, "config.json", revision=info.sha, token=token, local_dir=str(work)
        )
    except PreshardError:
        raise
    except Exception as exc:
        err = hf_error(exc, uri, u.revision, has_token=token is not None)
        if err is None:
            raise
        raise err from None
    names = [s.rfilename for s in info.siblings or []]
    if not any(n.endswith(".safetensors") and "/" not in n for n in names):
        raise PreshardError(
            f"source {uri} has no *.safetensors weights", reason="InvalidSource", permanent=True
        )
    record = {"uri": uri, "revision": info.sha, "digest": info.sha, "files": len(names)}
    return record, _json_file(Path(path), uri)


def output_state(client: Any, out: StorageURI) -> dict[str, Any]:
    """What the output prefix holds: no objects, objects but no manifest, a manifest
    (owner, identity, sha256, ETag, whether every listed object exists with its size),
    and manifests of other checkpoints above or below it."""
    uri = str(out)
    s3.check_bucket(client, out.bucket, uri)
    objects = s3.with_translation(
        lambda: s3.list_objects(client, out.bucket, out.prefix), uri, "list"
    )
    manifest_key = out.key(MANIFEST_NAME)
    own = {manifest_key, out.key(JOURNAL_NAME)}
    overlaps: list[dict[str, Any]] = []
    # another checkpoint, or another owner's unfinished publication (its record), below
    # or above the prefix: a step here could delete or shadow its objects
    for key in sorted(objects):
        if key in own:
            continue
        if key.endswith("/" + MANIFEST_NAME):
            overlaps.append({"key": key, "relation": "nested"})
        elif key.endswith("/" + JOURNAL_NAME):
            overlaps.append({"key": key, "relation": "nested", "kind": "publication"})
    parts = out.prefix.rstrip("/").split("/")
    for i in range(len(parts) - 1, -1, -1):
        for name in (MANIFEST_NAME, JOURNAL_NAME):
            key = "/".join([*parts[:i], name])
            if _exists(client, out.bucket, key, uri):
                o: dict[str, Any] = {"key": key, "relation": "parent"}
                if name == JOURNAL_NAME:
                    o["kind"] = "publication"
                overlaps.append(o)
    for o in overlaps[:MAX_OVERLAPS]:
        if o.get("kind") == "publication":
            rec = records.read_journal(client, out.bucket, o["key"], uri)
            o["owner"] = rec.owner if isinstance(rec, records.Journal) else None
            continue
        got = _manifest_at(client, out.bucket, o["key"], uri)
        o["owner"] = got[0].owner if got and got[0] else None
    state: dict[str, Any] = {
        "state": EMPTY if not objects else INCOMPLETE,
        "objects": len(objects),
        "overlapping": overlaps[:MAX_OVERLAPS],
    }
    if manifest_key not in objects:
        return state
    got = _manifest_at(client, out.bucket, manifest_key, uri)
    if got is None:
        return state  # deleted meanwhile
    man, body, etag = got
    if man is None:
        state["state"] = INVALID
        return state
    complete = all(objects.get(out.key(f.key)) == f.size for f in man.files)
    state["state"] = MANIFEST
    state["manifest"] = {
        "owner": man.owner,
        "identity": man.identity,
        "sha256": hashlib.sha256(body).hexdigest(),
        "etag": etag,
        "complete": complete,
        "formatVersion": man.format_version,
    }
    return state


def _exists(client: Any, bucket: str, key: str, uri: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as exc:
        if s3.is_not_found(exc):
            return False
        raise s3.translate(exc, uri, "read") from None


# The one manifest reader (bounded, retried): records'.
_manifest_at = records.read_manifest_tagged


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    source, config = _source_pin(args.source, args)
    out = parse_output_uri(args.output)
    findings = {
        "kind": PREFLIGHT_KIND,
        "source": source,
        "config": config,
        "vllmVersion": vllm_version(),
        "output": output_state(_client(args), out),
    }
    kernels = probe_kernels(getattr(args, "quantization", None), config)
    if kernels is not None:
        findings["kernels"] = kernels
    return fit_findings(findings)


def probe_kernels(
    quantization: str | None, config: dict[str, Any] | None
) -> dict[str, str | None] | None:
    """``{method: None | reason}``: whether this machine's vLLM has a kernel for the
    spec's quantization (``worker.engine.kernels``), for the gate; None when there is no method
    or no vLLM here to ask (the gate falls back to its static list)."""
    import importlib.util

    from preshard.worker.engine import kernels

    if not quantization or importlib.util.find_spec("vllm") is None:
        return None
    qc = (config or {}).get("quantization_config")
    declared = qc.get("quant_method") if isinstance(qc, dict) else None
    # a checkpoint method is probed with the checkpoint's own config (block size,
    # activation scheme; config_fields keeps them), an online shorthand as such
    same = isinstance(declared, str) and declared.lower() == quantization.lower()
    return {quantization: kernels.probe_quantization(quantization, qc if same else None)}


def fit_findings(findings: dict[str, Any]) -> dict[str, Any]:
    """Keep the result within the termination message limit: drop what is optional."""

    def size() -> int:
        return len(Result(result="Succeeded", artifact=findings).to_message().encode())

    for drop in (("config",), ("output", "overlapping")):
        if size() <= TERMINATION_MESSAGE_LIMIT:
            break
        target = findings
        for k in drop[:-1]:
            target = target[k]
        if drop[-1] == "overlapping":
            # keep one: it alone decides the refusal
            target[drop[-1]] = target.get(drop[-1], [])[:1]
        else:
            target[drop[-1]] = {}
    return findings


# ------------------------------------------------------------------------------ adopt


def _read_expected(
    client: Any,
    u: StorageURI,
    expect_owner: str | None,
    expect_identity: str | None,
    expect_sha: str | None,
    *,
    check_owner: bool = True,
) -> tuple[Manifest, bytes, str | None]:
    uri = str(u)
    got = _manifest_at(client, u.bucket, u.key(MANIFEST_NAME), uri)
    if got is None:
        raise PreshardError(
            f"{uri} has no {MANIFEST_NAME} any more", reason="OutputChanged", permanent=True
        )
    man, body, etag = got
    if man is None:
        raise PreshardError(
            f"{uri}{MANIFEST_NAME} is not a valid manifest",
            reason="InvalidManifest",
            permanent=True,
        )
    sha = hashlib.sha256(body).hexdigest()
    if expect_sha and sha != expect_sha:
        raise PreshardError(
            f"the manifest of {uri} changed since the preflight",
            reason="OutputChanged",
            permanent=True,
        )
    if check_owner and (man.owner or None) != (expect_owner or None):
        raise PreshardError(
            f"the manifest of {uri} names another owner than expected",
            reason="OutputChanged",
            permanent=True,
        )
    if expect_identity is not None and man.identity != expect_identity:
        raise PreshardError(
            f"the checkpoint at {uri} has identity {man.identity}, not {expect_identity}",
            reason="IdentityMismatch",
            permanent=True,
        )
    return man, body, etag


def verify_objects(client: Any, u: StorageURI, man: Manifest, concurrency: int = 8) -> list[str]:
    """Every listed object's size and sha256 (read back in full); the problems."""
    from preshard.worker.commands import check_object

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, 8))) as pool:
        checks = list(
            pool.map(lambda f: check_object(client, u, f.key, f.size, f.sha256), man.files)
        )
    return [f"{c.key}: {c.problem}" for c in checks if not c.ok]


def check_against_source(
    client: Any, u: StorageURI, man: Manifest, args: argparse.Namespace
) -> dict[str, Any] | None:
    """The checkpoint at ``u`` (its manifest's objects, sha256-checked on the way down)
    against the REQUESTER's own source (``--against``, read with this pod's source
    credentials, exactly the ``--source-digest`` content): every tensor of every rank
    rebuilt from that source bit for bit (``verify --against``, no engine). Raises
    VerificationFailed (permanent) on the first difference; None without --against."""
    against = getattr(args, "against", None)
    if not against:
        return None
    from preshard.worker.store import fetch
    from preshard.worker.store.download import Downloader, DownloadItem
    from preshard.worker.verify_against import verify_against

    work = Path(os.environ.get("PRESHARD_WORK_DIR") or "/tmp") / "check"
    shutil.rmtree(work, ignore_errors=True)
    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True)
    items = [DownloadItem(u.key(f.key), ckpt / f.key, f.size, f.sha256) for f in man.files]
    s3.with_translation(
        lambda: Downloader(
            client, u.bucket, concurrency=max(1, args.concurrency), uri=str(u)
        ).download(items),
        str(u),
        "download",
    )
    (ckpt / MANIFEST_NAME).write_text(man.to_json())
    try:
        source_dir = fetch.fetch_source(
            against,
            work / "source",
            endpoint_url=getattr(args, "source_endpoint_url", None),
            concurrency=max(1, args.concurrency),
            pin=getattr(args, "source_digest", None),
        )
        report = verify_against(Path(source_dir), ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checked against this resource's own source: {report.describe()}", file=sys.stderr)
    summary: dict[str, Any] = report.summary()
    return summary


def adopt(args: argparse.Namespace) -> dict[str, Any]:
    u = _s3(args.output, "--output")
    client = _client(args)
    uri = str(u)
    man, body, etag = _read_expected(
        client, u, args.expect_owner, args.expect_identity, args.expect_manifest_sha256
    )
    problems = verify_objects(client, u, man, args.concurrency)
    if problems:
        raise PreshardError(
            f"{len(problems)} of {len(man.files)} objects in {uri} do not match the manifest "
            f"(first: {problems[0]}); not adopted",
            reason="VerificationFailed",
            permanent=True,
        )
    # the bytes must also be what THIS resource's source converts to (a checkpoint
    # published from other content under this identity is never taken over)
    check_against_source(client, u, man, args)
    new = dataclasses.replace(man, owner=args.owner)
    text = new.to_json()
    if new.owner != man.owner:
        records.put_manifest(client, u, text, conditional=True, expect_body=body, expect_etag=etag)
    else:
        text = body.decode()
    print(
        f"adopted {uri}: {len(man.files)} objects verified, owner {man.owner} -> {args.owner}",
        file=sys.stderr,
    )
    return artifact_status(new, uri, text)


# ------------------------------------------------------------------------------- copy


def _copy_object(
    client: Any, src: StorageURI, dst: StorageURI, key: str, size: int, threshold: int, part: int
) -> None:
    source = {"Bucket": src.bucket, "Key": src.key(key)}
    if size <= threshold:
        with_retries(
            lambda: client.copy_object(
                Bucket=dst.bucket, Key=dst.key(key), CopySource=source, MetadataDirective="COPY"
            ),
            f"copy {key}",
        )
        return
    up = client.create_multipart_upload(Bucket=dst.bucket, Key=dst.key(key))
    upload_id = up["UploadId"]
    try:
        parts = []
        for n, start in enumerate(range(0, size, part), start=1):
            end = min(size, start + part) - 1

            def part_copy(n: int = n, start: int = start, end: int = end) -> Any:
                return client.upload_part_copy(
                    Bucket=dst.bucket,
                    Key=dst.key(key),
                    UploadId=upload_id,
                    PartNumber=n,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                )

            resp = with_retries(part_copy, f"copy {key} part {n}")
            etag = (resp.get("CopyPartResult") or {}).get("ETag")
            if not etag:
                raise PreshardError(
                    f"the S3 server does not support UploadPartCopy (needed for {key}, "
                    f"{size} bytes)",
                    reason="CopyNotSupported",
                    permanent=True,
                )
            parts.append({"PartNumber": n, "ETag": etag})
        client.complete_multipart_upload(
            Bucket=dst.bucket,
            Key=dst.key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=dst.bucket, Key=dst.key(key), UploadId=upload_id)
        except Exception as exc:  # best effort: the purge aborts leftovers too
            log.warning("could not abort the multipart copy of %s: %s", key, exc)
        raise


def copy(args: argparse.Namespace) -> dict[str, Any]:
    """Copy a Ready checkpoint to ``--to`` under the publication rules
    (:mod:`preshard.worker.store.records`): refuse another owner's manifest or unfinished
    publication at, below or above the destination; write this owner's publication record
    first (every key the copy may leave behind); check the copy against the manifest and
    against this resource's own source (``--against``) BEFORE the manifest; delete only
    keys this owner wrote (never a listing of the prefix); the manifest last."""
    src = _s3(args.source, "--from")
    dst = _s3(args.dest, "--to")
    if src.bucket == dst.bucket and (
        src.prefix.startswith(dst.prefix) or dst.prefix.startswith(src.prefix)
    ):
        raise PreshardError("--from and --to overlap", reason="Usage", permanent=True)
    client = _client(args)
    # the source stays its owner's: any owner, the identity and bytes must match
    man, body, _ = _read_expected(
        client, src, None, args.expect_identity, args.expect_manifest_sha256, check_owner=False
    )
    dst_uri = str(dst)
    s3.check_bucket(client, dst.bucket, dst_uri)
    if _manifest_at(client, dst.bucket, dst.key(MANIFEST_NAME), dst_uri) is not None:
        raise PreshardError(
            f"{dst_uri} already holds a manifest; not copied",
            reason="OutputChanged",
            permanent=True,
        )
    journal = records.read_journal(client, dst.bucket, dst.key(JOURNAL_NAME), dst_uri)
    records.check_own(journal, args.owner, dst_uri, "copy to")
    listing = s3.with_translation(
        lambda: s3.list_objects(client, dst.bucket, dst.prefix), dst_uri, "list"
    )
    records.check_neighbours(client, dst, listing, args.owner, "copy to")
    previous = set(journal.keys) if isinstance(journal, records.Journal) else set()
    new_keys = {f.key for f in man.files}
    # the record first: whatever this copy leaves behind is recorded as this owner's
    records.put_journal(client, dst, records.Journal(args.owner, frozenset(previous | new_keys)))
    threshold = int(args.multipart_threshold)
    part = max(5 * 2**20, int(args.part_size))

    def one(f: Any) -> None:
        s3.with_translation(
            lambda: _copy_object(client, src, dst, f.key, f.size, threshold, part),
            f"{src} -> {dst_uri}",
            "copy",
        )

    with ThreadPoolExecutor(max_workers=max(1, min(args.concurrency, 8))) as pool:
        list(pool.map(one, man.files))
    problems = verify_objects(client, dst, man, args.concurrency)
    if problems:
        raise PreshardError(
            f"{len(problems)} copied objects in {dst_uri} do not match the source manifest "
            f"(first: {problems[0]})",
            reason="VerificationFailed",
            permanent=False,
        )
    try:
        checked = check_against_source(client, dst, man, args)
    except PreshardError:
        # not this resource's content: remove what this copy wrote (its record lists it)
        mine = sorted(dst.key(k) for k in previous | new_keys)
        records.delete_keys(client, dst.bucket, mine, dst_uri)
        records.delete_one(client, dst, JOURNAL_NAME, "delete journal")
        raise
    # stale objects of this owner's earlier, incomplete copy (its record): nothing else
    stale = sorted(dst.key(k) for k in previous - new_keys if dst.key(k) in listing)
    records.delete_keys(client, dst.bucket, stale, dst_uri)
    origin = {"uri": str(src), "manifestSha256": hashlib.sha256(body).hexdigest()}
    new = dataclasses.replace(
        man, owner=args.owner, created_at=utc_timestamp(), extra={**man.extra, "copiedFrom": origin}
    )
    text = new.to_json()
    records.put_manifest(client, dst, text, conditional=True, expect_body=None)
    records.delete_one(client, dst, JOURNAL_NAME, "delete journal")
    print(f"copied {len(man.files)} objects from {src} to {dst_uri}, verified", file=sys.stderr)
    out = artifact_status(new, dst_uri, text) | {"origin": origin}
    if checked is not None:
        out["checkedAgainstSource"] = True
    return out


# --------------------------------------------------------------------------- withdraw


def withdraw(args: argparse.Namespace) -> dict[str, Any]:
    u = _s3(args.output, "--output")
    client = _client(args)
    uri = str(u)
    key = u.key(MANIFEST_NAME)
    got = _manifest_at(client, u.bucket, key, uri)
    if got is None:
        return {"uri": uri, "withdrawn": False}
    body = got[1]
    if hashlib.sha256(body).hexdigest() != args.expect_manifest_sha256:
        raise PreshardError(
            f"the manifest of {uri} changed since the preflight; nothing was withdrawn",
            reason="OutputChanged",
            permanent=True,
        )
    s3.with_translation(
        lambda: with_retries(
            lambda: client.delete_object(Bucket=u.bucket, Key=key), "withdraw manifest"
        ),
        uri,
    )
    # --delete-listed (the operator saw exactly this manifest published by its owner:
    # its ledger): the gone owner's checkpoint is dead without its manifest, remove the
    # objects it listed (only those), so that the conversion replacing it leaves no stale
    # shard of another layout behind. Without it (a manifest nobody can vouch for, which
    # could list anybody's objects): the manifest alone.
    listed: list[str] = []
    if getattr(args, "delete_listed", False):
        try:
            listed = [u.key(f.key) for f in Manifest.from_json(body).files]
        except ManifestError:
            listed = []
    removed = records.delete_keys(client, u.bucket, listed, uri) if listed else 0
    print(
        f"withdrew the manifest of {uri} (owner {args.expect_owner})"
        + (f" and the {removed} objects it listed" if listed else "; no other object touched"),
        file=sys.stderr,
    )
    return {"uri": uri, "withdrawn": True, "removed": removed}
