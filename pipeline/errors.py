"""Exit codes and the errors that carry them: the one home of both.

Both command lines (``python -m pipeline.precompute``, ``python -m pipeline.validate``) exit with
an :class:`ExitCode` and print :func:`describe` in their ``--help``; ``jobs/submit.sh`` and
``jobs/validate.sh`` relay the job's code and add their own (3, 128+N, 130) from ``EXIT_*``
variables. ``python -m pipeline.errors`` prints every command's codes; tests/test_errors.py
checks the scripts and the docs against :class:`ExitCode`.

An error that a user can act on derives from :class:`PipelineError` and carries its exit code:
the command lines catch these and nothing broader, so a bug (a ``ValueError`` from a wrong shape
deep in a stage, a ``KeyError``) is never reported as "could not start": it prints its traceback
and exits :attr:`ExitCode.INTERNAL`.
"""

from __future__ import annotations

import enum
import sys


class ExitCode(enum.IntEnum):
    """What a run's exit code means (``int(ExitCode.CANNOT_START) == 2``); per command in
    :data:`MEANINGS`."""

    OK = 0
    FAILED = 1
    CANNOT_START = 2
    STOPPED = 3  # jobs/*.sh only
    INTERNAL = 70  # sysexits' EX_SOFTWARE
    INTERRUPTED = 130  # jobs/*.sh only


SIGNALLED = 128
"""jobs/*.sh: 128+N when the job's driver was killed by signal N (137: SIGKILL)."""

_INTERNAL = "a bug (the traceback says where; nothing a setting can fix)"
MEANINGS: dict[str, dict[ExitCode, str]] = {
    "precompute": {
        ExitCode.OK: "every shard committed cleanly",
        ExitCode.FAILED: (
            "a shard failed or was only partly readable, on_error=fail stopped the job, no "
            "record was written, or the output became unwritable mid-run (the summary names "
            "them; re-run to resume)"
        ),
        ExitCode.CANNOT_START: (
            "the job could not start: a bad config value or command line, a missing shard or "
            "model, output.dir not writable, foreign, held by another run or written with another "
            "config, Ray could not be started or joined (one line naming the key or path)"
        ),
        ExitCode.INTERNAL: _INTERNAL,
    },
    "validate": {
        ExitCode.OK: "every check passed (warnings allowed)",
        ExitCode.FAILED: "a check failed",
        ExitCode.CANNOT_START: (
            "the validation could not run: no such directory, no or damaged manifest, a bad "
            "config value, a report directory it cannot write (one line naming the path or key)"
        ),
        ExitCode.INTERNAL: _INTERNAL,
    },
    "jobs": {  # jobs/submit.sh and jobs/validate.sh, besides the job's own codes
        ExitCode.CANNOT_START: (
            "also: the job could not be submitted (no RAY_ADDRESS or token, token refused, "
            "cluster unreachable, runtime environment failed)"
        ),
        ExitCode.STOPPED: "the job was stopped (ray job stop)",
        ExitCode.INTERRUPTED: "the script was interrupted; the job goes on on the cluster",
    },
}


def describe(command: str, width: int = 98) -> str:
    """``Exit codes: 0 ...; 1 ...`` for ``command`` (a key of :data:`MEANINGS`), wrapped to
    ``width``: the help text's paragraph."""
    import textwrap

    items = [f"{int(code)} {meaning}" for code, meaning in MEANINGS[command].items()]
    if command == "jobs":
        items.append(f"{SIGNALLED}+N the driver was killed by signal N (re-run to resume)")
    return textwrap.fill("Exit codes: " + "; ".join(items) + ".", width)


class PipelineError(Exception):
    """An error the user can act on; the message says what and how to fix it."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(PipelineError, ValueError):
    """What was asked cannot run: a config value, a command line, an input (shard URL, model,
    weights) refused before any work, naming the key or path and what is allowed. A ValueError,
    as diffusers' schedulers raise for arguments they do not allow."""

    exit_code = ExitCode.CANNOT_START


class CannotStart(PipelineError, RuntimeError):
    """The run cannot start here: an output directory that cannot be used, Ray or a process pool
    that cannot start; the message names the path or key."""

    exit_code = ExitCode.CANNOT_START


class JobError(CannotStart):
    """The job cannot start; the message says which config key or path to fix (exit code 2)."""


class RunFailed(PipelineError, RuntimeError):
    """The run stopped with work undone (committed shards are kept): re-run to resume."""

    exit_code = ExitCode.FAILED


def need(ok: bool, key: str, message: str) -> None:
    """UsageError ``config key KEY: MESSAGE`` unless ``ok``: the config checks' one form."""
    if not ok:
        raise UsageError(f"config key {key}: {message}")


def internal_error() -> ExitCode:
    """In a command line's ``except Exception``: print the traceback and a line saying it is a
    bug, not a usage error; returns :attr:`ExitCode.INTERNAL`."""
    import traceback

    traceback.print_exc()
    print(
        f"error: internal error (a bug, exit {int(ExitCode.INTERNAL)}): the traceback above "
        "says where; nothing a setting can fix, please report it",
        file=sys.stderr,
    )
    return ExitCode.INTERNAL


if __name__ == "__main__":  # python -m pipeline.errors: the table, for the docs
    for name in MEANINGS:
        print(f"{name}: {describe(name)}")
