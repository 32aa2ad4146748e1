"""The result's ``verification`` (what the operator writes to status) from the
manifest's verification record, as both conversion paths record it."""

from __future__ import annotations

from typing import Any

from preshard.core.quantity import format_bytes


def agreement(engine: dict[str, Any]) -> str:
    """How the engine check's log-probabilities agreed, e.g. "abs<=0.05, bit-identical"."""
    how = (
        "bit-identical"
        if engine.get("bitIdentical")
        else f"max difference {float(engine.get('maxAbsDifference') or 0.0):.3g}"
    )
    return f"{engine.get('comparison')}, {how}"


def verification_result(verification: dict[str, Any]) -> dict[str, Any]:
    """The result's ``verification`` in the shape the operator reads
    (``preshard.core.progress.verification_status``: ``passed``, ``summary``,
    ``checks[] {name, passed, detail}``), from the manifest's verification record."""
    checks: list[dict[str, Any]] = []
    free = verification.get("engineFree")
    planned = isinstance(free, dict) and free.get("method") == "planned"
    if planned:
        assert isinstance(free, dict)
        detail = (
            f"{free.get('files')} rank files streamed from the source as vLLM's weight loaders "
            f"plan them ({free.get('savedTensors')} tensors, "
            f"{format_bytes(int(free.get('bytesWritten') or 0))}), each read back against "
            "its plan; no engine ran (--engine none)"
        )
        checks.append(
            {"name": "engine-free", "passed": free.get("matched") is True, "detail": detail}
        )
    elif isinstance(free, dict):
        detail = (
            f"{free.get('savedTensors')} saved tensors rebuilt from "
            f"{free.get('sourceTensors')} source tensors bit for bit ({free.get('copies')} "
            f"copies, {free.get('fills')} fills, "
            f"{format_bytes(int(free.get('bytesCompared') or 0))} compared)"
        )
        checks.append(
            {"name": "engine-free", "passed": free.get("matched") is True, "detail": detail}
        )
    engine = verification.get("engine")
    if isinstance(engine, dict):
        detail = (
            f"the shards reloaded with load_format=sharded_state give the same tokens and "
            f"top-{engine.get('topK')} log-probabilities ({agreement(engine)}) at "
            f"{engine.get('positions')} positions of {engine.get('prompts')} prompts"
        )
        checks.append({"name": "engine", "passed": engine.get("matched") is True, "detail": detail})
    passed = bool(checks) and all(c["passed"] for c in checks)
    summary = "; ".join(f"{c['name']}: {c['detail']}" for c in checks)
    if not isinstance(engine, dict) and not planned:
        summary += "; engine check skipped (--no-verify)"
    summary += quantization_summary(verification.get("quantization"))
    return {"passed": passed, "summary": summary, "checks": checks}


def quantization_summary(record: Any) -> str:
    """What the verification summary says about an online method (``quantization`` in
    the verification record): the raw files are unquantized, and whether the quantized
    engine check could run on this machine."""
    if not isinstance(record, dict) or not record.get("online"):
        return ""
    method = record.get("method")
    text = f"; {record.get('note')}"
    reason = record.get("kernel")
    if not record.get("probed"):
        text += f"; {method}'s kernel was not probed (no engine ran)"
    elif isinstance(reason, str) and reason:
        text += (
            f"; engine check with {method} skipped: {method} has no kernel on this CPU ({reason})"
        )
    else:
        text += (
            f"; engine check with {method} skipped: the engine check reloads the raw files "
            f"without the method ({method}'s kernel exists on this machine, the quantized "
            "reload is not compared)"
        )
    return text
