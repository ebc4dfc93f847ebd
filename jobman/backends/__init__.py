"""Engines behind one small interface. A backend only talks to its engine; the database, the
state machine, dependencies, waiting and log following are `jobman.api`'s, shared by all.

* ``validate(spec)`` / ``render(spec, job_id, array_task)``: refuse what the engine cannot run; the
  text ``jobman submit --dry-run`` prints.
* ``launch(store, rows)``: hand one submission (a job or an array) to the engine, yielding
  ``(job id, {"backend_id": ..., ...})`` as the engine accepts each; jobman records them. A row
  with a ``backend_id`` belongs to the engine from then on.
* ``poll(rows)``: the engine's view of those rows, ``{backend_id: record}``; a record holds
  ``state`` (a jobman state) and whichever of ``reason``, ``exit_code``, ``signal``,
  ``start_time``, ``end_time``, ``attempts`` the engine knows. Raises BackendError when the engine
  cannot be asked.
* ``cancel(row)``; ``requeue(row)`` where the engine requeues a finished job in place
  (``requeues_in_place``; elsewhere a requeued job is launched anew).
* ``adopt(store, row)``: the fields `launch` would have yielded for a job the engine accepted
  although its submitter died before recording them, or None.
* ``stream_logs(row, follow, out)``: only for engines that keep the output themselves.

The local backend has no engine calls: its jobs are run by `jobman.runner`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple


class Backend:
    name = "base"
    stream_logs = None
    requeues_in_place = False

    def validate(self, spec: Any) -> None:
        """Raise UsageError if this backend cannot run `spec`."""

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        raise NotImplementedError

    def launch(self, store: Any, rows: List[Any]) -> Iterator[Tuple[int, Dict[str, Any]]]:
        raise NotImplementedError

    def poll(self, rows: List[Any]) -> Dict[str, Dict[str, Any]]:
        return {}

    def cancel(self, row: Any) -> None:
        raise NotImplementedError

    def requeue(self, row: Any) -> None:
        raise NotImplementedError

    def adopt(self, store: Any, row: Any) -> Optional[Dict[str, Any]]:
        return None
