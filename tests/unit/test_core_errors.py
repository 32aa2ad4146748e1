"""preshard.core.errors: the catalogue of failures, one class per reason, and the README.

Each class carries its PascalCase reason and its permanence; the README's troubleshooting
section lists every class with its exit code (3 permanent, 1 transient), and every reason
the README lists is either a class here or a reason the operator sets on a condition
itself (a string the product's code holds).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from preshard.core import errors
from preshard.core.contract import EXIT_FAILED, EXIT_PERMANENT
from preshard.core.errors import (
    GateError,
    InvalidURI,
    PreshardError,
    SourceNotFound,
    SpecError,
    StorageError,
    catalogue,
)

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ROOT / "operator" / "preshard"
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
CATALOGUE = catalogue()


def troubleshooting() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Troubleshooting")
    end = text.index("\n## ", start)
    return text[start:end]


def table_rows(section: str, header: str) -> list[list[str]]:
    """The rows of the table whose header row starts with ``header``."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def reasons_in(cell: str) -> set[str]:
    return {r for r in re.findall(r"`([A-Za-z0-9]+)`", cell) if PASCAL.match(r)}


def test_a_failure_is_its_class_reason_and_permanence_and_message() -> None:
    err = SourceNotFound("s3://b/m/ does not exist")
    assert (err.reason, err.permanent) == ("SourceNotFound", True)
    assert str(err) == err.message == "s3://b/m/ does not exist"
    assert err.args == ("s3://b/m/ does not exist",)
    assert (StorageError("x").reason, StorageError("x").permanent) == ("StorageError", False)


def test_reason_and_permanence_cannot_be_chosen_per_raise_site() -> None:
    with pytest.raises(TypeError):
        PreshardError("x", reason="Other")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SourceNotFound("x", permanent=False)  # type: ignore[call-arg]


def test_categories_catch_their_kind() -> None:
    assert isinstance(InvalidURI("ftp://x"), SpecError)
    assert isinstance(CATALOGUE["VllmTooOld"]("old"), GateError)
    assert isinstance(CATALOGUE["TensorParallelSizeMismatch"]("tp"), SpecError)


@pytest.mark.parametrize("reason", sorted(CATALOGUE))
def test_every_class_has_a_pascal_case_reason_and_a_fixed_permanence(reason: str) -> None:
    cls = CATALOGUE[reason]
    assert PASCAL.match(cls.reason) and cls.reason == reason
    assert isinstance(cls.permanent, bool)
    assert cls.__module__ == errors.__name__


def test_no_two_classes_share_a_reason() -> None:
    # catalogue() raises on a duplicate; every concrete class of the module is in it
    classes = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, PreshardError)
    }
    categories = {
        errors.PreshardError,
        errors.SpecError,
        errors.SourceError,
        errors.OutputError,
        errors.StorageFailure,
        errors.VerificationError,
        errors.GateError,
    }
    assert set(CATALOGUE.values()) == classes - categories


def test_every_class_is_in_the_readme_with_its_exit_code() -> None:
    listed: dict[str, str] = {}
    for row in table_rows(troubleshooting(), "reason"):
        for reason in reasons_in(row[0]):
            listed[reason] = row[1]
    assert sorted(set(CATALOGUE) - set(listed)) == []
    assert sorted(set(listed) - set(CATALOGUE)) == []
    for reason, cls in CATALOGUE.items():
        want = EXIT_PERMANENT if cls.permanent else EXIT_FAILED
        assert listed[reason] == str(want), f"{reason}: README says exit {listed[reason]}"


def _product_strings() -> set[str]:
    out: set[str] = set()
    for path in PRODUCT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def test_every_ready_reason_in_the_readme_exists_in_the_code() -> None:
    """The operator's own condition reasons (JobPending, OutputConflict, ...) are not
    failures of a command; each one the README lists must still be set by the code."""
    strings = _product_strings()
    for row in table_rows(troubleshooting(), "Ready reason"):
        for reason in reasons_in(row[0]):
            if reason in CATALOGUE or reason in KUBELET_REASONS:
                continue
            assert reason in strings, f"README lists {reason}, which no code sets"


# reasons the README quotes from the kubelet and the Job controller, not preshard's own
KUBELET_REASONS = {
    "ImagePullBackOff",
    "CreateContainerConfigError",
    "BackoffLimitExceeded",
    "DeadlineExceeded",
}


def test_no_raise_site_passes_a_reason() -> None:
    """Raised by name: no call in the product passes ``reason=`` to a failure class."""
    names = {cls.__name__ for cls in CATALOGUE.values()} | {"PreshardError"}
    offenders = []
    for path in PRODUCT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in names and any(k.arg in ("reason", "permanent") for k in node.keywords):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_no_category_is_raised_as_a_failure_of_its_own() -> None:
    """A category (SpecError, GateError, ...) groups failures for ``except``; a raise site
    names the concrete class, so each reason has exactly one class that carries it."""
    categories = {"PreshardError", "SpecError", "SourceError", "OutputError"}
    categories |= {"StorageFailure", "VerificationError", "GateError"}
    offenders = []
    for path in PRODUCT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.exc if isinstance(node, ast.Raise) else None
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
                if value.func.id in categories:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
