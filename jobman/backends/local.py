"""The local backend: jobs run as real processes on this machine, driven by `jobman.runner`.

Used by the tests and on a single GPU box. Dependencies, arrays (with a %N limit), retries,
cancel and logs are all honoured; state lives in the same database as every other backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, List, Optional, TextIO

from jobman.accelerators import parse_accelerator
from jobman.backends import Backend
from jobman.errors import UsageError
from jobman.store import TERMINAL_STATES


class LocalBackend(Backend):
    name = "local"

    def validate(self, spec: Any) -> None:
        acc = parse_accelerator(spec.accelerator)
        if acc is not None and acc.is_tpu:
            raise UsageError("the local backend cannot provide TPU %s; use --backend skypilot" % acc)
        if spec.nodes and spec.nodes > 1:
            raise UsageError("the local backend runs on one node; --nodes %d needs skypilot or slurm" % spec.nodes)
        if spec.image:
            raise UsageError("the local backend does not run containers; --image needs skypilot or slurm")

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        import shlex

        if spec.script is not None:
            return "# script %s, run as: %s\n%s" % (spec.script_name, shlex.join(["<script>"] + spec.argv[1:]),
                                                    spec.script)
        return shlex.join(spec.argv) + "\n"

    def launch(self, store: Any, rows: List[Any]) -> None:  # pragma: no cover - runner does it
        raise RuntimeError("local jobs are started by jobman.runner")

    def refresh(self, store: Any, rows: List[Any]) -> None:
        from jobman.api import reconcile

        reconcile(store)

    def cancel(self, store: Any, row: Any) -> None:
        pass  # api.cancel marks the row; the runner sees it and signals the process group

    def logs(self, store: Any, row: Any, follow: bool, out: TextIO) -> int:
        return follow_file(store, row, follow, out)


def follow_file(store: Any, row: Any, follow: bool, out: TextIO, refresh_every: Optional[float] = None) -> int:
    """Print the job's log file; with `follow`, keep printing until the job has finished and
    everything it wrote is out. Remote jobs (Slurm) are refreshed every `refresh_every` s."""
    from jobman.api import poll_interval, reconcile, refresh

    path = Path(row["log_path"])
    pos = 0
    last = 0.0
    while True:
        if path.exists():
            with open(path, "r", errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        if not follow:
            return 0
        if refresh_every is not None and time.time() - last >= refresh_every:
            refresh(store, [row])
            last = time.time()
        else:
            reconcile(store)
        cur = store.get(row["id"])
        if cur["state"] in TERMINAL_STATES:
            if path.exists() and os.path.getsize(path) > pos:
                continue  # drain what the job wrote after our last read
            return 0
        time.sleep(poll_interval() if refresh_every is None else 1.0)
