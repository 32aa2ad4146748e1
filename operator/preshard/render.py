"""``preshard render -f FILE``: print the Jobs the operator would create for a
ShardedCheckpoint, without a cluster.

It runs the operator's own code path on the file: the operator configuration from the
same ``PRESHARD_*`` variables and defaults (``preshard.runner.load_config``), the same
spec validation (``parse_spec`` and ``check_accelerator``) and the same builders
(``preshard.core.children``): the conversion Job and, for ``deletionPolicy: Delete``, the
purge Job that runs when the resource is deleted. The API server assigns the resource's
uid when it is created; until then the manifests carry ``--uid`` (default a placeholder).

A conversion without an accelerator (``accelerator: cpu`` or ``engine: none``) requests
the memory of the preflight's estimate, which the operator computes from the model's
config.json: ``--model-config config.json`` computes it the same way
(``preshard.core.estimate``); without it the Job is shown without ``requests.memory``
and a comment says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from preshard import GROUP, KIND
from preshard.core.children.conversion import build_conversion_job
from preshard.core.children.pod import accelerator
from preshard.core.children.purge import build_purge_job
from preshard.core.config import OperatorConfig
from preshard.core.errors import InvalidInput, InvalidSpec
from preshard.core.spec import CheckpointSpec, check_accelerator, parse_spec

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


class _Dumper(yaml.SafeDumper):
    """No &anchors/*aliases for objects the builders share (labels): plain YAML to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_resource(
    resource: dict[str, Any],
    config: OperatorConfig,
    *,
    uid: str,
    namespace: str,
    model_config: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The Jobs of one ShardedCheckpoint (raises SpecError as the operator would report).
    ``model_config``: the model's config.json, for the memory estimate the preflight
    would make (``status.memoryEstimate``)."""
    meta = resource.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidSpec("metadata.name is required")
    ns = meta.get("namespace") or namespace
    spec = parse_spec(dict(resource.get("spec") or {}))
    check_accelerator(spec, accelerator(spec, config))
    estimate = memory_estimate(spec, config, model_config) if model_config else None
    jobs = [build_conversion_job(name, ns, uid, spec, config, memory_estimate=estimate)]
    if spec.deletion_policy == "Delete":
        jobs.append(build_purge_job(name, ns, uid, spec, config))
    return jobs


def memory_estimate(
    spec: CheckpointSpec, config: OperatorConfig, model_config: dict[str, Any]
) -> dict[str, Any] | None:
    """``status.memoryEstimate`` as the operator's preflight computes it (core.steps)."""
    from preshard.core.estimate import EstimateUnavailable, estimate_memory

    try:
        est = estimate_memory(
            model_config,
            tensor_parallel_size=spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size,
            dtype=spec.dtype,
            quantization=spec.quantization,
            max_file_size=spec.output.max_file_size_bytes,
            accelerator=accelerator(spec, config),
        )
    except EstimateUnavailable as exc:
        raise InvalidSpec(f"--model-config: no memory estimate: {exc}") from None
    return est.to_status()


def load_resources(text: str, label: str) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"{label} is not valid YAML: {exc}") from None
    found = [
        d
        for d in docs
        if isinstance(d, dict)
        and d.get("kind") == KIND
        and str(d.get("apiVersion", "")).startswith(f"{GROUP}/")
    ]
    if not found:
        raise InvalidSpec(f"{label} has no {KIND} ({GROUP}) document")
    return found


def render(
    text: str,
    config: OperatorConfig,
    *,
    label: str = "the file",
    uid: str = PLACEHOLDER_UID,
    namespace: str = "default",
    out: TextIO | None = None,
    model_config: dict[str, Any] | None = None,
) -> None:
    out = out if out is not None else sys.stdout
    first = True
    for resource in load_resources(text, label):
        jobs = render_resource(
            resource, config, uid=uid, namespace=namespace, model_config=model_config
        )
        for job in jobs:
            if not first:
                out.write("---\n")
            first = False
            container = job["spec"]["template"]["spec"]["containers"][0]
            resources = container["resources"]
            if (
                job is jobs[0]
                and not model_config
                and any(e["name"] == "PRESHARD_ACCELERATOR" for e in container["env"])
                and "memory" not in resources.get("requests", {})
                and "memory" not in resources.get("limits", {})
            ):
                out.write(
                    "# requests.memory: the operator adds the preflight's estimate from the "
                    "model's config.json\n# (status.memoryEstimate); pass --model-config "
                    "config.json to see it here\n"
                )
            out.write(yaml.dump(job, Dumper=_Dumper, sort_keys=False, default_flow_style=False))


def run(args: argparse.Namespace) -> int:
    from preshard.runner import load_config

    # the operator's configuration exactly as `preshard operator` reads it (flags absent)
    config = load_config(
        argparse.Namespace(namespace=None, all_namespaces=False, metrics_port=None, liveness=None)
    )
    if args.file == "-":
        text, label = sys.stdin.read(), "stdin"
    else:
        try:
            text, label = Path(args.file).read_text(), args.file
        except OSError as exc:
            raise InvalidInput(f"cannot read {args.file}: {exc.strerror}") from None
    model_config = None
    if getattr(args, "model_config", None):
        import json

        try:
            model_config = json.loads(Path(args.model_config).read_text())
        except OSError as exc:
            raise InvalidInput(
                f"cannot read {args.model_config}: {exc.strerror}",
            ) from None
        except ValueError:
            raise InvalidInput(f"{args.model_config} is not valid JSON") from None
        if not isinstance(model_config, dict):
            raise InvalidInput(
                f"{args.model_config} is not a config.json object",
            )
    render(
        text,
        config,
        label=label,
        uid=args.uid,
        namespace=args.namespace,
        model_config=model_config,
    )
    return 0
