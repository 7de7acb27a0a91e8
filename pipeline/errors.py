"""Errors that stop a job, each with the exit code the CLIs give it.

:class:`JobError`: the job cannot start (exit code 2); its message names the config key or path
to fix.
"""

from __future__ import annotations


class JobError(RuntimeError):
    """The job cannot start; the message says which config key or path to fix (exit code 2)."""
