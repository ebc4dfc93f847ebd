"""The library behind the CLI: submit, cancel, requeue, wait, refresh, logs.

Invariants (see `jobman.store` for the transactions):

* A job row and the process responsible for it are created in one transaction: the row is
  inserted, the runner (local) or launcher (remote, when it must wait for dependencies) is
  spawned and its pid recorded, then the transaction commits. A submitter killed before the
  commit leaves no row (the orphan runner finds no matching token and exits); killed after it,
  the job is complete in the database and its runner is already running in its own session.
* Any command first reconciles: an active job whose responsible process is gone (and which the
  engine does not own yet) becomes NODE_FAIL, and its leftover processes are killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO

from jobman import proc
from jobman.accelerators import parse_accelerator
from jobman.backends import get_backend
from jobman.errors import UsageError
from jobman.spec import BACKENDS, JobSpec
from jobman.store import (ACTIVE_STATES, CANCELLED, COMPLETED, NODE_FAIL, PENDING, TERMINAL_STATES, Store,
                          row_deps, row_spec)

__all__ = ["JobSpec", "Store", "submit", "cancel", "requeue", "wait", "reconcile", "refresh", "logs",
           "exit_status", "default_backend", "resolve_refs"]


def _hook(point: str) -> None:
    """Test hook: with JOBMAN_TEST_HOOK=<point>, announce the point on stderr and stop there, so
    a test can kill -9 the CLI at exactly that moment. Never set outside tests."""
    if os.environ.get("JOBMAN_TEST_HOOK") == point:
        sys.stderr.write("JOBMAN_HOOK %s\n" % point)
        sys.stderr.flush()
        while True:
            time.sleep(1)


def poll_interval() -> float:
    return float(os.environ.get("JOBMAN_POLL", "0.2"))


def default_backend(spec: JobSpec, home: Optional[Path] = None) -> str:
    """Per job (--backend), else $JOBMAN_BACKEND, else ``backend:`` in $JOBMAN_HOME/config.yaml,
    else skypilot for a job that asks for an accelerator and local otherwise."""
    if spec.backend:
        return spec.backend
    env = os.environ.get("JOBMAN_BACKEND")
    if env:
        if env not in BACKENDS:
            raise UsageError("JOBMAN_BACKEND=%r is not one of %s" % (env, ", ".join(BACKENDS)))
        return env
    cfg = (Path(home) if home else Path(os.environ.get("JOBMAN_HOME") or Path.home() / ".jobman")) / "config.yaml"
    if cfg.is_file():
        try:
            import yaml  # the kit's base requirements include pyyaml

            data = yaml.safe_load(cfg.read_text()) or {}
        except Exception as e:  # malformed config is the user's to fix
            raise UsageError("cannot read %s: %s" % (cfg, e))
        b = data.get("backend") if isinstance(data, dict) else None
        if b:
            if b not in BACKENDS:
                raise UsageError("%s: backend %r is not one of %s" % (cfg, b, ", ".join(BACKENDS)))
            return str(b)
    return "skypilot" if spec.accelerator else "local"


def resolve_refs(store: Store, refs: Iterable[str]) -> List[Any]:
    rows: List[Any] = []
    seen = set()
    for ref in refs:
        found = store.resolve(str(ref))
        if not found:
            raise UsageError("no such job: %s" % ref)
        for r in found:
            if r["id"] not in seen:
                seen.add(r["id"])
                rows.append(r)
    return rows


def _job_name(spec: JobSpec) -> str:
    if spec.name:
        return spec.name
    if spec.script_name:
        return os.path.basename(spec.script_name)
    return os.path.basename(spec.argv[0]) if spec.argv else "job"


# ----------------------------------------------------------------------------------------------
# submit


def submit(spec: JobSpec, store: Optional[Store] = None) -> List[int]:
    """Record and start a job (or one job per array task). Returns the job ids (the first is the
    array id for an array). Raises UsageError for bad input before anything is recorded."""
    own = store is None
    store = store or Store()
    try:
        return _submit(store, spec)
    finally:
        if own:
            store.close()


def _submit(store: Store, spec: JobSpec) -> List[int]:
    backend_name = default_backend(spec, store.home)
    spec.backend = backend_name
    backend = get_backend(backend_name)
    parse_accelerator(spec.accelerator)
    backend.validate(spec)
    if not spec.submit_dir:
        spec.submit_dir = os.getcwd()
    # dependencies must name jobs that exist (checked again inside the transaction)
    dep_rows = {ref: store.resolve(ref) for _, ref in spec.dependencies}
    for ref, found in dep_rows.items():
        if not found:
            raise UsageError("dependency on job %s, which does not exist" % ref)
    tasks: List[Optional[int]] = list(spec.array) if spec.array is not None else [None]
    name = _job_name(spec)
    deps = [list(d) for d in spec.dependencies]
    needs_launcher = backend_name != "local" and bool(spec.dependencies) and not _engine_handles_deps(store, spec)
    me, me_start = os.getpid(), proc.pid_start(os.getpid())
    ids: List[int] = []
    with store.tx() as conn:
        array_id: Optional[int] = None
        for t in tasks:
            token = uuid.uuid4().hex
            jid = store.insert_job(conn, name=name, backend=backend_name, spec=spec.to_dict(), deps=deps,
                                   max_retries=spec.retries, array_task=t, token=token)
            if t is not None:
                if array_id is None:
                    array_id = jid
                store.update(conn, jid, array_id=array_id)
            store.update(conn, jid, log_path=str(_log_path(store, jid, backend_name)))
            ids.append(jid)
        if backend_name == "local":
            for jid in ids:
                row = store.get(jid)
                pid, start = proc.spawn_detached(
                    proc.runner_argv(store.home, [jid], row["token"], me, me_start),
                    store.home / "logs" / ("%d.runner.log" % jid), cwd=spec.submit_dir)
                store.update(conn, jid, runner_pid=pid, runner_start=start)
        elif needs_launcher:
            token = store.get(ids[0])["token"]
            pid, start = proc.spawn_detached(
                proc.runner_argv(store.home, ids, token, me, me_start),
                store.home / "logs" / ("%d.runner.log" % ids[0]), cwd=spec.submit_dir)
            for jid in ids:
                store.update(conn, jid, runner_pid=pid, runner_start=start, token=token)
        else:
            # this very process hands the job to the engine right after the commit; if it dies
            # first, reconcile sees a dead submitter and no backend id and marks NODE_FAIL
            for jid in ids:
                store.update(conn, jid, runner_pid=me, runner_start=me_start)
        _hook("submit:before_commit")
    _hook("submit:after_commit")
    if backend_name != "local" and not needs_launcher:
        rows = [store.get(j) for j in ids]
        try:
            backend.launch(store, rows)
        except BaseException as e:
            with store.tx() as conn:
                for j in ids:
                    store.set_state(conn, j, "FAILED", reason="submit failed: %s" % _one_line(e))
            raise
    return ids


def _engine_handles_deps(store: Store, spec: JobSpec) -> bool:
    """Slurm enforces dependencies itself when every dependency is a Slurm job it knows."""
    if spec.backend != "slurm":
        return False
    for _, ref in spec.dependencies:
        for r in store.resolve(ref):
            if r["backend"] != "slurm" or not r["backend_id"]:
                return False
    return True


def _log_path(store: Store, jid: int, backend: str) -> Path:
    return store.home / "logs" / ("%d.out" % jid)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# ----------------------------------------------------------------------------------------------
# reconcile / refresh


def reconcile(store: Store) -> None:
    """Mark active jobs whose responsible process died as NODE_FAIL (never RUNNING forever)."""
    rows = store.jobs("state IN (%s) AND runner_pid IS NOT NULL" % ",".join("?" * len(ACTIVE_STATES)),
                      ACTIVE_STATES)
    for row in rows:
        if row["backend"] != "local" and row["backend_id"]:
            continue  # the engine owns it now
        if proc.alive(row["runner_pid"], row["runner_start"]):
            continue
        with store.tx() as conn:
            cur = store.get(row["id"])
            if cur is None or cur["state"] not in ACTIVE_STATES or cur["runner_pid"] != row["runner_pid"]:
                continue
            if cur["backend"] != "local" and cur["backend_id"]:
                continue
            what = "runner" if cur["backend"] == "local" else "submitter"
            store.set_state(conn, cur["id"], NODE_FAIL,
                            reason="%s process %d died" % (what, cur["runner_pid"]))
            now = time.time()
            for a in store.attempts(cur["id"]):
                if a["end_time"] is None:
                    proc.kill_group(a["pid"], a["pid_start"])
                    conn.execute("UPDATE attempts SET end_time=?, note=? WHERE job_id=? AND attempt=?",
                                 (now, "runner died", cur["id"], a["attempt"]))


def refresh(store: Store, rows: Optional[Sequence[Any]] = None) -> None:
    """Reconcile local jobs and pull the engines' state of active remote jobs."""
    reconcile(store)
    if rows is None:
        rows = store.jobs("state IN (%s)" % ",".join("?" * len(ACTIVE_STATES)), ACTIVE_STATES)
    else:
        rows = [store.get(r["id"]) for r in rows]
    by_backend: Dict[str, List[Any]] = {}
    for r in rows:
        if r is not None and r["state"] in ACTIVE_STATES and r["backend"] != "local" and r["backend_id"]:
            by_backend.setdefault(r["backend"], []).append(r)
    for name, rs in by_backend.items():
        get_backend(name).refresh(store, rs)


# ----------------------------------------------------------------------------------------------
# cancel / requeue


def cancel(refs: Sequence[str], store: Optional[Store] = None) -> List[int]:
    """Cancel jobs (an array id cancels all its tasks). Returns the ids that were active."""
    own = store is None
    store = store or Store()
    try:
        rows = resolve_refs(store, refs)
        done: List[int] = []
        for row in rows:
            if row["state"] not in ACTIVE_STATES:
                continue
            if row["backend"] != "local" and row["backend_id"]:
                get_backend(row["backend"]).cancel(store, row)
            with store.tx() as conn:
                moved = store.set_state(conn, row["id"], CANCELLED, reason="cancelled by %s" % _user())
            if moved:
                done.append(row["id"])
                if row["backend"] == "local":
                    for a in store.attempts(row["id"]):
                        if a["end_time"] is None:
                            proc.signal_group(a["pid"], a["pid_start"], signal.SIGTERM)
        return done
    finally:
        if own:
            store.close()


def requeue(refs: Sequence[str], store: Optional[Store] = None) -> List[int]:
    """Put finished jobs back in the queue (Slurm's ``scontrol requeue``). Attempt numbers keep
    counting; the retry budget starts afresh."""
    own = store is None
    store = store or Store()
    try:
        reconcile(store)
        rows = resolve_refs(store, refs)
        for row in rows:
            if row["state"] not in TERMINAL_STATES:
                raise UsageError("job %d is %s; only finished jobs can be requeued (cancel it first)"
                                 % (row["id"], row["state"]))
        me, me_start = os.getpid(), proc.pid_start(os.getpid())
        out: List[int] = []
        remote: List[Any] = []
        with store.tx() as conn:
            for row in rows:
                token = uuid.uuid4().hex
                fields: Dict[str, Any] = dict(exit_code=None, signal=None, start_time=None, end_time=None,
                                              run_base=row["attempts"], token=token)
                if row["backend"] != "slurm":
                    fields["backend_id"] = None
                if not store.set_state(conn, row["id"], PENDING, reason="requeued", only_from=TERMINAL_STATES,
                                       **fields):
                    continue
                out.append(row["id"])
                if row["backend"] == "local":
                    pid, start = proc.spawn_detached(
                        proc.runner_argv(store.home, [row["id"]], token, me, me_start),
                        store.home / "logs" / ("%d.runner.log" % row["id"]), cwd=row_spec(row).get("submit_dir"))
                else:
                    pid, start = me, me_start
                    remote.append(row)
                store.update(conn, row["id"], runner_pid=pid, runner_start=start)
        for row in remote:
            b = get_backend(row["backend"])
            if row["backend"] == "slurm" and row["backend_id"]:
                b.requeue(store, store.get(row["id"]))  # type: ignore[attr-defined]
            else:
                b.launch(store, [store.get(row["id"])])
        return out
    finally:
        if own:
            store.close()


def _user() -> str:
    from jobman.store import current_user

    return current_user()


# ----------------------------------------------------------------------------------------------
# wait / exit status / logs


def exit_status(row: Any) -> int:
    """The job's own exit status, as a shell would see it: 0 for COMPLETED; the last attempt's
    exit code; 128+signal if a signal ended it; 1 otherwise (cancelled before running, lost)."""
    if row["state"] == COMPLETED:
        return 0
    if row["exit_code"] is not None and row["exit_code"] != 0:
        return int(row["exit_code"])
    if row["signal"]:
        return 128 + int(row["signal"])
    return 1


def wait(ids: Sequence[int], store: Optional[Store] = None, timeout: Optional[float] = None) -> int:
    """Block until every job is finished; return the highest exit status among them (like
    ``sbatch --wait`` for arrays). Safe to kill at any moment: it only reads and reconciles."""
    own = store is None
    store = store or Store()
    try:
        deadline = None if timeout is None else time.time() + timeout
        interval = poll_interval()
        remote_every = float(os.environ.get("JOBMAN_REMOTE_POLL", "15"))
        last_remote = 0.0
        while True:
            rows = [store.get(int(i)) for i in ids]
            if any(r is None for r in rows):
                raise UsageError("no such job among %s" % ", ".join(str(i) for i in ids))
            if all(r["state"] in TERMINAL_STATES for r in rows):
                return max(exit_status(r) for r in rows)
            reconcile(store)
            if any(r["backend"] != "local" for r in rows) and time.time() - last_remote >= remote_every:
                refresh(store, rows)
                last_remote = time.time()
            if deadline is not None and time.time() > deadline:
                raise TimeoutError("jobs %s still running" % ", ".join(str(i) for i in ids))
            time.sleep(interval if all(r["backend"] == "local" for r in rows) else min(remote_every, 5.0))
    finally:
        if own:
            store.close()


def logs(ref: str, follow: bool = False, out: Optional[TextIO] = None, store: Optional[Store] = None) -> int:
    own = store is None
    store = store or Store()
    out = out or sys.stdout
    try:
        rows = resolve_refs(store, [ref])
        if len(rows) != 1:
            raise UsageError("%s is an array of %d tasks; name one task as %s_<task>" % (ref, len(rows), ref))
        row = rows[0]
        return get_backend(row["backend"]).logs(store, row, follow, out)
    finally:
        if own:
            store.close()


def dependency_state(store: Store, deps: Sequence[Sequence[str]]) -> str:
    """'ok' when all dependencies hold, 'wait' while some may still hold, 'never' when one cannot."""
    result = "ok"
    for kind, ref in deps:
        rows = store.resolve(ref)
        if not rows:
            return "never"
        for r in rows:
            st = r["state"]
            if kind == "afterok":
                if st == COMPLETED:
                    continue
                if st in TERMINAL_STATES:
                    return "never"
                result = "wait"
            elif kind == "afterany":
                if st not in TERMINAL_STATES:
                    result = "wait"
            elif kind == "afternotok":
                if st == COMPLETED:
                    return "never"
                if st not in TERMINAL_STATES:
                    result = "wait"
    return result


def describe(row: Any, store: Store) -> Dict[str, Any]:
    """A JSON-able view of one job for ``show``/``acct --json`` (no secret values exist to leak)."""
    d = {k: row[k] for k in row.keys() if k not in ("token", "spec", "deps")}
    d["spec"] = row_spec(row)
    d["dependencies"] = row_deps(row)
    d["attempt_list"] = [dict(a) for a in store.attempts(row["id"])]
    return d


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
