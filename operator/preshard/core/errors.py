"""Errors with a machine-readable PascalCase reason and a message a user can act on."""

from __future__ import annotations


class PreshardError(Exception):
    """An expected failure: reported as one clear line (CLI) or a condition (operator).

    ``reason`` is PascalCase (it becomes a Kubernetes condition reason); ``permanent``
    means retrying cannot help (bad input, missing source), so the Job must not retry.
    """

    reason: str = "Error"
    permanent: bool = False

    def __init__(self, message: str, *, reason: str | None = None, permanent: bool | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if permanent is not None:
            self.permanent = permanent

    def __str__(self) -> str:
        return self.message


class SpecError(PreshardError):
    """The resource's spec is invalid in a way the CRD schema could not catch."""

    reason = "InvalidSpec"
    permanent = True


class URIError(SpecError):
    reason = "InvalidURI"
