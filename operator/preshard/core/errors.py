"""The catalogue of preshard's failures: one class per reason.

Every expected failure is raised by name (``raise SourceNotFound("...")``): the class
carries its PascalCase ``reason`` (a Kubernetes condition reason, the worker's result
reason) and whether it is ``permanent`` (retrying cannot help: the worker exits 3 and the
Job is not retried; otherwise it exits 1 and the Job retries up to its backoffLimit).
The message is what the user can act on; it never holds a secret.

The README's troubleshooting table lists every class here (a unit test holds the two
together). Categories are plain base classes, so a caller can catch a whole kind:
``SpecError`` (the resource or command line asks for something invalid),
``GateError`` (the serving gate refuses a checkpoint as configured), ``SourceError``,
``OutputError``, ``StorageFailure``, ``VerificationError``.
"""

from __future__ import annotations


class PreshardError(Exception):
    """An expected failure: reported as one clear line (CLI) or a condition (operator)."""

    reason: str = "InternalError"
    permanent: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InternalError(PreshardError):
    """A bug or an unexpected state: transient, the Job retries."""

    reason = "InternalError"


# -- the spec, the command line, the model's configuration ------------------------------


class SpecError(PreshardError):
    """The resource's spec (or the command line) is invalid beyond what the CRD checks."""

    reason = "InvalidSpec"
    permanent = True


class InvalidSpec(SpecError):
    reason = "InvalidSpec"


class InvalidURI(SpecError):
    reason = "InvalidURI"


class UsageError(SpecError):
    """A command-line argument is wrong."""

    reason = "Usage"


class InvalidConfig(SpecError):
    """The operator's or a command's configuration (environment) is invalid."""

    reason = "InvalidConfig"


class NoKubeconfig(SpecError):
    reason = "NoKubeconfig"


class InvalidInput(SpecError):
    """A file given to a command (a plan, a record, a trace) is not what it must be."""

    reason = "InvalidInput"


class TensorParallelSizeMismatch(SpecError):
    reason = "TensorParallelSizeMismatch"


class PipelineParallelSizeMismatch(SpecError):
    reason = "PipelineParallelSizeMismatch"


class UnknownQuantization(SpecError):
    reason = "UnknownQuantization"


class UnsupportedQuantization(SpecError):
    reason = "UnsupportedQuantization"


class UnsupportedDtype(SpecError):
    reason = "UnsupportedDtype"


class InsufficientCPU(SpecError):
    reason = "InsufficientCPU"


class InsufficientMemory(SpecError):
    reason = "InsufficientMemory"


class CopyNotSupported(SpecError):
    reason = "CopyNotSupported"


# -- the source -------------------------------------------------------------------------


class SourceError(PreshardError):
    """The source model cannot be used as it is (permanent)."""

    reason = "InvalidSource"
    permanent = True


class InvalidSource(SourceError):
    reason = "InvalidSource"


class SourceNotFound(SourceError):
    reason = "SourceNotFound"


class SourceChanged(SourceError):
    """The source differs from what the preflight pinned."""

    reason = "SourceChanged"


class UnsupportedModel(SourceError):
    reason = "UnsupportedModel"


class PlannerUnsupported(SourceError):
    """The engine-free planner cannot give this model's exact tensors."""

    reason = "PlannerUnsupported"


class PlannerUnavailable(SourceError):
    """The planner that would re-derive a checkpoint's tensors cannot run here."""

    reason = "PlannerUnavailable"


class ReshardNotPossible(SourceError):
    reason = "ReshardNotPossible"


# -- the output -------------------------------------------------------------------------


class OutputError(PreshardError):
    """The output prefix cannot take this checkpoint (permanent)."""

    reason = "OutputChanged"
    permanent = True


class OutputChanged(OutputError):
    """The output prefix changed under the worker (another writer)."""

    reason = "OutputChanged"


class OutputOwnedByOther(OutputError):
    reason = "OutputOwnedByOther"


class IdentityMismatch(OutputError):
    reason = "IdentityMismatch"


class NothingToPublish(OutputError):
    reason = "NothingToPublish"


class ManifestNotFound(OutputError):
    reason = "ManifestNotFound"


class InvalidManifest(OutputError):
    reason = "InvalidManifest"


# -- object storage ---------------------------------------------------------------------


class StorageFailure(PreshardError):
    """Object storage answered with an error (transient unless a subclass says so)."""

    reason = "StorageError"


class StorageError(StorageFailure):
    reason = "StorageError"


class StorageUnavailable(StorageFailure):
    """The endpoint cannot be reached (connection, timeout, 5xx after retries)."""

    reason = "StorageUnavailable"


class AccessDenied(StorageFailure):
    reason = "AccessDenied"
    permanent = True


class BucketNotFound(StorageFailure):
    reason = "BucketNotFound"
    permanent = True


class ObjectNotFound(StorageFailure):
    reason = "NotFound"
    permanent = True


class UploadAborted(StorageFailure):
    """An upload was cancelled (the run stops); it resumes from its record."""

    reason = "UploadAborted"
    permanent = True


class LocalFileChanged(StorageFailure):
    """A local file changed while it was uploaded: uploading again reads it again."""

    reason = "LocalFileChanged"


class InjectedCrash(StorageFailure):
    """A crash injected by a test hook (PRESHARD_TEST_CRASH_AFTER_PARTS)."""

    reason = "InjectedCrash"
    permanent = True


# -- the conversion and its proofs ------------------------------------------------------


class ConversionFailed(PreshardError):
    """The conversion failed in a way another attempt may not (the engine process died or
    timed out, a node problem): transient, the Job retries."""

    reason = "ConversionFailed"


class EngineRefused(PreshardError):
    """vLLM cannot load (or run) the model at this configuration: its own error is in the
    message. Permanent: the same engine refuses it again."""

    reason = "EngineRefused"
    permanent = True


class PlanningFailed(PreshardError):
    """The ranks' planned tensors are inconsistent (what the sharding metadata, the FP8
    scheme or a rank file would need cannot be built from them): a defect or a model the
    planner does not understand. Permanent: the same plan fails again."""

    reason = "PlanningFailed"
    permanent = True


class VerificationError(PreshardError):
    """What was written is not what it must be (permanent: nothing is published)."""

    reason = "VerificationFailed"
    permanent = True


class VerificationFailed(VerificationError):
    reason = "VerificationFailed"


class InvalidShardingMetadata(VerificationFailed):
    reason = "InvalidShardingMetadata"


class IntegrityError(VerificationError):
    """A downloaded object's digest differs from its manifest."""

    reason = "IntegrityError"


class ObjectsMismatch(VerificationError):
    reason = "ObjectsMismatch"


class StreamerListingMismatch(VerificationError):
    reason = "StreamerListingMismatch"


# -- the serving gate -------------------------------------------------------------------


class GateError(PreshardError):
    """The checkpoint must not be served as configured (permanent)."""

    reason = "ManifestPinMismatch"
    permanent = True


class ManifestPinMismatch(GateError):
    reason = "ManifestPinMismatch"


class PlatformUnknown(GateError):
    reason = "PlatformUnknown"


class ShardNamesIncompatible(GateError):
    reason = "ShardNamesIncompatible"


class StateFormatIncompatible(GateError):
    reason = "StateFormatIncompatible"


class VllmNotFound(GateError):
    reason = "VllmNotFound"


class VllmTooOld(GateError):
    reason = "VllmTooOld"


class VllmVersionUnknown(GateError):
    reason = "VllmVersionUnknown"


def catalogue() -> dict[str, type[PreshardError]]:
    """Every concrete failure by its reason (the categories are not failures of their own
    unless a concrete class carries their reason)."""
    out: dict[str, type[PreshardError]] = {}
    stack: list[type[PreshardError]] = [PreshardError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ != __name__ or cls in _CATEGORIES:
            continue
        if cls.reason in out and out[cls.reason] is not cls:
            raise AssertionError(f"two classes for {cls.reason}: {out[cls.reason]}, {cls}")
        out[cls.reason] = cls
    return out


_CATEGORIES: frozenset[type[PreshardError]] = frozenset(
    {
        PreshardError,
        SpecError,
        SourceError,
        OutputError,
        StorageFailure,
        VerificationError,
        GateError,
    }
)
