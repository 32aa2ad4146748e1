"""preshard.core.quantity: Kubernetes byte quantities."""

from __future__ import annotations

import re

import pytest

from preshard.core.quantity import QUANTITY_PATTERN, QUANTITY_RE, format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5Gi", 5 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1Ki", 1024),
        ("2Ti", 2 * 2**40),
        ("1Pi", 2**50),
        ("500M", 500_000_000),
        ("1k", 1000),
        ("3G", 3_000_000_000),
        ("1T", 10**12),
        ("2P", 2 * 10**15),
        ("1073741824", 1073741824),
        ("0", 0),
        ("1.5Gi", 1610612736),
        ("0.5Ki", 512),
        ("0.5", 0),  # fractional bytes are truncated
        (" 2Mi ", 2 * 2**20),  # surrounding blanks are ignored
        (7, 7),
        (0, 0),
        (5 * 2**30, 5 * 2**30),
    ],
)
def test_parse_bytes(value: str | int, expected: int) -> None:
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    "value",
    ["5GB", "5 Gi", "", "1e3", "-5Gi", "5m", "5gi", "Gi", "1.Gi", ".5Gi", "5Ei", "0x10"],
)
def test_parse_bytes_rejects_bad_strings(value: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_bytes(value)
    assert str(exc.value) == f"{value!r} is not a quantity such as 5Gi, 512Mi or 1073741824"


def test_parse_bytes_rejects_negative_integers() -> None:
    with pytest.raises(ValueError, match=r"^-1 is negative$"):
        parse_bytes(-1)


@pytest.mark.parametrize("value", [True, False])
def test_parse_bytes_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match=r"is not a byte quantity$"):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (5 * 2**30, "5.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (2**50, "1024.0 TiB"),  # TiB is the largest unit
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    "sample",
    ["5Gi", "1", "1.5Mi", "200Gi", "10k", "5GB", "5 Gi", "-1", "1e3", "Gi", "5gi", "1.5"],
)
def test_schema_pattern_and_parser_regex_agree(sample: str) -> None:
    # QUANTITY_PATTERN goes into the CRD; QUANTITY_RE is what the operator parses with.
    assert bool(re.match(QUANTITY_PATTERN, sample)) == bool(QUANTITY_RE.match(sample))
