"""The worker's commands, one module per command (``convert``, ``fetch``, ``check``,
``verify``, ``purge``, ``preflight``, ``adopt``, ``copy``, ``withdraw``), each with
``main(args) -> runner.Done``, and the one runner (``runner.run``: the result in the
termination message, the error line and the exit code, the same for every command).
``published`` and ``steps`` hold what the commands on a published checkpoint and the
step commands share."""
