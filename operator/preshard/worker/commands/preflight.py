"""``preshard preflight``: what a conversion would start from, before any accelerator:
the source pinned (S3: names, sizes, ETags; PVC/local: sha256; hf://: the commit),
config.json's size fields, the vLLM installed here (and, asked, a quantization's kernel
on this machine), and what the output prefix holds; findings in the termination message
(``artifact`` with ``kind: preflight``, at most 4 KiB). Reads only."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from preshard.core.contract import PUBLICATION_RECORD_NAME as JOURNAL_NAME
from preshard.core.errors import InvalidSource, PreshardError, SourceNotFound, StorageUnavailable
from preshard.core.identity import files_digest
from preshard.core.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ManifestError,
)
from preshard.core.preflight import EMPTY, INCOMPLETE, INVALID, MANIFEST, PREFLIGHT_KIND
from preshard.core.progress import TERMINATION_MESSAGE_LIMIT, Result
from preshard.core.uris import StorageURI, parse_output_uri, parse_uri
from preshard.worker.commands.runner import Done
from preshard.worker.commands.steps import (
    manifest_at,
    step_client,
    succeeded,
)
from preshard.worker.engine.installed import vllm_version
from preshard.worker.store import records, s3

log = logging.getLogger(__name__)

# The operator runs it as a Job and reads its outcome from the termination message.
WRITES_RESULT = True


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
        raise SourceNotFound(
            f"source {uri} does not exist (no directory {path})",
        )
    from preshard.worker.store.source_files import local_entries

    entries = local_entries(path)
    config = _json_file(path / "config.json", uri)
    return _source_record(uri, None, entries), config


def _json_file(path: Path, uri: str) -> dict[str, Any]:
    try:
        return config_fields(json.loads(path.read_text()))
    except FileNotFoundError:
        raise InvalidSource(
            f"source {uri} has no config.json: not a Hugging Face-format model directory",
        ) from None
    except ValueError:
        raise InvalidSource(f"source {uri}: config.json is not valid JSON") from None


def _source_record(
    uri: str, revision: str | None, entries: list[tuple[str, int, str]]
) -> dict[str, Any]:
    if not any(n.endswith(".safetensors") for n, _, _ in entries):
        raise InvalidSource(f"source {uri} has no *.safetensors weights")
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
        raise InvalidSource(
            f"source {uri}: config.json is too large ({exc})",
        ) from None
    except s3.ClientError as exc:
        if s3.is_not_found(exc):
            raise InvalidSource(
                f"source {uri} has no config.json: not a Hugging Face-format model directory",
            ) from None
        raise s3.translate(exc, uri, "read the source") from None
    try:
        config = config_fields(json.loads(raw))
    except ValueError:
        raise InvalidSource(f"source {uri}: config.json is not valid JSON") from None
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
            raise StorageUnavailable(f"the Hugging Face Hub returned no commit for {uri}")
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
        raise InvalidSource(f"source {uri} has no *.safetensors weights")
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
        got = manifest_at(client, out.bucket, o["key"], uri)
        o["owner"] = got[0].owner if got and got[0] else None
    state: dict[str, Any] = {
        "state": EMPTY if not objects else INCOMPLETE,
        "objects": len(objects),
        "overlapping": overlaps[:MAX_OVERLAPS],
    }
    if manifest_key not in objects:
        return state
    got = manifest_at(client, out.bucket, manifest_key, uri)
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
    except s3.ClientError as exc:
        if s3.is_not_found(exc):
            return False
        raise s3.translate(exc, uri, "read") from None


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    source, config = _source_pin(args.source, args)
    out = parse_output_uri(args.output)
    findings = {
        "kind": PREFLIGHT_KIND,
        "source": source,
        "config": config,
        "vllmVersion": vllm_version(),
        "output": output_state(step_client(args), out),
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


def main(args: argparse.Namespace) -> Done:
    return succeeded(preflight(args))
