"""vLLM general plugin: registers preshard's ``preshard_raw`` model loader.

vLLM calls every ``vllm.general_plugins`` entry point in each of its processes (the
front end, the engine core and every worker), which is the only way to reach the worker
processes where the weights are loaded; a patch in the parent process would not. The
entry point is declared in pyproject.toml.

Registering a load format changes nothing for a vLLM that does not ask for it: a vLLM
server that merely has preshard installed loads models exactly as before. The loader
itself is ``preshard.worker.engine.raw_loader``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vllm.preshard_plugin")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (may be called more than once)."""
    from preshard.worker.engine.raw_loader import register as register_loader

    register_loader()
