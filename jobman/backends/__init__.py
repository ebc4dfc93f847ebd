"""Execution backends behind one small interface.

A backend turns a stored job into work on an engine and maps the engine's view back:

* ``launch(store, rows)``  hand the jobs (one submission: a job or an array) to the engine and
  record the engine's ids (``backend_id``); local jobs are run by `jobman.runner` instead.
* ``refresh(store, rows)`` read the engine's state of active jobs into the database.
* ``cancel(store, row)``   ask the engine to stop a job.
* ``logs(store, row, follow, out)`` print (and optionally follow) a job's output.
* ``render(spec, job_id)`` what would be submitted (``jobman submit --dry-run``), as text.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, TextIO

from jobman.errors import UsageError


class Backend:
    name = "base"

    def validate(self, spec: Any) -> None:
        """Raise UsageError if this backend cannot run `spec`."""

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        raise NotImplementedError

    def launch(self, store: Any, rows: List[Any]) -> None:
        raise NotImplementedError

    def refresh(self, store: Any, rows: List[Any]) -> None:
        raise NotImplementedError

    def cancel(self, store: Any, row: Any) -> None:
        raise NotImplementedError

    def logs(self, store: Any, row: Any, follow: bool, out: TextIO) -> int:
        raise NotImplementedError


_CACHE: Dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name not in _CACHE:
        if name == "local":
            from jobman.backends.local import LocalBackend
            _CACHE[name] = LocalBackend()
        elif name == "skypilot":
            from jobman.backends.skypilot import SkyPilotBackend
            _CACHE[name] = SkyPilotBackend()
        elif name == "slurm":
            from jobman.backends.slurm import SlurmBackend
            _CACHE[name] = SlurmBackend()
        else:
            raise UsageError("unknown backend %r (choose local, skypilot or slurm)" % name)
    return _CACHE[name]
