"""preshard.core.naming: deterministic child names within the 63-character label limit."""

from __future__ import annotations

import hashlib
import re

import pytest

from preshard.core.naming import (
    MAX_NAME,
    bounded_name,
    checkpoint_label_value,
    job_name,
    purge_job_name,
    serving_configmap_name,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HASH = hashlib.sha256(b"spec").hexdigest()  # 64 hex chars, like conversion_hash()


def test_max_name_is_the_label_limit() -> None:
    assert MAX_NAME == 63


def test_short_names_are_kept_verbatim() -> None:
    assert job_name("llama-70b-tp8", HASH) == f"llama-70b-tp8-{HASH[:10]}"
    assert purge_job_name("llama-70b-tp8", HASH) == f"llama-70b-tp8-purge-{HASH[:10]}"
    assert bounded_name("a", "b") == "a-b"


def test_bounded_name_exactly_at_the_limit_is_not_cut() -> None:
    base = "a" * (63 - 11)
    assert bounded_name(base, "0123456789") == f"{base}-0123456789"
    assert len(bounded_name(base, "0123456789")) == 63


def test_bounded_name_cuts_long_bases_with_a_hash_of_the_base() -> None:
    base = "a" * 53  # 53 + 1 + 10 = 64 > 63
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    name = bounded_name(base, "0123456789")
    assert name == f"{'a' * 45}-{digest}-0123456789"
    assert len(name) == 63


def test_bounded_name_strips_a_dash_left_at_the_cut() -> None:
    base = "a" * 44 + "-" + "b" * 30
    name = bounded_name(base, "0123456789")
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    assert name == f"{'a' * 44}-{digest}-0123456789"
    assert "--" not in name


@pytest.mark.parametrize(
    ("base", "clean"),
    [("Llama_70B.TP8", "llama-70b-tp8"), ("--x--", "x"), ("___", "x"), ("", "x"), ("a..b", "a-b")],
)
def test_bounded_name_sanitizes_to_a_dns_label(base: str, clean: str) -> None:
    assert bounded_name(base, "s") == f"{clean}-s"


def test_bounded_name_respects_a_custom_limit() -> None:
    name = bounded_name("abcdefghijklmnopqrstuvwxyz", "sfx", limit=20)
    assert len(name) == 20
    assert name.endswith("-sfx")


@pytest.mark.parametrize("length", [1, 40, 52, 53, 54, 63, 64, 100, 253])
def test_job_names_are_valid_labels_and_deterministic(length: int) -> None:
    resource = ("m" * (length - 1) + "1")[:length]
    for fn in (job_name, purge_job_name):
        name = fn(resource, HASH)
        assert len(name) <= 63, name
        assert DNS_LABEL.match(name), name
        assert fn(resource, HASH) == name  # same inputs, same name, always
        assert name.endswith(HASH[:10])


def test_job_name_depends_on_the_hash() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    assert job_name("x", HASH) != job_name("x", other)
    # Only the first 10 hex digits count.
    assert job_name("x", HASH) == job_name("x", HASH[:10] + "f" * 54)


def test_long_names_sharing_a_prefix_stay_distinct() -> None:
    names = {job_name("shared-prefix-" + "x" * 60 + suffix, HASH) for suffix in "abcdef"}
    assert len(names) == 6
    assert all(len(n) == 63 for n in names)


def test_conversion_and_purge_job_names_differ() -> None:
    for resource in ("x", "y" * 100):
        assert job_name(resource, HASH) != purge_job_name(resource, HASH)


def test_serving_configmap_name() -> None:
    assert serving_configmap_name("llama-70b-tp8") == "llama-70b-tp8-serving"


def test_serving_configmap_name_is_a_valid_subdomain_for_the_longest_names() -> None:
    name = serving_configmap_name("a" * 253)
    assert len(name) <= 253


SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@pytest.mark.parametrize("length", [245, 246, 253])
def test_serving_configmap_names_of_long_resources(length: int) -> None:
    resource = ("model.v1-" * 40)[: length - 1] + "z"
    name = serving_configmap_name(resource)
    assert len(name) <= 253 and SUBDOMAIN.match(name), name
    assert name.endswith("-serving")
    if length + len("-serving") <= 253:
        assert name == resource + "-serving"
    else:
        assert name != serving_configmap_name(resource[:-1] + "y")  # hashed: still distinct
    assert serving_configmap_name(resource) == name


LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.mark.parametrize("length", [1, 63, 64, 100, 253])
def test_checkpoint_label_value(length: int) -> None:
    resource = ("llama.3-" * 40)[: length - 1] + "z"
    value = checkpoint_label_value(resource)
    assert len(value) <= 63 and LABEL_VALUE.match(value), value
    if length <= 63:
        assert value == resource
    else:
        digest = hashlib.sha256(resource.encode()).hexdigest()[:10]
        assert value.endswith("-" + digest)
        assert resource.startswith(value.removesuffix("-" + digest))
