"""``hf://`` sources: the real ``preshard convert`` CLI against a Hugging Face Hub stand-in.

huggingface.co is unreachable from here, so ``preshard_dev.hfhub.FakeHub`` serves local
directories on 127.0.0.1 with the Hub's API, redirects, signed "CDN" URLs and error
headers, and the CLI runs in a subprocess with ``HF_ENDPOINT`` pointing at it
(huggingface_hub reads ``HF_ENDPOINT`` when it is imported).

The fast tests stop right after the Downloading stage without starting vLLM: the test
repos' config has 2 attention heads and the tests ask for ``-tp 3``, which ``convert``
rejects (TensorParallelSizeMismatch) as soon as the source is fetched, leaving the fetched
files in ``<work-dir>/source``. A failing fetch fails before that check. The last test
converts a tiny real Llama from the stand-in with vLLM (``-m vllm``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from preshard.core.progress import ProgressRecord, Result, parse_progress_line
from preshard.worker.store.hf import HF_PATTERNS
from preshard_dev.hfhub import INVALID_CREDENTIALS, FakeHub

TOKEN = "hf_preshardTestToken0123456789abcdef"
NO_ACCESS_TOKEN = "hf_validButNotGranted0123456789"
FETCHED_ONLY = "TensorParallelSizeMismatch"  # the fetch succeeded (see the docstring)

# What preshard must fetch from the test repo (top-level, matching HF_PATTERNS) ...
WANTED = {
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
# ... and what it must leave on the Hub: other weight formats, docs, and subfolders (whole
# copies of the weights in checkpoint-*/, Meta's original/ format).
NOT_WANTED = {
    ".gitattributes",
    "README.md",
    "pytorch_model.bin",
    "checkpoint-100/model.safetensors",
    "checkpoint-100/config.json",
    "original/params.json",
}


def write_repo(root: Path, revision: int, seed: int = 0) -> Path:
    """A Hugging Face-style model folder (random bytes for weights: nothing loads them)."""
    rnd = random.Random(f"{seed}-{revision}")

    def blob(size: int) -> bytes:
        return rnd.randbytes(size)

    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "config.json": json.dumps(
            {"model_type": "llama", "num_attention_heads": 2, "test_revision": revision}
        ).encode(),
        "generation_config.json": b"{}",
        "model-00001-of-00002.safetensors": blob(300_000),
        "model-00002-of-00002.safetensors": blob(200_000),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# test model\n",
        "pytorch_model.bin": blob(400_000),
        "checkpoint-100/model.safetensors": blob(500_000),
        "checkpoint-100/config.json": b"{}",
        "original/params.json": b"{}",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@dataclass
class Hub:
    server: FakeHub
    repo_v1: Path
    repo_v2: Path
    other: Path
    sha_v1: str
    sha_v2: str


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    base = tmp_path_factory.mktemp("hub-repos")
    v1, v2 = write_repo(base / "v1", 1), write_repo(base / "v2", 2)
    other = write_repo(base / "other", 1, seed=7)
    (other / "model-00002-of-00002.safetensors").unlink()
    (other / "model-00001-of-00002.safetensors").rename(other / "model.safetensors")
    with FakeHub() as server:
        server.page_size = 4  # every tree listing takes several pages
        sha_v1 = server.add_repo("org/tiny", v1)
        server.repos["org/tiny"].refs["v1"] = sha_v1  # a tag
        sha_v2 = server.add_revision("org/tiny", v2, ref="main")
        server.repos["org/tiny"].refs["refs/pr/1"] = sha_v1
        server.add_repo("org/other", other)
        bin_only = base / "bin-only"
        bin_only.mkdir()
        (bin_only / "config.json").write_bytes((v1 / "config.json").read_bytes())
        (bin_only / "pytorch_model.bin").write_bytes(b"\0" * 1000)
        server.add_repo("org/bin-only", bin_only)
        server.add_repo("org/gated", v1, gated=True)
        server.add_token(TOKEN, ["org/gated"])
        server.add_token(NO_ACCESS_TOKEN)
        yield Hub(server, v1, v2, other, sha_v1, sha_v2)


@pytest.fixture
def hub(hub_server: Hub) -> Hub:
    hub_server.server.reset_requests()
    hub_server.server.clear_faults()
    return hub_server


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    result: Result | None
    work: Path
    elapsed: float

    @property
    def source(self) -> Path:
        return self.work / "source"

    @property
    def message(self) -> str:
        return self.result.message if self.result is not None else ""

    @property
    def error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("preshard: ")]
        return lines[-1] if lines else ""

    @property
    def progress(self) -> list[ProgressRecord]:
        recs = [parse_progress_line(line) for line in self.stdout.splitlines()]
        return [r for r in recs if r is not None]

    def fetched(self) -> set[str]:
        """Files fetched into the work dir (huggingface_hub's .cache/ aside)."""
        return {
            p.relative_to(self.source).as_posix()
            for p in self.source.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(self.source).parts
        }


def convert(
    tmp_path: Path,
    hub: Hub,
    source: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    work: Path | None = None,
    tp: str = "3",
    verbose: bool = False,
    timeout: float = 60,
    extra: tuple[str, ...] = (),
) -> Run:
    """``preshard convert`` in a subprocess, huggingface_hub pointed at the stand-in; the
    engine path (``--engine vllm``), whose download these tests are about (the engine-free
    path reads ``hf://`` by ranges: tests/integration/test_sources_hf.py)."""
    work = work or tmp_path / "work"
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(hub.server.env(token=token, hf_home=tmp_path / "hf-home"))
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    env["PRESHARD_TERMINATION_LOG"] = str(term)
    cmd = [sys.executable, "-m", "preshard.cli", *(["-v"] if verbose else []), "convert"]
    cmd += ["--source", source, "-tp", tp, "--output", str(tmp_path / "out")]
    cmd += ["--work-dir", str(work), "--progress", "lines", "--engine", "vllm", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    result = Result.from_message(term.read_text()) if term.exists() else None
    return Run(proc.returncode, proc.stdout, proc.stderr, result, work, time.monotonic() - t0)


def assert_failed(run: Run, reason: str, rc: int) -> None:
    detail = f"rc={run.rc}\nstdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.result is not None, detail
    assert (run.result.result, run.result.reason) == ("Failed", reason), detail
    assert run.rc == rc, detail
    assert run.error == f"preshard: error: {run.result.message}", detail


def assert_fetched(run: Run, repo: Path) -> None:
    """The fetch succeeded: exactly the wanted files, byte for byte."""
    assert_failed(run, FETCHED_ONLY, 3)
    assert run.fetched() == WANTED
    for name in WANTED:
        assert (run.source / name).read_bytes() == (repo / name).read_bytes(), name


# ------------------------------------------------------------------------------ success


def test_fetches_the_top_level_model_files_of_one_commit(tmp_path: Path, hub: Hub) -> None:
    assert set(HF_PATTERNS) >= {"*.safetensors", "*.json"}
    run = convert(tmp_path, hub, "hf://org/tiny")
    assert_fetched(run, hub.repo_v2)  # main is the second commit
    srv = hub.server
    # Each wanted file once; no other weight format, doc or subfolder.
    assert sorted(srv.downloaded()) == sorted(WANTED)
    assert not set(srv.downloaded()) & NOT_WANTED
    # The branch was resolved once, then every file was read at that commit.
    assert srv.count("info") == 1
    resolves = [r for r in srv.requests if r.kind == "resolve"]
    assert resolves and all(f"/resolve/{hub.sha_v2}/" in r.path for r in resolves)
    # Weights came through the signed CDN redirect.
    assert srv.count("cdn", "GET") == 2
    # Download progress for the operator: the total up front, all of it at the end.
    total = sum((hub.repo_v2 / n).stat().st_size for n in WANTED)
    dl = [r for r in run.progress if r.stage == "Downloading" and r.bytes_total]
    assert dl and dl[0].bytes_total == total
    assert dl[-1].bytes_done == total
    # No request log lines (with signed URLs) and no tqdm bars in the job's log.
    assert "HTTP Request:" not in run.stderr
    assert "signature=" not in run.stderr + run.stdout
    assert "Fetching" not in run.stderr


@pytest.mark.parametrize("rev", ["sha", "refs/pr/1"])
def test_a_commit_or_ref_revision(tmp_path: Path, hub: Hub, rev: str) -> None:
    rev = hub.sha_v1 if rev == "sha" else rev
    run = convert(tmp_path, hub, f"hf://org/tiny@{rev}")
    assert_fetched(run, hub.repo_v1)
    assert json.loads((run.source / "config.json").read_text())["test_revision"] == 1
    resolves = [r for r in hub.server.requests if r.kind == "resolve"]
    assert resolves and all(f"/resolve/{hub.sha_v1}/" in r.path for r in resolves)


def test_the_pinned_commit_is_downloaded_after_the_branch_moved(tmp_path: Path, hub: Hub) -> None:
    """The preflight pinned v1; main has moved on to v2 since. The conversion
    (``--source-digest``: the pinned commit) downloads exactly v1, never the branch's tip."""
    run = convert(tmp_path, hub, "hf://org/tiny", extra=("--source-digest", hub.sha_v1))
    assert_fetched(run, hub.repo_v1)
    resolves = [r for r in hub.server.requests if r.kind == "resolve"]
    assert resolves and all(f"/resolve/{hub.sha_v1}/" in r.path for r in resolves)


# ------------------------------------------------------------------------------ failures


def test_missing_repository(tmp_path: Path, hub: Hub) -> None:
    run = convert(tmp_path, hub, "hf://org/missing")
    assert_failed(run, "SourceNotFound", 3)
    assert "hf://org/missing does not exist" in run.message
    assert "HF_TOKEN" in run.message
    assert hub.server.count("resolve") == 0


def test_missing_revision(tmp_path: Path, hub: Hub) -> None:
    run = convert(tmp_path, hub, "hf://org/tiny@no-such-branch")
    assert_failed(run, "SourceNotFound", 3)
    assert run.message == (
        "source hf://org/tiny@no-such-branch: revision 'no-such-branch' does not exist"
    )


def test_repository_without_safetensors(tmp_path: Path, hub: Hub) -> None:
    run = convert(tmp_path, hub, "hf://org/bin-only")
    assert_failed(run, "InvalidSource", 3)
    assert run.message == "source hf://org/bin-only has no *.safetensors weights"
    assert hub.server.downloaded() == ["config.json"]


def test_gated_repository_without_token(tmp_path: Path, hub: Hub) -> None:
    run = convert(tmp_path, hub, "hf://org/gated")
    assert_failed(run, "AccessDenied", 3)
    assert "hf://org/gated is gated: set HF_TOKEN" in run.message
    assert hub.server.downloaded() == []


def test_gated_repository_with_a_token_without_access(tmp_path: Path, hub: Hub) -> None:
    run = convert(tmp_path, hub, "hf://org/gated", token=NO_ACCESS_TOKEN)
    assert_failed(run, "AccessDenied", 3)
    assert "has not been granted access" in run.message
    assert NO_ACCESS_TOKEN not in run.stdout + run.stderr + run.message


def test_invalid_token_is_permanent(tmp_path: Path, hub: Hub) -> None:
    # The Hub answers 401 "Invalid credentials" to every request: retrying cannot help.
    bad = "hf_revokedOrMistyped000000000000"
    run = convert(tmp_path, hub, "hf://org/tiny", token=bad)
    assert_failed(run, "AccessDenied", 3)
    assert "rejected HF_TOKEN" in run.message
    assert bad not in run.stdout + run.stderr


def test_gated_repository_with_token_and_the_token_is_never_printed(
    tmp_path: Path, hub: Hub
) -> None:
    run = convert(tmp_path, hub, "hf://org/gated", token=TOKEN, verbose=True)
    assert_fetched(run, hub.repo_v1)
    assert TOKEN not in run.stdout + run.stderr
    assert TOKEN not in (tmp_path / "termination-log").read_text()
    srv = hub.server
    assert all(r.authorized for r in srv.requests if r.kind in ("info", "tree", "resolve"))
    # The signed CDN URLs are on another host: the token does not follow the redirect.
    cdn = [r for r in srv.requests if r.kind == "cdn"]
    assert cdn and not any(r.authorized for r in cdn)


def test_hub_unreachable_is_transient(tmp_path: Path, hub: Hub) -> None:
    from preshard_dev.s3server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = convert(tmp_path, hub, "hf://org/tiny", endpoint=endpoint)
    assert_failed(run, "StorageUnavailable", 1)
    msg = run.message
    assert msg.startswith(f"cannot download hf://org/tiny from the Hugging Face Hub at {endpoint}")


@pytest.mark.parametrize(("kind", "status"), [("info", 503), ("cdn", 403)])
def test_hub_or_cdn_error_is_transient(tmp_path: Path, hub: Hub, kind: str, status: int) -> None:
    # A 403 from the CDN is an expired signed URL, not a token problem.
    hub.server.fault(kind, status=status, times=100)
    run = convert(tmp_path, hub, "hf://org/tiny", token=TOKEN)
    assert_failed(run, "StorageUnavailable", 1)
    assert run.message.endswith(f"HTTP {status}")


def test_connection_dropped_is_transient(tmp_path: Path, hub: Hub) -> None:
    # The connection closes without an answer: huggingface_hub raises its HTTP client's
    # own error, which is not an OSError.
    hub.server.fault("resolve", drop=True, method="HEAD", times=100)
    run = convert(tmp_path, hub, "hf://org/tiny")
    assert_failed(run, "StorageUnavailable", 1)
    assert "RemoteProtocolError" in run.message


def test_the_work_dir_only_ever_holds_one_commit(tmp_path: Path, hub: Hub) -> None:
    work = tmp_path / "work"
    assert_fetched(convert(tmp_path, hub, "hf://org/tiny@v1", work=work), hub.repo_v1)
    # The same commit again: resumed from the work dir, nothing downloaded.
    hub.server.reset_requests()
    assert_fetched(convert(tmp_path, hub, "hf://org/tiny@v1", work=work), hub.repo_v1)
    assert hub.server.downloaded() == []
    # Another commit: every file again, none of the first commit's left.
    assert_fetched(convert(tmp_path, hub, "hf://org/tiny", work=work), hub.repo_v2)
    assert sorted(hub.server.downloaded()) == sorted(WANTED)
    # A missing repository fails although a model sits in the work dir (given a branch,
    # snapshot_download alone returns what is there when the Hub says "not found").
    assert_failed(convert(tmp_path, hub, "hf://org/missing", work=work), "SourceNotFound", 3)
    # Nor when the Hub is unreachable.
    down = convert(tmp_path, hub, "hf://org/tiny", work=work, endpoint="http://127.0.0.1:9")
    assert_failed(down, "StorageUnavailable", 1)
    # Another repository: none of the first one's files are left over.
    run = convert(tmp_path, hub, "hf://org/other", work=work)
    assert_failed(run, FETCHED_ONLY, 3)
    assert run.fetched() == (WANTED | {"model.safetensors"}) - {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert (run.source / "config.json").read_bytes() == (hub.other / "config.json").read_bytes()


# ------------------------------------------------------------------------ the stand-in


def _request(
    srv: FakeHub, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url if "://" in url else srv.endpoint + url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_stand_in_speaks_the_hub_protocol(hub: Hub) -> None:
    """The parts of the protocol the CLI tests rely on, checked directly."""
    srv, sha = hub.server, hub.sha_v2
    data = (hub.repo_v2 / "config.json").read_bytes()
    # A regular file: 200, its git blob id as ETag, the commit.
    st, h, body = _request(srv, "GET", "/org/tiny/resolve/main/config.json")
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert (st, body, h["etag"], h["x-repo-commit"]) == (200, data, f'"{blob}"', sha)
    # An LFS file: 302 to a signed URL on another host, the sha256 as X-Linked-Etag.
    weights = (hub.repo_v2 / "model-00002-of-00002.safetensors").read_bytes()
    st, h, _ = _request(srv, "HEAD", "/org/tiny/resolve/main/model-00002-of-00002.safetensors")
    assert st == 302 and h["x-linked-etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert h["x-linked-size"] == str(len(weights))
    location = h["location"]
    assert location.startswith(f"http://localhost:{srv.port}/cdn-lfs/")
    # Ranges (resumed downloads), and the signature is checked.
    st, h, body = _request(srv, "GET", location, {"Range": "bytes=1000-"})
    assert (st, body, h["content-range"]) == (
        206,
        weights[1000:],
        f"bytes 1000-{len(weights) - 1}/{len(weights)}",
    )
    assert _request(srv, "GET", location.replace("signature=", "signature=0"))[0] == 403

    # Error headers huggingface_hub turns into its exceptions.
    def error(url: str, token: str | None = None) -> tuple[int, str | None]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        st, h, _ = _request(srv, "GET", url, headers)
        return st, h.get("x-error-code") or h.get("x-error-message")

    assert error("/api/models/org/missing") == (401, "RepoNotFound")
    assert error("/api/models/org/missing", NO_ACCESS_TOKEN) == (404, "RepoNotFound")
    assert error("/api/models/org/tiny/revision/nope") == (404, "RevisionNotFound")
    assert error("/org/tiny/resolve/main/nope.json") == (404, "EntryNotFound")
    assert error("/org/gated/resolve/main/config.json") == (401, "GatedRepo")
    assert error("/org/gated/resolve/main/config.json", NO_ACCESS_TOKEN) == (403, "GatedRepo")
    assert error("/api/models/org/tiny", "hf_unknown") == (401, INVALID_CREDENTIALS)
    assert (
        _request(
            srv, "GET", "/org/gated/resolve/main/config.json", {"Authorization": f"Bearer {TOKEN}"}
        )[0]
        == 200
    )
    # The gated repository's info and tree are public, as on the Hub.
    st, _, body = _request(srv, "GET", "/api/models/org/gated/revision/main")
    assert st == 200 and json.loads(body)["gated"] == "manual"
    # The tree is paginated with a Link header.
    st, h, body = _request(srv, "GET", f"/api/models/org/tiny/tree/{sha}?recursive=true")
    assert st == 200 and len(json.loads(body)) == srv.page_size and 'rel="next"' in h["link"]


# ------------------------------------------------------------------------ end to end (vLLM)


@pytest.mark.vllm
def test_convert_from_the_hub_with_vllm(tmp_path: Path, hub: Hub) -> None:
    from preshard.core.manifest import MANIFEST_NAME, Manifest
    from preshard_dev.tinymodel import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny-llama", num_kv_heads=2, seed=0)
    (model / "pytorch_model.bin").write_bytes(b"not fetched")
    sha = hub.server.add_repo("org/tiny-llama", model, gated=True)
    hub.server.add_token(TOKEN, ["org/gated", "org/tiny-llama"])
    run = convert(tmp_path, hub, "hf://org/tiny-llama@main", token=TOKEN, tp="1", timeout=900)
    detail = f"rc={run.rc}\nstderr:\n{run.stderr[-6000:]}"
    assert run.rc == 0, detail
    assert run.result is not None and run.result.result == "Succeeded", detail
    out = tmp_path / "out"
    manifest = Manifest.from_json((out / MANIFEST_NAME).read_bytes())
    assert manifest.source_uri == "hf://org/tiny-llama@main"
    assert manifest.source_revision == sha  # the commit converted, not the moving branch
    assert manifest.tensor_parallel_size == 1
    names = {f.key for f in manifest.files}
    assert "config.json" in names and "tokenizer.json" in names
    assert "pytorch_model.bin" not in names
    assert "pytorch_model.bin" not in hub.server.downloaded()
    resolves = [r for r in hub.server.requests if r.kind == "resolve"]
    assert resolves and all(f"/resolve/{sha}/" in r.path for r in resolves)
    assert TOKEN not in run.stdout + run.stderr


# --------------------------------------------------------------------------- preflight


def hf_pin(tmp_path: Path, hub: Hub, source: str, token: str | None = None) -> dict[str, Any]:
    """The preflight's source findings for an hf:// source (worker.commands.preflight._hf_source in a
    subprocess: huggingface_hub reads HF_ENDPOINT when it is imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(hub.server.env(token=token, hf_home=tmp_path / "hf-home"))
    env["PRESHARD_WORK_DIR"] = str(tmp_path / "work")
    code = (
        "import json, sys\n"
        "from preshard.core.errors import PreshardError\n"
        "from preshard.core.uris import parse_uri\n"
        "from preshard.worker.commands.preflight import _hf_source\n"
        "try:\n"
        "    rec, config = _hf_source(parse_uri(sys.argv[1]))\n"
        "    print(json.dumps({'source': rec, 'config': config}))\n"
        "except PreshardError as e:\n"
        "    print(json.dumps({'reason': e.reason, 'message': e.message}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, source], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_preflight_pins_a_branch_to_its_commit_and_reads_the_config(
    tmp_path: Path, hub: Hub
) -> None:
    main = hf_pin(tmp_path, hub, "hf://org/tiny@main")
    assert main["source"]["revision"] == hub.sha_v2 and main["source"]["digest"] == hub.sha_v2
    assert main["config"] == {"model_type": "llama", "num_attention_heads": 2}
    tag = hf_pin(tmp_path, hub, "hf://org/tiny@v1")
    assert tag["source"]["revision"] == hub.sha_v1  # another commit: another identity
    pinned = hf_pin(tmp_path, hub, f"hf://org/tiny@{hub.sha_v2}")
    assert pinned["source"]["digest"] == main["source"]["digest"]


def test_preflight_of_hf_errors_are_the_converts(tmp_path: Path, hub: Hub) -> None:
    assert hf_pin(tmp_path, hub, "hf://org/missing")["reason"] == "SourceNotFound"
    assert hf_pin(tmp_path, hub, "hf://org/bin-only")["reason"] == "InvalidSource"
    gated = hf_pin(tmp_path, hub, "hf://org/gated")
    assert gated["reason"] == "AccessDenied"
    assert "config" in hf_pin(tmp_path, hub, "hf://org/gated", token=TOKEN)
