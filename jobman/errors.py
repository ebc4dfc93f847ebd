"""The exception that means "the user asked for something invalid".

The CLI turns a `UsageError` into one line on stderr and exit status 2. Any other exception is a
bug and keeps its traceback. jobman is independent of the pruning code, so it has its own type.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Invalid user input: a bad flag, a malformed directive, an unknown accelerator or job id."""


class BackendError(RuntimeError):
    """A backend (SkyPilot, Slurm) refused or failed an operation; the message says which."""
