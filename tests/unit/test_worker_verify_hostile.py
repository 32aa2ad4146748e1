"""Hostile sharding metadata (docs/security.md, "Job results"): ``preshard verify --against`` of a
checkpoint under review refuses every malformed or out-of-bounds field of
``preshard-sharding.json`` with exit 3, reason ``InvalidShardingMetadata`` and the field
that is wrong, before it allocates anything from it: the process runs under an address
space limit far below what the hostile shapes would need (on main, zero strides over a
60000x60000 region asked for 14 GB and died with a RuntimeError, exit 1; a fill value
"x" raised a TypeError, exit 1).

Real parts: the ``preshard`` console entry point in a fresh process, real safetensors
files, the real verifier; the checkpoint is a one-rank copy written here."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from preshard.core.manifest import MANIFEST_NAME, SHARDING_NAME, build_manifest
from preshard.core.sharding import ShardingError, check_fill, check_region, parse_document
from preshard.worker.verify import against as va
from preshard.worker.verify.shards import VerificationFailed

RANK_FILE = "model-rank-0-part-0.safetensors"
# The limit on the verifier's address space: torch alone maps about 1-1.5 GiB here; the
# hostile regions below would need 3.6 to 14 GB.
AS_LIMIT = 3 * 2**30


def _doc() -> dict[str, Any]:
    return {
        "format": "preshard.io/sharding-metadata",
        "formatVersion": 1,
        "stateFormat": "raw",
        "tensorParallelSize": 1,
        "pipelineParallelSize": 1,
        "sources": {
            "w": {"shape": [4, 4], "dtype": "float32"},
            "e": {"shape": [3, 4], "dtype": "float32"},
        },
        "skippedSources": [],
        "ranks": [
            {
                "rank": 0,
                "tpRank": 0,
                "ppRank": 0,
                "tensors": {
                    "w": {
                        "shape": [4, 4],
                        "dtype": "float32",
                        "writes": [
                            {
                                "op": "copy",
                                "source": "w",
                                "src": [0, [4, 1], [4, 4]],
                                "dst": [0, [4, 1], [4, 4]],
                            }
                        ],
                    },
                    "e": {  # three rows of the source, one padding row
                        "shape": [4, 4],
                        "dtype": "float32",
                        "writes": [
                            {
                                "op": "copy",
                                "source": "e",
                                "src": [0, [4, 1], [3, 4]],
                                "dst": [0, [4, 1], [3, 4]],
                            },
                            {"op": "fill", "value": 0, "dst": [12, [4, 1], [1, 4]]},
                        ],
                    },
                },
            }
        ],
    }


def _write(tmp: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(4, 4, generator=g), "e": torch.randn(3, 4, generator=g)}
    (tmp / "src").mkdir(parents=True, exist_ok=True)
    save_file(src, str(tmp / "src" / "model.safetensors"))
    (tmp / "src" / "config.json").write_text('{"model_type": "llama"}')
    ckpt = tmp / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    saved = {"w": src["w"].clone(), "e": torch.cat([src["e"], torch.zeros(1, 4)])}
    save_file(saved, str(ckpt / RANK_FILE))
    (ckpt / SHARDING_NAME).write_text(json.dumps(doc))
    files = []
    for name in (RANK_FILE, SHARDING_NAME):
        data = (ckpt / name).read_bytes()
        files.append((name, len(data), hashlib.sha256(data).hexdigest()))
    man = build_manifest(
        files,
        source_uri="pvc://m/x",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        vllm_version="0.32.0",
        sharding_key=SHARDING_NAME,
    )
    (ckpt / MANIFEST_NAME).write_text(man.to_json())
    return tmp / "src", ckpt


_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from preshard.cli import main
sys.argv = ["preshard"] + sys.argv[1:]
rc = main()
# VmHWM: this process's own peak (ru_maxrss would include the parent's RSS at fork)
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print("maxrss_kib", hwm[0], file=sys.stderr)
sys.exit(rc)
"""


def _verify(src: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PRESHARD_"))}
    env |= {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _LIMITED.format(limit=AS_LIMIT),
            "verify",
            "--against",
            str(src),
            str(ckpt),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _w(doc: dict[str, Any], key: str, i: int = 0) -> dict[str, Any]:
    return doc["ranks"][0]["tensors"][key]["writes"][i]


# (mutation, the field the error must name, a phrase of the message)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    # the finding: zero strides over 60000x60000 (14 GB at float32) of a 16-element tensor
    "zero-strides-huge-dst": (
        lambda d: _w(d, "e", 1).update(dst=[0, [0, 0], [60000, 60000]]),
        "ranks[0].tensors[e].writes[1].dst",
        "writes an element twice",
    ),
    "zero-strides-huge-copy": (
        lambda d: _w(d, "w").update(
            src=[0, [0, 0], [60000, 60000]], dst=[0, [0, 0], [60000, 60000]]
        ),
        "ranks[0].tensors[w].writes[0].dst",
        "writes an element twice",
    ),
    # broadcasting a source element is allowed, but the region must fit its destination
    "broadcast-src-wrong-shape": (
        lambda d: _w(d, "w").update(src=[0, [0, 0], [60000, 60000]]),
        "ranks[0].tensors[w].writes[0].src",
        "source and destination shapes differ",
    ),
    "overlapping-dst": (
        lambda d: _w(d, "w").update(dst=[0, [1, 1], [4, 4]]),
        "ranks[0].tensors[w].writes[0].dst",
        "writes an element twice",
    ),
    "offset-past-the-end": (
        lambda d: _w(d, "w").update(dst=[10**12, [4, 1], [1, 1]]),
        "ranks[0].tensors[w].writes[0].dst",
        "lies outside the tensor",
    ),
    "huge-stride": (
        lambda d: _w(d, "w").update(src=[0, [10**15, 1], [2, 8]], dst=[0, [10**15, 1], [2, 8]]),
        "ranks[0].tensors[w].writes[0].dst",
        "lies outside the tensor",
    ),
    "int-beyond-int64": (
        lambda d: _w(d, "w").update(dst=[2**64, [4, 1], [4, 4]]),
        "ranks[0].tensors[w].writes[0].dst",
        "a region must be",
    ),
    "negative-stride": (
        lambda d: _w(d, "w").update(src=[15, [-4, -1], [4, 4]]),
        "ranks[0].tensors[w].writes[0].src",
        "a region must be",
    ),
    "src-outside-source": (
        lambda d: _w(d, "e").update(src=[4, [4, 1], [3, 4]]),
        "ranks[0].tensors[e].writes[0].src",
        "a copy reads outside e",
    ),
    "fill-string": (
        lambda d: _w(d, "e", 1).update(value="x"),
        "ranks[0].tensors[e].writes[1].value",
        "must be a number or a bool",
    ),
    "fill-huge-int": (
        lambda d: _w(d, "e", 1).update(value=10**300),
        "ranks[0].tensors[e].writes[1].value",
        "does not fit float32",
    ),
    "fill-too-large-for-dtype": (
        lambda d: _w(d, "e", 1).update(value=1e39),
        "ranks[0].tensors[e].writes[1].value",
        "does not fit float32",
    ),
    "source-name-not-a-string": (
        lambda d: _w(d, "w").update(source=["w"]),
        "ranks[0].tensors[w].writes[0].source",
        "must be a string",
    ),
    "dtype-not-a-string": (
        lambda d: d["sources"]["w"].update(dtype={"x": 1}),
        "sources[w].dtype",
        "a dtype must be",
    ),
    "shape-not-the-file-header": (
        lambda d: d["ranks"][0]["tensors"]["w"].update(shape=[60000, 60000]),
        "ranks[rank 0].tensors[w].shape",
        "in the file but",
    ),
    "bad-op": (
        lambda d: _w(d, "w").update(op="exec"),
        "ranks[0].tensors[w].writes[0].op",
        "bad write",
    ),
    "skipped-not-names": (
        lambda d: d.update(skippedSources=[1]),
        "skippedSources[0]",
        "must be a string",
    ),
}


def test_the_unmodified_checkpoint_verifies_and_one_changed_element_fails(tmp_path: Path) -> None:
    src, ckpt = _write(tmp_path, _doc())
    report = va.verify_against(src, ckpt)
    assert (report.copies, report.fills, report.checked_tensors) == (2, 1, 2)
    # the padding row must hold the fill value: one element off is caught
    from safetensors.torch import load_file

    t = load_file(str(ckpt / RANK_FILE))
    t["e"][3, 2] = 1.0
    save_file(t, str(ckpt / RANK_FILE))
    with pytest.raises(VerificationFailed, match=r"element \[3, 2\] is 1\.0, the loader filled 0"):
        va.verify_against(src, ckpt)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_field_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    mutate, field, phrase = HOSTILE[case]
    doc = copy.deepcopy(_doc())
    mutate(doc)
    src, ckpt = _write(tmp_path, doc)
    with pytest.raises(VerificationFailed) as exc:
        va.verify_against(src, ckpt)
    assert exc.value.reason == "InvalidShardingMetadata"
    assert f"(field {field})" in exc.value.message, exc.value.message
    assert phrase in exc.value.message, exc.value.message


@pytest.mark.parametrize(
    "case",
    ["zero-strides-huge-dst", "zero-strides-huge-copy", "fill-string", "shape-not-the-file-header"],
)
def test_verify_cli_refuses_hostile_metadata_with_exit_3_in_bounded_memory(
    tmp_path: Path, case: str
) -> None:
    mutate, field, phrase = HOSTILE[case]
    doc = copy.deepcopy(_doc())
    mutate(doc)
    src, ckpt = _write(tmp_path, doc)
    proc = _verify(src, ckpt, "--json")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("preshard: error:")]
    assert "InvalidShardingMetadata" in line and f"(field {field})" in line and phrase in line
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["reason"] == "InvalidShardingMetadata"
    [rss] = [int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("maxrss_kib")]
    assert rss < 600 * 1024, rss  # KiB: refused at parse (~35 MiB) or after import torch


def test_the_limited_process_verifies_a_good_checkpoint(tmp_path: Path) -> None:
    """The address-space limit leaves room for a real verification (so the refusals above
    are the validation's, not the limit's): the stored metadata is replayed against the
    files in full, and only then re-planned from the source with vLLM's weight loaders
    (the engine-free planner), which imports vLLM under the same limit and refuses this hand-made
    checkpoint, whose tensors no vLLM model has, with PlannerUnsupported (exit 3)."""
    src, ckpt = _write(tmp_path, _doc())
    proc = _verify(src, ckpt)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("preshard: error:")]
    assert "PlannerUnsupported" in line or "weight loaders" in line, line


def test_nan_and_infinity_are_refused_anywhere() -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(_doc()).replace('"value": 0', f'"value": {literal}')
        with pytest.raises(ShardingError, match="not allowed"):
            parse_document(text)


def test_region_and_fill_bounds() -> None:
    check_region([0, [4, 1], [4, 4]], 16, "f", "outside")
    check_region([3, [0, 0], [4, 4]], 16, "f", "outside", overlapping=True)  # broadcast read
    check_region([0, [1, 4], [4, 4]], 16, "f", "outside")  # transposed
    check_region([1, [8, 2], [2, 4]], 16, "f", "outside")  # every other column
    check_region([99, [1], [0]], 16, "f", "outside")  # empty: nothing read or written
    check_region([0, [10**15, 1], [1, 16]], 16, "f", "outside")  # a length-1 dim's stride
    for bad in ([0, [2, 1], [4, 4]], [0, [4, 0], [4, 2]], [13, [4, 1], [1, 4]]):
        with pytest.raises(ShardingError) as exc:
            check_region(bad, 16, "f", "outside")
        assert exc.value.field == "f"
    check_fill(0, "bfloat16", "v")
    check_fill(True, "bool", "v")
    check_fill(-128, "int8", "v")
    check_fill(-0.5, "float16", "v")
    for value, dtype in (
        (-129, "int8"),
        (0.5, "int32"),
        (70000.0, "float16"),
        (None, "float32"),
        ([0], "float32"),
        (2, "bool"),
    ):
        with pytest.raises(ShardingError):
            check_fill(value, dtype, "v")
