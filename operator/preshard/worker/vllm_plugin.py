"""The plugin's entry point under its name before the worker's engine package
(``preshard.worker.engine.plugin``): an install made before the move (an editable
install's metadata) still names ``preshard.worker.vllm_plugin:register`` until it is
reinstalled. Remove once every environment is reinstalled (pyproject.toml names the new
one)."""

from __future__ import annotations


def register() -> None:
    from preshard.worker.engine.plugin import register as register_plugin

    register_plugin()
