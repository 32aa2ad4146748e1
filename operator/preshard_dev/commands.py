"""The ``preshard`` subcommands the dev tooling contributes (entry-point group
``preshard.commands``, declared in ``dev/pyproject.toml``).

``preshard.cli`` loads each entry point while it builds its parser, so this module stays
light: it declares the flags and imports the implementation only when the command runs
(``preshard operator`` in a dev install never imports the emulator or the Job runner).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register_demo(sub: Any) -> Callable[[argparse.Namespace], int]:
    """Add ``preshard demo`` to the ``preshard`` subparsers; return its runner."""
    p = sub.add_parser(
        "demo",
        help="run the whole product locally (API emulator, S3, operator, job runner, vLLM)",
        description="Start a Kubernetes API emulator, an S3 server, the operator and a local "
        "Job runner on 127.0.0.1, apply examples/tiny-tp2.yaml and watch it to Ready. "
        "Dev tooling: on a real cluster Kubernetes runs the Job.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running and print a kubeconfig path and the S3 endpoint",
    )
    p.add_argument(
        "--dir", default=".preshard-demo", help="state and log directory (default .preshard-demo)"
    )
    p.add_argument(
        "--example",
        default=None,
        help="the ShardedCheckpoint to apply (default examples/tiny-tp2.yaml)",
    )
    return run_demo


def run_demo(args: argparse.Namespace) -> int:
    from preshard_dev import demo

    return int(demo.run(args) or 0)
