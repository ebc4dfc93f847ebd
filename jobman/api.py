"""The library behind the CLI: submit, cancel, requeue, refresh, wait, logs. Everything here is
shared by the backends, which are only asked to talk to their engines (`jobman.backends`).

Invariants (see `jobman.store` for the transactions):

* A job row and the process responsible for it are created in one transaction: the row is
  inserted, the runner (local) or launcher (remote, when it must wait for dependencies) is
  spawned and its pid recorded, then the transaction commits. A submitter killed before the
  commit leaves no row (the orphan runner finds no matching token and exits); killed after it,
  the job is complete in the database and its runner is already running in its own session.
* Any command first reconciles: an active job whose responsible process is gone and which no
  engine owns becomes NODE_FAIL (its leftover processes are killed), unless the engine accepted it
  in the instant before the submitter died: then the job is adopted from the engine.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO

from jobman import proc
from jobman.accelerators import parse_accelerator
from jobman.backends import Backend
from jobman.errors import BackendError, UsageError
from jobman.spec import BACKENDS, JobSpec
from jobman.store import (ACTIVE_STATES, CANCELLED, COMPLETED, FAILED, NODE_FAIL, PENDING, RUNNING, TERMINAL_STATES,
                          Store, current_user, row_spec)

__all__ = ["JobSpec", "Store", "submit", "cancel", "requeue", "wait", "refresh", "logs"]


def hook(point: str) -> None:
    """Test hook: with JOBMAN_TEST_HOOK=<point>, announce the point on stderr and stop there, so
    a test can kill -9 the process at exactly that moment. Never set outside tests."""
    if os.environ.get("JOBMAN_TEST_HOOK") == point:
        sys.stderr.write("JOBMAN_HOOK %s\n" % point)
        sys.stderr.flush()
        while True:
            time.sleep(1)


def poll_interval() -> float:
    return float(os.environ.get("JOBMAN_POLL", "0.2"))


def remote_interval() -> float:
    """Seconds between two questions to a remote engine (sacct, sky jobs queue) while waiting."""
    return float(os.environ.get("JOBMAN_REMOTE_POLL", "15"))


_BACKENDS: Dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend object for `name`; each engine's module is imported on first use only."""
    if name not in _BACKENDS:
        if name == "local":
            from jobman.backends.local import LocalBackend as cls
        elif name == "skypilot":
            from jobman.backends.skypilot import SkyPilotBackend as cls
        elif name == "slurm":
            from jobman.backends.slurm import SlurmBackend as cls
        else:
            raise UsageError("unknown backend %r (choose %s)" % (name, ", ".join(BACKENDS)))
        _BACKENDS[name] = cls()
    return _BACKENDS[name]


@contextmanager
def _opened(store: Optional[Store]) -> Iterator[Store]:
    if store is not None:
        yield store
    else:
        with Store() as s:
            yield s


def default_backend(spec: JobSpec, home: Optional[Path] = None) -> str:
    """Per job (--backend), else $JOBMAN_BACKEND, else ``backend:`` in $JOBMAN_HOME/config.yaml,
    else skypilot for a job that asks for an accelerator and local otherwise."""
    if spec.backend:
        return spec.backend
    choice, source = os.environ.get("JOBMAN_BACKEND"), "JOBMAN_BACKEND"
    cfg = Path(home or os.environ.get("JOBMAN_HOME") or Path.home() / ".jobman") / "config.yaml"
    if not choice and cfg.is_file():
        import yaml  # the kit's base requirements include pyyaml

        try:
            data = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError("cannot read %s: %s" % (cfg, str(e).replace("\n", " ")))
        choice, source = data.get("backend") if isinstance(data, dict) else None, str(cfg)
    if choice and choice not in BACKENDS:
        raise UsageError("%s: backend %r is not one of %s" % (source, choice, ", ".join(BACKENDS)))
    return choice or ("skypilot" if spec.accelerator else "local")


def resolve_refs(store: Store, refs: Iterable[str]) -> List[Any]:
    rows: Dict[int, Any] = {}
    for ref in refs:
        found = store.resolve(str(ref))
        if not found:
            raise UsageError("no such job: %s" % ref)
        rows.update((r["id"], r) for r in found)
    return list(rows.values())


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# ----------------------------------------------------------------------------------------------
# submit


def submit(spec: JobSpec, store: Optional[Store] = None) -> List[int]:
    """Record and start a job (or one job per array task). Returns the job ids (the first is the
    array id for an array). Raises UsageError for bad input before anything is recorded."""
    with _opened(store) as s:
        return _submit(s, spec)


def _submit(store: Store, spec: JobSpec) -> List[int]:
    spec.backend = default_backend(spec, store.home)
    parse_accelerator(spec.accelerator)
    get_backend(spec.backend).validate(spec)
    spec.submit_dir = spec.submit_dir or os.getcwd()
    for _, ref in spec.dependencies:
        if not store.resolve(ref):
            raise UsageError("dependency on job %s, which does not exist" % ref)
    name = spec.name or os.path.basename(spec.script_name or (spec.argv[0] if spec.argv else "job"))
    remote = spec.backend != "local"
    missing = [k for k in spec.secrets if k not in os.environ]
    if remote and missing:  # an engine takes the value from this very environment
        raise UsageError("secret %s is not set in this shell's environment" % missing[0])
    needs_launcher = remote and bool(spec.dependencies) and not _engine_knows_deps(store, spec)
    token = uuid.uuid4().hex  # the runners or the launcher claim the rows with it; Slurm carries it too
    ids: List[int] = []
    with store.tx() as conn:
        for t in spec.array if spec.array is not None else [None]:
            jid = store.insert_job(conn, name=name, backend=spec.backend, spec=spec.to_dict(), max_retries=spec.retries,
                                   deps=[list(d) for d in spec.dependencies], array_task=t, token=token)
            store.update(conn, jid, log_path=str(store.home / "logs" / ("%d.out" % jid)),
                         array_id=None if t is None else (ids[0] if ids else jid))
            ids.append(jid)
        if not remote:
            for jid in ids:
                _spawn_runner(store, conn, [jid], token, spec.submit_dir)
        elif needs_launcher:
            _spawn_runner(store, conn, ids, token, spec.submit_dir)
        else:
            # this very process hands the job to the engine right after the commit; if it dies
            # first, reconcile sees a dead submitter and no engine id
            me = os.getpid()
            for jid in ids:
                store.update(conn, jid, runner_pid=me, runner_start=proc.pid_start(me))
        hook("submit:before_commit")
    hook("submit:after_commit")
    if remote and not needs_launcher:
        launch(store, [store.get(j) for j in ids])
    return ids


def _engine_knows_deps(store: Store, spec: JobSpec) -> bool:
    """Slurm enforces dependencies itself when every dependency is a Slurm job it has accepted."""
    return spec.backend == "slurm" and all(r["backend"] == "slurm" and r["backend_id"]
                                           for _, ref in spec.dependencies for r in store.resolve(ref))


def _spawn_runner(store: Store, conn: Any, ids: List[int], token: str, cwd: Optional[str]) -> None:
    me = os.getpid()
    pid, start = proc.spawn_detached(proc.runner_argv(store.home, ids, token, me, proc.pid_start(me)),
                                     store.home / "logs" / ("%d.runner.log" % ids[0]), cwd=cwd)
    for jid in ids:
        store.update(conn, jid, runner_pid=pid, runner_start=start)


def launch(store: Store, rows: List[Any]) -> None:
    """Hand one submission to its engine, recording each engine id as it comes. Rows the engine
    did not take become FAILED; rows cancelled meanwhile are cancelled on the engine too."""
    backend = get_backend(rows[0]["backend"])
    try:
        for jid, fields in backend.launch(store, rows):
            with store.tx() as conn:
                store.update(conn, jid, **fields)
                hook("launch:recording")  # a kill here is a kill in the middle of the store's write
    except BaseException as e:
        with store.tx() as conn:
            for r in rows:
                if not store.get(r["id"])["backend_id"]:
                    store.set_state(conn, r["id"], FAILED, reason="submit failed: %s" % _one_line(e))
        raise
    for r in rows:
        cur = store.get(r["id"])
        if cur["state"] == CANCELLED and cur["backend_id"]:
            backend.cancel(cur)


# ----------------------------------------------------------------------------------------------
# reconcile / refresh


def reconcile(store: Store) -> None:
    """An active job whose responsible process died before an engine took it over is adopted
    from the engine if the engine has it, and otherwise marked NODE_FAIL."""
    for row in store.jobs("state IN (%s) AND runner_pid IS NOT NULL AND backend_id IS NULL"
                          % ",".join("?" * len(ACTIVE_STATES)), ACTIVE_STATES):
        if proc.alive(row["runner_pid"], row["runner_start"]):
            continue
        adopted = None
        if row["backend"] != "local":
            try:
                adopted = get_backend(row["backend"]).adopt(store, row)
            except BackendError:
                continue  # the engine cannot be asked now; the next command tries again
        with store.tx() as conn:
            cur = store.get(row["id"])
            if cur["state"] not in ACTIVE_STATES or cur["runner_pid"] != row["runner_pid"] or cur["backend_id"]:
                continue
            if adopted:
                store.update(conn, cur["id"], **adopted)
                continue
            what = "runner" if cur["backend"] == "local" else "submitter"
            store.set_state(conn, cur["id"], NODE_FAIL, reason="%s process %d died" % (what, cur["runner_pid"]))
            for a in store.attempts(cur["id"]):
                if a["end_time"] is None:
                    proc.kill_group(a["pid"], a["pid_start"])
                    conn.execute("UPDATE attempts SET end_time=?, note=? WHERE job_id=? AND attempt=?",
                                 (time.time(), "runner died", cur["id"], a["attempt"]))


def refresh(store: Store, rows: Optional[Sequence[Any]] = None) -> None:
    """Reconcile, then read the engines' view of active jobs into the database. Raises
    BackendError when an engine cannot be asked (what was stored stays as it was)."""
    reconcile(store)
    rows = [store.get(r["id"]) for r in rows] if rows is not None else store.jobs(
        "state IN (%s)" % ",".join("?" * len(ACTIVE_STATES)), ACTIVE_STATES)
    by_backend: Dict[str, List[Any]] = {}
    for r in rows:
        if r["state"] in ACTIVE_STATES and r["backend_id"]:
            by_backend.setdefault(r["backend"], []).append(r)
    for name, rs in by_backend.items():
        records = get_backend(name).poll(rs)
        for r in rs:
            if r["backend_id"] in records:
                _apply(store, r, records[r["backend_id"]])


def _apply(store: Store, row: Any, rec: Dict[str, Any]) -> None:
    state = rec["state"]
    keys = ("start_time", "attempts") + (("end_time", "exit_code", "signal") if state in TERMINAL_STATES else ())
    fields = {k: rec[k] for k in keys if rec.get(k) is not None}
    if state == COMPLETED:
        fields.setdefault("exit_code", 0)
    reason = None if state in (COMPLETED, RUNNING) else rec.get("reason")
    with store.tx() as conn:
        if row["state"] != state:
            store.set_state(conn, row["id"], state, reason=reason, only_from=ACTIVE_STATES, **fields)
        else:
            store.update(conn, row["id"], reason=reason, **fields)


def refresh_or_warn(store: Store, rows: Optional[Sequence[Any]] = None, err: TextIO = sys.stderr) -> None:
    """refresh() for commands that show jobs: an engine that cannot be asked (slurmctld
    restarting, say) leaves the states as last seen, with one line saying so."""
    try:
        refresh(store, rows)
    except BackendError as e:
        err.write("jobman: %s; showing states as last seen\n" % _one_line(e))


# ----------------------------------------------------------------------------------------------
# cancel / requeue


def cancel(refs: Sequence[str], store: Optional[Store] = None) -> List[int]:
    """Cancel jobs (an array id cancels all its tasks). Returns the ids that were active. A local
    job's runner sees the state and stops its process group."""
    with _opened(store) as s:
        done: List[int] = []
        for row in resolve_refs(s, refs):
            if row["state"] not in ACTIVE_STATES:
                continue
            if row["backend_id"]:
                get_backend(row["backend"]).cancel(row)
            with s.tx() as conn:
                if s.set_state(conn, row["id"], CANCELLED, reason="cancelled by %s" % current_user()):
                    done.append(row["id"])
        return done


def requeue(refs: Sequence[str], store: Optional[Store] = None) -> List[int]:
    """Put finished jobs back in the queue (Slurm's ``scontrol requeue``): Slurm requeues its own
    jobs in place, other remote jobs are launched anew, local ones get a new runner. Attempt
    numbers keep counting; the retry budget starts afresh."""
    with _opened(store) as s:
        reconcile(s)
        rows = resolve_refs(s, refs)
        for row in rows:
            if row["state"] not in TERMINAL_STATES:
                raise UsageError("job %d is %s; only finished jobs can be requeued (cancel it first)"
                                 % (row["id"], row["state"]))
        me = os.getpid()
        moved: List[int] = []
        with s.tx() as conn:
            for row in rows:
                token = uuid.uuid4().hex
                fields: Dict[str, Any] = dict(exit_code=None, signal=None, start_time=None, end_time=None,
                                              run_base=row["attempts"], token=token,
                                              runner_pid=me, runner_start=proc.pid_start(me))
                if not get_backend(row["backend"]).requeues_in_place:
                    fields["backend_id"] = None
                if not s.set_state(conn, row["id"], PENDING, reason="requeued", only_from=TERMINAL_STATES, **fields):
                    continue  # requeued by someone else meanwhile
                moved.append(row["id"])
                if row["backend"] == "local":
                    _spawn_runner(s, conn, [row["id"]], token, row_spec(row).get("submit_dir"))
        for jid in moved:
            row = s.get(jid)
            if row["backend_id"]:
                get_backend(row["backend"]).requeue(row)
            elif row["backend"] != "local":
                launch(s, [row])
        return moved


# ----------------------------------------------------------------------------------------------
# wait / exit status / logs


def exit_status(row: Any) -> int:
    """The job's own exit status, as a shell would see it: 0 for COMPLETED; the last attempt's
    exit code; 128+signal if a signal ended it; 1 otherwise (cancelled before running, lost)."""
    if row["state"] == COMPLETED:
        return 0
    if row["exit_code"]:
        return int(row["exit_code"])
    if row["signal"]:
        return 128 + int(row["signal"])
    return 1


def _keep_current(store: Store, rows: List[Any], last: float) -> float:
    """Between two polls: reconcile local jobs; ask remote engines every remote_interval()."""
    if all(r["backend"] == "local" for r in rows) or time.time() - last < remote_interval():
        reconcile(store)
        return last
    refresh_or_warn(store, rows)
    return time.time()


def wait(ids: Sequence[int], store: Optional[Store] = None, timeout: Optional[float] = None) -> int:
    """Block until every job is finished; return the highest exit status among them (like
    ``sbatch --wait`` for arrays). Safe to kill at any moment: it only reads and reconciles."""
    with _opened(store) as s:
        deadline = None if timeout is None else time.time() + timeout
        last = 0.0
        while True:
            rows = [s.get(int(i)) for i in ids]
            if any(r is None for r in rows):
                raise UsageError("no such job among %s" % ", ".join(str(i) for i in ids))
            if all(r["state"] in TERMINAL_STATES for r in rows):
                return max(exit_status(r) for r in rows)
            if deadline is not None and time.time() > deadline:
                raise TimeoutError("jobs %s still running" % ", ".join(str(i) for i in ids))
            last = _keep_current(s, rows, last)
            time.sleep(poll_interval())


def logs(ref: str, follow: bool = False, out: Optional[TextIO] = None, store: Optional[Store] = None) -> int:
    """Print a job's output; with `follow`, until the job has ended and all it wrote is out. The
    one follower of every backend that writes a file (local, Slurm: ``--output``)."""
    out = out or sys.stdout
    with _opened(store) as s:
        rows = resolve_refs(s, [ref])
        if len(rows) != 1:
            raise UsageError("%s is an array of %d tasks; name one task as %s_<task>" % (ref, len(rows), ref))
        row = rows[0]
        backend = get_backend(row["backend"])
        if backend.stream_logs is not None:
            return backend.stream_logs(row, follow, out)
        path, pos, last = row["log_path"], 0, 0.0
        while True:
            if os.path.exists(path):
                with open(path, "r", errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                out.write(chunk)
                out.flush()
            if not follow:
                return 0
            last = _keep_current(s, [row], last)
            row = s.get(row["id"])
            if row["log_path"] != path:  # the engine took the job and named its own file
                path, pos = row["log_path"], 0
            elif row["state"] in TERMINAL_STATES:
                if not (os.path.exists(path) and os.path.getsize(path) > pos):
                    return 0
                continue  # drain what the job wrote after our last read
            time.sleep(poll_interval())


def dependency_state(store: Store, deps: Sequence[Sequence[str]]) -> str:
    """'ok' when all dependencies hold, 'wait' while some may still hold, 'never' when one cannot."""
    result = "ok"
    for kind, ref in deps:
        rows = store.resolve(ref)
        if not rows:
            return "never"
        for r in rows:
            done, ok = r["state"] in TERMINAL_STATES, r["state"] == COMPLETED
            if (kind == "afterok" and done and not ok) or (kind == "afternotok" and ok):
                return "never"
            if not done:
                result = "wait"
    return result
