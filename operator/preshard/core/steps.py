"""The steps before a conversion (pure): which step comes after the preflight.

The steps are preflight -> adopt | copy | (withdraw ->) convert, or a refusal; the
``status.decision`` field of the CRD records the step in progress and ``status.path``
the step that produced a Ready checkpoint (the field names stay for stored objects).
The preflight Job (CPU only, the resource's own credentials, ``preshard preflight``)
reports what :mod:`preshard.core.preflight` parses. From that, the living owners the
operator found in the API and the Ready checkpoints of the cluster, :func:`next_step`
picks one step, before any Job requests an accelerator:

1. ``OutputOwnedByOther``: the prefix (or a prefix above or below it) holds a checkpoint
   whose recorded owner still exists and is not this resource: never touched.
   ``OutputOverlapsCheckpoint``: a checkpoint of another, gone owner lies above or below
   the prefix (converting would delete or shadow it): refused too, the user chooses.
2. ``Adopt``: the prefix holds a complete checkpoint with this identity, recorded by a
   gone owner that the operator saw publish exactly that manifest (its ledger,
   :mod:`preshard.service.ledger`), or by this resource: verify it against the manifest
   and against this resource's own source (``verify --against``, no accelerator), then
   take it over. A manifest the operator cannot prove (planted) is never adopted.
3. ``Copy``: another Ready checkpoint with this identity in this namespace, or in a
   namespace the admin's copy policy trusts (``converter.policy.copyTrust``), on the same
   endpoint: server-side copy with this resource's own credentials, checked against this
   resource's own source before its manifest is written.
4. ``CannotConvert`` (one place, :func:`conversion_refusal`): a check that stops a
   conversion with a Ready=False condition before any accelerator is requested.
5. ``Convert``: convert; a checkpoint of another identity whose owner is gone (or is this
   resource) is replaced safely: its manifest is withdrawn first (with the objects it
   lists only when the operator saw that manifest published; else the manifest alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from preshard.core.errors import SpecError
from preshard.core.estimate import preflight as estimate
from preshard.core.identity import conversion_identity, is_identity
from preshard.core.manifest import MANIFEST_NAME
from preshard.core.modelconfig import cpu_raw_reload_refusal, prequantized_method
from preshard.core.preflight import INVALID, Preflight
from preshard.core.quantization import kernel_refusal, online_method
from preshard.core.spec import CheckpointSpec
from preshard.core.status import READY, get_condition

Step = Literal[
    "OutputOwnedByOther", "OutputOverlapsCheckpoint", "InvalidPreflight", "CannotConvert",
    "Adopt", "Copy", "Convert",
]  # fmt: skip
REFUSALS = frozenset({"OutputOwnedByOther", "OutputOverlapsCheckpoint", "InvalidPreflight"})


@dataclass(frozen=True)
class ReadyCheckpoint:
    """A Ready checkpoint of the cluster (the operator's index by identity)."""

    ref: str  # namespace/name
    uid: str
    uri: str
    manifest_sha256: str
    endpoint: str | None

    @property
    def namespace(self) -> str:
        return self.ref.split("/", 1)[0]


def ready_checkpoint(
    namespace: str,
    name: str,
    spec: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    status: dict[str, Any] | None,
    default_endpoint: str | None,
) -> tuple[str, ReadyCheckpoint] | None:
    """(identity, entry) of the operator's index by identity for a resource as the watch
    shows it: a Ready checkpoint, not being deleted, that records its identity, URI and
    manifest digest (None: not a candidate to copy from)."""
    status, meta = status or {}, meta or {}
    ident = status.get("identity")
    art = status.get("artifact") or {}
    ready = get_condition(status, READY) or {}
    if (
        not ident
        or ready.get("status") != "True"
        or not art.get("uri")
        or not art.get("manifestSha256")
        or meta.get("deletionTimestamp")
    ):
        return None
    endpoint = ((spec or {}).get("output") or {}).get("endpoint") or default_endpoint
    entry = ReadyCheckpoint(
        ref=f"{namespace}/{name}",
        uid=str(meta.get("uid") or ""),
        uri=str(art["uri"]),
        manifest_sha256=str(art["manifestSha256"]),
        endpoint=endpoint,
    )
    return str(ident), entry


@dataclass(frozen=True)
class Refusal:
    """Why a conversion may not start (before any accelerator): Ready=False with this."""

    reason: str
    message: str


@dataclass(frozen=True)
class NextStep:
    step: Step
    identity: str | None
    reason: str
    message: str
    # Adopt / withdraw before Convert: what the manifest must still say
    expect_owner: str | None = None
    expect_manifest_sha256: str | None = None
    # Convert over a gone owner's checkpoint of another identity: withdraw it first
    withdraw: bool = False
    # the withdraw also deletes the objects the manifest lists (only a manifest the
    # operator saw published: a planted one could list anybody's objects)
    withdraw_listed: bool = False
    # Copy
    copy_from: ReadyCheckpoint | None = None


def _estimate(
    spec: CheckpointSpec, preflight: Preflight, accelerator: str
) -> tuple[Any, str | None]:
    """(MemoryEstimate or None, InsufficientMemory message or None) from the source's
    config.json as the preflight read it (core/estimate.py)."""
    if not preflight.config:
        return None, None
    return estimate(
        preflight.config,
        tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        dtype=spec.dtype,
        quantization=spec.quantization,
        max_file_size=spec.output.max_file_size_bytes,
        accelerator=accelerator,
        resources=dict(spec.converter.resources or {}),
    )


def conversion_refusal(
    spec: CheckpointSpec, preflight: Preflight, accelerator: str = "gpu"
) -> Refusal | None:
    """The one place for checks that may stop a conversion before it requests
    accelerators. The layout against the model's config.json (TensorParallelSizeMismatch,
    PipelineParallelSizeMismatch); on CPU, a quantization the CPU backend cannot reload;
    the memory estimate: a pod whose memory limit is below it is refused
    with InsufficientMemory and both numbers, before any pod of the conversion starts.
    None: go ahead."""
    if preflight.config_error:
        return Refusal("InvalidModelConfig", preflight.config_error)
    if preflight.config:
        # the same check the worker repeats before its engine (core.plan.Layout)
        try:
            spec.layout.check_model(preflight.config)
        except SpecError as exc:
            return Refusal(exc.reason, exc.message)
    if accelerator == "cpu" and preflight.config:
        refusal = cpu_raw_reload_refusal(preflight.config, spec.quantization)
        if refusal:
            return Refusal("UnsupportedQuantization", refusal)
    if accelerator == "cpu":
        refusal = cpu_kernel_refusal(spec.quantization, preflight)
        if refusal:
            return Refusal("UnsupportedQuantization", refusal)
    _, problem = _estimate(spec, preflight, accelerator)
    return Refusal("InsufficientMemory", problem) if problem else None


def cpu_kernel_refusal(quantization: str | None, preflight: Preflight) -> str | None:
    """Why the CPU conversion cannot run ``quantization`` (None: it can, or the preflight
    did not probe: spec.check_accelerator's static list stands). An online method needs
    no kernel to convert (core.quantization: its rank files are unquantized); any other
    method needs the kernel the preflight probed on the node type that converts."""
    if not quantization or online_method(
        quantization, prequantized_method(preflight.config) if preflight.config else None
    ):
        return None
    reason = kernel_refusal(quantization, preflight.kernels)
    if reason is None:
        return None
    return (
        f"quantization {quantization!r} has no kernel on the CPU node type that converts "
        f"(probed by the preflight Job with vLLM's own kernel selection): {reason}; the "
        "conversion engine needs it to load the checkpoint. Set spec.converter.accelerator: "
        "gpu, or convert on CPUs that have the kernel"
    )


def memory_estimate_status(
    spec: CheckpointSpec, preflight: Preflight, accelerator: str = "gpu"
) -> dict[str, Any] | None:
    """``status.memoryEstimate`` from the preflight's config.json (None: not countable)."""
    est, _ = _estimate(spec, preflight, accelerator)
    return est.to_status() if est is not None else None


def _parse_owner(owner: str) -> tuple[str, str, str] | None:
    parts = owner.split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def _owner_gone(owner: str | None, me: str, living: frozenset[str]) -> bool:
    """True when ``owner`` no longer exists. An owner in another format than
    namespace/name/uid (a manual ``preshard convert --owner x``) can never be proven
    gone, so it keeps its checkpoint; an empty owner is nobody's."""
    if not owner:
        return True
    if owner == me or owner in living:
        return False
    return _parse_owner(owner) is not None


def _describe(owner: str, me: str) -> str:
    """An owner for a message: the other resource's namespace/name only when it is in the
    requester's own namespace (never another tenant's names), else 'another resource'."""
    mine = _parse_owner(me)
    theirs = _parse_owner(owner)
    if mine and theirs and mine[0] == theirs[0]:
        return f"ShardedCheckpoint {theirs[0]}/{theirs[1]} (uid {theirs[2]})"
    return "another owner"


def next_step(
    spec: CheckpointSpec,
    me: str,
    preflight: Preflight,
    living_owners: frozenset[str],
    ready: list[ReadyCheckpoint],
    *,
    output_endpoint: str | None = None,
    source_endpoint: str | None = None,
    copy_from_namespaces: frozenset[str] = frozenset(),
    copy_allowed: bool = True,
    adopt_allowed: bool = True,
    accelerator: str = "gpu",
) -> NextStep:
    """``me`` is this resource's owner string (namespace/name/uid); ``living_owners`` the
    owner strings of :meth:`Preflight.owners` that the operator found alive; ``ready``
    the Ready checkpoints with this identity; ``copy_from_namespaces`` the OTHER
    namespaces the copy policy lets this one copy from (``*``: any; its own always);
    ``copy_allowed``/``adopt_allowed`` False after that step failed once (falls through
    to Convert)."""
    my_ns = me.split("/", 1)[0]
    identity = conversion_identity(
        spec,
        preflight.source,
        preflight.vllm_version,
        namespace=my_ns,
        source_endpoint=source_endpoint,
    )
    out = str(spec.output.parsed)
    for o in preflight.overlaps:
        if o.owner == me:
            continue
        where = "below" if o.relation == "nested" else "above"
        if o.kind == "publication" and o.relation == "nested":
            # another owner's unfinished publication below: its objects are not listed by
            # any manifest yet, and a step here must never delete or shadow them
            return NextStep(
                "OutputOwnedByOther"
                if not _owner_gone(o.owner, me, living_owners)
                else "OutputOverlapsCheckpoint",
                identity,
                "OutputOwnedByOther"
                if not _owner_gone(o.owner, me, living_owners)
                else "OutputOverlapsCheckpoint",
                f"an unfinished publication lies below output {out} ({o.key}); preshard never "
                "writes over another owner's objects: choose another spec.output.uri",
            )
        if not _owner_gone(o.owner, me, living_owners):
            return NextStep(
                "OutputOwnedByOther",
                identity,
                "OutputOwnedByOther",
                f"a checkpoint {where} output {out} ({o.key}) belongs to "
                f"{_describe(o.owner or '', me)}, which still exists; choose another "
                "spec.output.uri (preshard never writes over another owner's checkpoint)",
            )
        return NextStep(
            "OutputOverlapsCheckpoint",
            identity,
            "OutputOverlapsCheckpoint",
            f"a checkpoint of a deleted resource lies {where} output {out} ({o.key}); "
            "converting here would delete or shadow it: delete it or choose another "
            "spec.output.uri",
        )
    if preflight.state == INVALID:
        return NextStep(
            "OutputOwnedByOther",
            identity,
            "OutputHasUnreadableManifest",
            f"output {out} holds a {MANIFEST_NAME} this operator cannot read (written by another "
            "preshard version, or damaged); its owner cannot be known, so it is not touched: "
            "choose another spec.output.uri, or remove it if it is nobody's",
        )
    man = preflight.manifest
    if man is not None:
        gone = _owner_gone(man.owner, me, living_owners)
        if not gone and man.owner != me:
            return NextStep(
                "OutputOwnedByOther",
                identity,
                "OutputOwnedByOther",
                f"output {out} holds a checkpoint published by "
                f"{_describe(man.owner or '', me)}, which still exists; choose another "
                "spec.output.uri (preshard never overwrites another owner's checkpoint)",
            )
        if (
            adopt_allowed
            and man.complete
            and man.identity == identity
            and is_identity(identity)
            and (man.proven or man.owner == me)
        ):
            return NextStep(
                "Adopt",
                identity,
                "Adopting",
                f"output {out} holds a complete checkpoint with this identity; verifying it "
                "(no accelerator) before taking it over",
                expect_owner=man.owner,
                expect_manifest_sha256=man.sha256,
            )
    if copy_allowed and (man is None or _owner_gone(man.owner, me, living_owners)):
        candidates = sorted(
            (
                r
                for r in ready
                if r.endpoint == output_endpoint
                and (
                    r.namespace == my_ns
                    or "*" in copy_from_namespaces
                    or r.namespace in copy_from_namespaces
                )
                and r.uid != _uid(me)
                and not _overlap(r.uri, out)
                and r.manifest_sha256
            ),
            key=lambda r: (r.namespace != my_ns, r.ref, r.uid),
        )
        if candidates and man is None:
            src = candidates[0]
            # another namespace's prefix is not named before the copy proved that this
            # resource's credentials read it
            where = f" at {src.uri}" if src.namespace == my_ns else ""
            return NextStep(
                "Copy",
                identity,
                "Copying",
                f"a Ready checkpoint with this identity exists{where}; copying it "
                f"server-side to {out} with this resource's credentials",
                copy_from=src,
            )
    refusal = conversion_refusal(spec, preflight, accelerator)  # Ready=False, no accelerator
    if refusal is not None:
        return NextStep("CannotConvert", identity, refusal.reason, refusal.message)
    withdraw = man is not None and man.owner != me and bool(man.owner)
    why = (
        f"output {out} holds a checkpoint of another identity whose owner is gone; "
        "its manifest is withdrawn first, then it is replaced"
        if man is not None and man.identity != identity
        else f"converting into {out}"
    )
    return NextStep(
        "Convert",
        identity,
        "Converting",
        why,
        expect_owner=man.owner if withdraw and man else None,
        expect_manifest_sha256=man.sha256 if withdraw and man else None,
        withdraw=withdraw,
        withdraw_listed=withdraw and man is not None and man.proven,
    )


def _uid(owner: str) -> str:
    p = _parse_owner(owner)
    return p[2] if p else ""


def _overlap(a: str, b: str) -> bool:
    a = a if a.endswith("/") else a + "/"
    b = b if b.endswith("/") else b + "/"
    return a.startswith(b) or b.startswith(a)
