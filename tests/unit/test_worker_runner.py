"""The one runner of the worker's commands (preshard.worker.commands.runner): every
command has its module, the commands the operator runs as Jobs write their outcome to
the termination message, and the runner picks the exit code the same way for all."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import ModuleType

import pytest

from preshard.cli import COMMANDS, build_parser
from preshard.core.errors import ObjectsMismatch, SourceNotFound, StorageUnavailable
from preshard.core.progress import Result
from preshard.worker.commands import runner
from preshard.worker.progress import Terminated

# The Jobs the operator creates and reads back (conversion, steps).
OPERATOR_JOBS = {"convert", "preflight", "adopt", "copy", "withdraw"}


def test_every_worker_command_of_the_cli_runs_through_the_runner() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker = {name for name, target in COMMANDS.items() if target == runner.__name__}
    assert worker == set(runner.COMMANDS)
    for name in worker:
        assert name in sub.choices
        module = runner.command_module(name)
        assert callable(module.main), name
        assert getattr(module, "WRITES_RESULT", False) is (name in OPERATOR_JOBS), name
    assert runner.command_module("convert").STOPS_ON_SIGTERM is True


def _run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, main: object, writes: bool = True
) -> tuple[int, Result | None]:
    term = tmp_path / "term"
    monkeypatch.setenv("PRESHARD_TERMINATION_LOG", str(term))
    module = ModuleType("fake_command")
    module.main = main  # type: ignore[attr-defined]
    module.WRITES_RESULT = writes  # type: ignore[attr-defined]
    monkeypatch.setattr(runner, "command_module", lambda name: module)
    code = runner.run(argparse.Namespace(command="adopt"))
    return code, Result.from_message(term.read_text()) if term.exists() else None


def test_the_runner_writes_the_result_and_picks_the_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = Result(result="Succeeded", artifact={"uri": "s3://b/p/"})
    code, res = _run(monkeypatch, tmp_path, lambda args: runner.Done(result=ok))
    assert code == 0 and res is not None and res.result == "Succeeded"
    assert res.artifact == {"uri": "s3://b/p/"}

    def permanent(args: object) -> runner.Done:
        raise SourceNotFound("no such source")

    code, res = _run(monkeypatch, tmp_path, permanent)
    assert code == 3 and res is not None
    assert (res.result, res.reason, res.message) == ("Failed", "SourceNotFound", "no such source")
    assert "preshard: error: no such source" in capsys.readouterr().err

    def transient(args: object) -> runner.Done:
        raise StorageUnavailable("storage down")

    code, res = _run(monkeypatch, tmp_path, transient)
    assert code == 1 and res is not None and res.reason == "StorageUnavailable"

    def terminated(args: object) -> runner.Done:
        exc = Terminated()
        exc.note = "3 uploaded objects removed"
        raise exc

    code, res = _run(monkeypatch, tmp_path, terminated)
    assert code == 143 and res is not None and res.reason == "Terminated"
    assert res.message == "terminated (SIGTERM); nothing was published: 3 uploaded objects removed"

    def bug(args: object) -> runner.Done:
        raise KeyError("secret=AKIAXXXXXXXXXXXXXXXX")

    code, res = _run(monkeypatch, tmp_path, bug)
    assert code == 1 and res is not None and res.reason == "InternalError"
    assert res.message.startswith("unexpected error: KeyError")


def test_a_command_without_a_result_writes_none_and_keeps_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, res = _run(monkeypatch, tmp_path, lambda args: runner.Done(1), writes=False)
    assert code == 1 and res is None

    def permanent(args: object) -> runner.Done:
        raise ObjectsMismatch("refused")

    code, res = _run(monkeypatch, tmp_path, permanent, writes=False)
    assert code == 3 and res is None


def test_sigterm_becomes_terminated() -> None:
    with pytest.raises(Terminated):
        runner._on_sigterm(signal.SIGTERM, None)
