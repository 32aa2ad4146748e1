"""``preshard render -f FILE``: print the Jobs the operator would create for a
ShardedCheckpoint, without a cluster.

It runs the operator's own code path on the file: the operator configuration from the
same ``PRESHARD_*`` variables and defaults (``preshard.runner.load_config``), the same
spec validation (``parse_spec`` and ``check_accelerator``) and the same builders
(``preshard.core.jobs``): the conversion Job and, for ``deletionPolicy: Delete``, the
purge Job that runs when the resource is deleted. The API server assigns the resource's
uid when it is created; until then the manifests carry ``--uid`` (default a placeholder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from preshard import GROUP, KIND
from preshard.core.config import OperatorConfig
from preshard.core.errors import PreshardError, SpecError
from preshard.core.jobs import accelerator, build_conversion_job, build_purge_job
from preshard.core.spec import check_accelerator, parse_spec

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


class _Dumper(yaml.SafeDumper):
    """No &anchors/*aliases for objects the builders share (labels): plain YAML to read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_resource(
    resource: dict[str, Any], config: OperatorConfig, *, uid: str, namespace: str
) -> list[dict[str, Any]]:
    """The Jobs of one ShardedCheckpoint (raises SpecError as the operator would report)."""
    meta = resource.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name is required")
    ns = meta.get("namespace") or namespace
    spec = parse_spec(dict(resource.get("spec") or {}))
    check_accelerator(spec, accelerator(spec, config))
    jobs = [build_conversion_job(name, ns, uid, spec, config)]
    if spec.deletion_policy == "Delete":
        jobs.append(build_purge_job(name, ns, uid, spec, config))
    return jobs


def load_resources(text: str, label: str) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{label} is not valid YAML: {exc}") from None
    found = [
        d
        for d in docs
        if isinstance(d, dict)
        and d.get("kind") == KIND
        and str(d.get("apiVersion", "")).startswith(f"{GROUP}/")
    ]
    if not found:
        raise SpecError(f"{label} has no {KIND} ({GROUP}) document")
    return found


def render(
    text: str,
    config: OperatorConfig,
    *,
    label: str = "the file",
    uid: str = PLACEHOLDER_UID,
    namespace: str = "default",
    out: TextIO | None = None,
) -> None:
    out = out if out is not None else sys.stdout
    first = True
    for resource in load_resources(text, label):
        for job in render_resource(resource, config, uid=uid, namespace=namespace):
            if not first:
                out.write("---\n")
            first = False
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
            raise PreshardError(
                f"cannot read {args.file}: {exc.strerror}", reason="InvalidInput", permanent=True
            ) from None
    render(text, config, label=label, uid=args.uid, namespace=args.namespace)
    return 0
