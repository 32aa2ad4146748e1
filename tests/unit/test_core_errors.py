"""preshard.core.errors: PascalCase reasons, permanence and the message a user sees."""

from __future__ import annotations

import re

import pytest

from preshard.core.errors import PreshardError, SpecError, URIError

PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def test_preshard_error_defaults() -> None:
    err = PreshardError("the bucket does not exist")
    assert err.reason == "Error"
    assert err.permanent is False
    assert err.message == "the bucket does not exist"
    assert str(err) == "the bucket does not exist"
    assert err.args == ("the bucket does not exist",)


def test_preshard_error_overrides_reason_and_permanence_per_instance() -> None:
    err = PreshardError("no such source", reason="SourceNotFound", permanent=True)
    assert (err.reason, err.permanent) == ("SourceNotFound", True)
    # The override is per instance: the class default is untouched.
    assert PreshardError.reason == "Error"
    assert PreshardError.permanent is False
    assert PreshardError("other").reason == "Error"


def test_spec_error_is_permanent_invalid_spec() -> None:
    err = SpecError("spec.tensorParallelSize: must be >= 1")
    assert isinstance(err, PreshardError)
    assert (err.reason, err.permanent) == ("InvalidSpec", True)
    assert str(err) == "spec.tensorParallelSize: must be >= 1"


def test_spec_error_reason_override_keeps_permanence() -> None:
    err = SpecError("tp 3 does not divide 32 heads", reason="TensorParallelSizeMismatch")
    assert err.reason == "TensorParallelSizeMismatch"
    assert err.permanent is True


def test_spec_error_can_be_made_transient() -> None:
    err = SpecError("x", permanent=False)
    assert err.permanent is False
    assert SpecError.permanent is True


def test_uri_error_is_a_spec_error_with_its_own_reason() -> None:
    err = URIError("'ftp://x' has an unsupported scheme")
    assert isinstance(err, SpecError)
    assert isinstance(err, PreshardError)
    assert (err.reason, err.permanent) == ("InvalidURI", True)
    with pytest.raises(SpecError, match="unsupported scheme"):
        raise err


@pytest.mark.parametrize("cls", [PreshardError, SpecError, URIError])
def test_default_reasons_are_pascal_case(cls: type[PreshardError]) -> None:
    assert PASCAL.match(cls.reason), cls.reason
