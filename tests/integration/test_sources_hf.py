"""``hf://`` tensor sources against the Hub stand-in (``preshard_dev.hfhub.FakeHub`` on
127.0.0.1, in this process: huggingface_hub's endpoint patched to it): the same tensors,
order and values as the local source over the same files, every weight byte by range
requests at the resolved commit (no weight file on disk), a cut body read again, the
non-weight files prepared, and the Hub's refusals as clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from preshard.core.errors import PreshardError
from preshard.worker.sources import open_source
from preshard_dev.hfhub import FakeHub
from preshard_dev.tinymodel import make_tiny_model

TOKEN = "hf_sourceTestToken0123456789abcdef"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_tiny_model("mixtral", tmp_path_factory.mktemp("m") / "model")
    # two weight files and an index, as Hub repos are sharded
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    (d / "model.safetensors").unlink()
    half = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname))
    import json

    index = {"weight_map": {k: f for f, keys in parts.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "README.md").write_text("# not wanted\n")
    return d


@pytest.fixture(scope="module")
def hub(model: Path) -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_repo("org/tiny", model)
        server.add_repo("org/gated", model, gated=True)
        server.add_token(TOKEN, ["org/gated"])
        yield server


@pytest.fixture
def hub_env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    from huggingface_hub import constants

    # (huggingface_hub derives both from HF_ENDPOINT when it is imported)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.reset_requests()
    hub.clear_faults()
    return hub


def test_hf_source_matches_local_by_ranges(
    hub_env: FakeHub, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    src = open_source("hf://org/gated@main")
    local = open_source(str(model))
    assert src.tensors() == local.tensors()
    assert src.tensors()[0].file == "model-00001-of-00002.safetensors"
    for info in src.tensors():
        assert torch.equal(
            src.read(info.name).view(torch.uint8), local.read(info.name).view(torch.uint8)
        )
    meta = src.prepare(tmp_path / "work")
    assert (meta / "config.json").read_bytes() == (model / "config.json").read_bytes()
    on_disk = {p.name for p in (tmp_path / "work").rglob("*") if p.is_file()}
    assert not any(n.endswith(".safetensors") for n in on_disk)
    assert "README.md" not in on_disk
    weight_gets = [
        r
        for r in hub_env.requests
        if r.method == "GET" and ".safetensors" in r.path and "index" not in r.path
    ]
    assert weight_gets and all(r.range for r in weight_gets), (
        "a weight file was read without a range"
    )
    assert len(src.revision) == 40


def test_hf_source_reads_a_cut_body_again(hub_env: FakeHub, model: Path) -> None:
    src = open_source("hf://org/tiny")
    local = open_source(str(model))
    name = max(src.tensors(), key=lambda t: t.nbytes).name
    hub_env.reset_requests()
    hub_env.fault("cdn", cut_after=100, path_contains="")
    assert torch.equal(src.read(name).view(torch.uint8), local.read(name).view(torch.uint8))
    cdn = [r for r in hub_env.requests if r.kind == "cdn"]
    assert len(cdn) >= 2 and all(r.range for r in cdn)  # the cut body, then the range again


def test_hf_source_errors(hub_env: FakeHub) -> None:
    with pytest.raises(PreshardError) as e:
        open_source("hf://org/missing")
    assert e.value.reason == "SourceNotFound" and e.value.permanent
    with pytest.raises(PreshardError) as e:
        open_source("hf://org/gated")
    assert e.value.reason == "AccessDenied" and "HF_TOKEN" in e.value.message
    assert TOKEN not in e.value.message
