"""The test tree collects as one: every test directory is a package.

CI once failed at collection (``import file mismatch``) because two directories without an
``__init__.py`` held test modules of the same basename; a subset run never shows it.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_directory_is_a_package() -> None:
    dirs = {p.parent for p in TESTS.rglob("test_*.py")}
    missing = sorted(str(d.relative_to(TESTS)) for d in dirs if not (d / "__init__.py").exists())
    assert missing == []
