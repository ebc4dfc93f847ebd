"""The job database: one SQLite file in WAL mode under ``$JOBMAN_HOME``.

Every write is a short ``BEGIN IMMEDIATE`` transaction and every state change is a conditional
``UPDATE ... WHERE state IN (allowed sources)``, so concurrent CLIs, runners and reconcilers can
race without corrupting a job: the loser's update matches no row. Killing any process at any
moment leaves either the old committed state or the new one.
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

PENDING = "PENDING"
RUNNING = "RUNNING"
RECOVERING = "RECOVERING"  # the engine is re-provisioning after a preemption (SkyPilot)
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMEOUT = "TIMEOUT"  # ran past its time limit (Slurm --time)
OUT_OF_MEMORY = "OUT_OF_MEMORY"  # killed for exceeding its memory limit (Slurm)
NODE_FAIL = "NODE_FAIL"  # the thing running the job died (local runner killed, node down, controller lost)

ACTIVE_STATES = (PENDING, RUNNING, RECOVERING)
TERMINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL)
ALL_STATES = ACTIVE_STATES + TERMINAL_STATES

# target state -> states it may be entered from. Terminal states are left only for PENDING (a requeue).
TRANSITIONS: Dict[str, Sequence[str]] = {
    PENDING: (RUNNING, RECOVERING) + TERMINAL_STATES,
    RUNNING: (PENDING, RECOVERING, RUNNING),
    RECOVERING: (PENDING, RUNNING),
    **{s: ACTIVE_STATES for s in TERMINAL_STATES},
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    user TEXT NOT NULL,
    backend TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    submit_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    exit_code INTEGER,
    signal INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_base INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 0,
    array_id INTEGER,
    array_task INTEGER,
    spec TEXT NOT NULL,
    deps TEXT NOT NULL DEFAULT '[]',
    backend_id TEXT,
    runner_pid INTEGER,
    runner_start TEXT,
    token TEXT,
    log_path TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_array ON jobs(array_id);
CREATE TABLE IF NOT EXISTS attempts (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    attempt INTEGER NOT NULL,
    start_time REAL,
    end_time REAL,
    exit_code INTEGER,
    signal INTEGER,
    pid INTEGER,
    pid_start TEXT,
    note TEXT,
    PRIMARY KEY (job_id, attempt)
);
"""


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return str(os.getuid())


def _retry_locked(operation, seconds: float = 60.0):
    """Two processes opening a fresh database at once both switch it to WAL; SQLite answers the
    loser "database is locked" at once, without waiting on the busy timeout, so we wait ourselves."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


class Store:
    """A connection to the job database. Cheap to open; open one per command or process."""

    def __init__(self, home: Optional[Path] = None):
        self.home = Path(home if home is not None else
                         os.environ.get("JOBMAN_HOME") or os.path.join(os.path.expanduser("~"), ".jobman"))
        for d in (self.home, self.home / "logs", self.home / "jobs"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.home / "jobman.db"
        self.conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout=60000")
        mode = _retry_locked(lambda: self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            raise RuntimeError("could not put %s in WAL mode (got %s)" % (self.path, mode))
        self.conn.execute("PRAGMA synchronous=FULL")
        _retry_locked(lambda: self.conn.executescript(SCHEMA))  # idempotent; autocommit mode
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so it cannot deadlock later."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def write_script(self, job_id: int, text: str) -> Path:
        """The copy of a job's script taken at submit time, as a file the job runs (0700)."""
        path = self.home / "jobs" / str(job_id) / "script"
        path.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
        return path

    def get(self, job_id: int) -> Optional[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

    def jobs(self, where: str = "1", params: Sequence[Any] = ()) -> List[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM jobs WHERE %s ORDER BY id" % where, tuple(params)))

    def attempts(self, job_id: int) -> List[sqlite3.Row]:
        return list(self.conn.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY attempt", (job_id,)))

    def resolve(self, ref: str) -> List[sqlite3.Row]:
        """``12`` -> job 12, or all tasks of array 12; ``12_3`` -> task 3 of array 12. [] if none."""
        a, sep, t = str(ref).strip().partition("_")
        if not a.isdigit() or (sep and not t.isdigit()):
            return []
        if sep:
            return self.jobs("array_id=? AND array_task=?", (int(a), int(t)))
        tasks = self.jobs("array_id=?", (int(a),))
        if tasks:
            return tasks
        row = self.get(int(a))
        return [row] if row is not None else []

    def insert_job(self, conn: sqlite3.Connection, *, name: str, backend: str, spec: Dict[str, Any],
                   deps: List[Any], max_retries: int, array_task: Optional[int] = None,
                   token: Optional[str] = None) -> int:
        cur = conn.execute(
            "INSERT INTO jobs (name, user, backend, state, submit_time, max_retries, array_task, spec, deps, token)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (name, current_user(), backend, PENDING, time.time(), max_retries, array_task,
             json.dumps(spec, sort_keys=True), json.dumps(deps), token))
        return int(cur.lastrowid)

    def set_state(self, conn: sqlite3.Connection, job_id: int, dst: str, *, reason: Optional[str] = None,
                  only_from: Optional[Sequence[str]] = None, **fields: Any) -> bool:
        """Move a job to `dst` if its current state allows it; returns whether it moved."""
        sources = [s for s in TRANSITIONS[dst] if only_from is None or s in only_from]
        if not sources:
            return False
        sets = ["state=?", "reason=?"] + ["%s=?" % k for k in fields]
        vals: List[Any] = [dst, reason] + list(fields.values())
        if dst in TERMINAL_STATES and "end_time" not in fields:
            sets.append("end_time=COALESCE(end_time, ?)")
            vals.append(time.time())
        q = "UPDATE jobs SET %s WHERE id=? AND state IN (%s)" % (", ".join(sets), ",".join("?" * len(sources)))
        return conn.execute(q, vals + [job_id] + sources).rowcount == 1

    def update(self, conn: sqlite3.Connection, job_id: int, **fields: Any) -> None:
        sets = ", ".join("%s=?" % k for k in fields)
        conn.execute("UPDATE jobs SET %s WHERE id=?" % sets, list(fields.values()) + [job_id])


def row_spec(row: sqlite3.Row) -> Dict[str, Any]:
    return json.loads(row["spec"])


def row_deps(row: sqlite3.Row) -> List[Any]:
    return json.loads(row["deps"] or "[]")


def display_id(row: sqlite3.Row) -> str:
    """Slurm style: ``12`` for a plain job, ``12_3`` for task 3 of array 12."""
    if row["array_id"] is not None:
        return "%d_%d" % (row["array_id"], row["array_task"])
    return str(row["id"])
