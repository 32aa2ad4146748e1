"""The one runner of every worker command (``preshard convert``, ``fetch``, ``check``,
``verify``, ``purge``, ``preflight``, ``adopt``, ``copy``, ``withdraw``): it runs the
command's module (one per command, ``main(args) -> Done``), writes the result to the
termination message, prints the error line and picks the exit code, the same way for
every command (docs/architecture.md: 0 ok, 1 transient, 3 permanent, 130 interrupted,
143 terminated).

A command module declares what it needs of the runner: ``WRITES_RESULT`` (its outcome,
success or failure, goes to the termination message: the commands the operator runs as
Jobs and reads back) and ``STOPS_ON_SIGTERM`` (SIGTERM becomes ``Terminated``, so that an
engine's process group is stopped on the way out instead of being left running)."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from preshard.core.contract import EXIT_FAILED, EXIT_OK, EXIT_PERMANENT
from preshard.core.errors import PreshardError
from preshard.core.progress import Result
from preshard.worker.progress import Terminated, write_result
from preshard.worker.store.s3 import scrub

log = logging.getLogger("preshard.convert")

# subcommand -> its module in this package
COMMANDS = {
    "convert": "convert",
    "fetch": "fetch",
    "check": "check",
    "verify": "verify",
    "purge": "purge",
    "preflight": "preflight",
    "adopt": "adopt",
    "copy": "copy",
    "withdraw": "withdraw",
}
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


@dataclass(frozen=True)
class Done:
    """A command's outcome: its exit code and, for a command that writes one, the
    result for the termination message."""

    code: int = EXIT_OK
    result: Result | None = None


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{COMMANDS[name]}")


def run(args: argparse.Namespace) -> int:
    module = command_module(args.command)
    writes = bool(getattr(module, "WRITES_RESULT", False))
    if getattr(module, "STOPS_ON_SIGTERM", False) and (
        threading.current_thread() is threading.main_thread()
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)

    def failed(reason: str, message: str) -> None:
        if writes:
            write_result(Result(result="Failed", reason=reason, message=message))

    try:
        done: Done = module.main(args)
    except Terminated as exc:
        failed(
            "Terminated",
            "terminated (SIGTERM)" + (f"; nothing was published: {exc.note}" if exc.note else ""),
        )
        print("preshard: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except PreshardError as exc:
        failed(exc.reason, exc.message)
        print(f"preshard: error: {exc.message}", file=sys.stderr)
        return EXIT_PERMANENT if exc.permanent else EXIT_FAILED
    except KeyboardInterrupt as exc:
        failed("Interrupted", "interrupted" + _notes(exc))
        print("preshard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # unexpected: a bug or an environment problem; the Job retries
        if not writes:
            raise
        log.debug("unexpected error", exc_info=True)
        msg = scrub(f"unexpected error: {type(exc).__name__}: {exc}{_notes(exc)}")
        failed("InternalError", msg)
        print(f"preshard: error: {msg} (run with -v for details)", file=sys.stderr)
        return EXIT_FAILED
    if done.result is not None and writes:
        write_result(done.result)
    return done.code


def _notes(exc: BaseException) -> str:
    return "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
