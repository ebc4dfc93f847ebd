"""The process responsible for a job until it finishes (local) or an engine owns it (remote).

``python -m jobman.runner --home H --token T --parent PID:START ID [ID...]`` is spawned by
`jobman.api` inside the transaction that creates the job rows, in its own session. It:

1. waits for that transaction (BEGIN IMMEDIATE blocks until the submitter commits or dies) and
   exits quietly if no row carries its token (the submitter was killed before committing);
2. waits for the dependencies (and the array's %N limit), or cancels the job with reason
   DependencyNeverSatisfied when they can no longer hold;
3. local: runs the user command as an argument vector (never through a shell string) in its own
   process group, appending stdout+stderr to the job's log, once plus up to ``retries`` times after
   a non-zero exit, watching the database for a cancel;
   remote: calls the backend's ``launch`` and exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from jobman import proc
from jobman.api import dependency_state, launch, poll_interval, refresh, remote_interval
from jobman.spec import JobSpec
from jobman.store import (ACTIVE_STATES, CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, Store, display_id,
                          row_deps, row_spec)

KILL_GRACE_S = 10.0


def _log(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write("[jobman %s] %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), text))


def _claim(store: Store, ids: List[int], token: str, parent: str) -> bool:
    """True once the submitter's transaction is committed with our token on every row."""
    ppid_s, _, pstart = parent.partition(":")
    while True:
        try:
            with store.tx():
                rows = [store.get(i) for i in ids]
            break
        except sqlite3.OperationalError as e:  # still locked after busy_timeout
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if not proc.alive(int(ppid_s), pstart or None):
                continue  # its lock is released by the OS: one more try will see the outcome
    return all(r is not None and r["token"] == token for r in rows)


def _wait_for_start(store: Store, row: Any) -> bool:
    """Wait for dependencies and the array limit, then move PENDING -> RUNNING (local) or stay
    PENDING for the engine (remote). False if the job was cancelled or can never start."""
    jid = row["id"]
    deps = row_deps(row)
    spec = row_spec(row)
    limit = spec.get("array_limit") if row["backend"] == "local" else None
    interval = poll_interval()
    last_remote = 0.0
    while True:
        cur = store.get(jid)
        if cur is None or cur["state"] != PENDING:
            return False
        state = dependency_state(store, deps)
        if state == "never":
            with store.tx() as conn:
                store.set_state(conn, jid, CANCELLED, reason="DependencyNeverSatisfied", only_from=(PENDING,))
            return False
        if state == "ok":
            if row["backend"] != "local":
                return True
            with store.tx() as conn:
                if limit and cur["array_id"] is not None:
                    n = conn.execute("SELECT COUNT(*) FROM jobs WHERE array_id=? AND state=?",
                                     (cur["array_id"], RUNNING)).fetchone()[0]
                    if n >= limit:
                        moved = None
                    else:
                        moved = store.set_state(conn, jid, RUNNING, only_from=(PENDING,), start_time=time.time())
                else:
                    moved = store.set_state(conn, jid, RUNNING, only_from=(PENDING,), start_time=time.time())
            if moved is not None:
                return bool(moved)
        elif any(r["backend"] != "local" for _, ref in deps for r in store.resolve(ref)):
            # dependencies on remote jobs change only when someone asks their engine
            if time.time() - last_remote >= remote_interval():
                try:
                    refresh(store)
                except Exception as e:  # engine unreachable: keep waiting, say why
                    sys.stderr.write("jobman runner: refresh failed: %s\n" % e)
                last_remote = time.time()
        time.sleep(interval)


def job_environment(row: Any, spec: Dict[str, Any], attempt: int) -> Dict[str, str]:
    """The environment of a local job: the runner's own (inherited from the submitting shell, so
    secrets are read from it now, at run time), the job's --env, and the JOBMAN_* variables."""
    env = dict(os.environ)
    env.pop("JOBMAN_TEST_HOOK", None)
    env.update(spec.get("env") or {})
    env.update({
        "JOBMAN_JOB_ID": display_id(row),
        "JOBMAN_JOB_NAME": row["name"],
        "JOBMAN_ATTEMPT": str(attempt),
        "JOBMAN_NODE_RANK": "0",
        "JOBMAN_NUM_NODES": "1",
        "JOBMAN_NODE_IPS": "127.0.0.1",
        "JOBMAN_COORDINATOR_ADDR": "127.0.0.1",
    })
    if row["array_id"] is not None:
        env["JOBMAN_ARRAY_JOB_ID"] = str(row["array_id"])
        env["JOBMAN_ARRAY_TASK_ID"] = str(row["array_task"])
    return env


def _run_local(store: Store, jid: int) -> None:
    row = store.get(jid)
    spec = row_spec(row)
    log_path = Path(row["log_path"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    max_attempts = int(row["max_retries"]) + 1
    base = int(row["run_base"])
    cwd = spec.get("workdir") or spec.get("submit_dir") or None
    missing = [s for s in spec.get("secrets") or [] if s not in os.environ]
    if missing:
        _log(log_path, "secret(s) %s not set in the environment of the submitting shell" % ", ".join(missing))
        with store.tx() as conn:
            store.set_state(conn, jid, FAILED, reason="secret %s not set" % missing[0], only_from=(RUNNING,))
        return
    for i in range(max_attempts):
        n = base + i + 1
        cur = store.get(jid)
        if cur["state"] != RUNNING:
            return
        job = JobSpec.from_dict(spec)
        argv = job.command(str(store.write_script(jid, job.script)) if job.script is not None else None)
        env = job_environment(cur, spec, n)
        if max_attempts > 1 or base:
            _log(log_path, "attempt %d (%d of %d) starting" % (n, i + 1, max_attempts))
        with open(log_path, "ab") as out:
            try:
                child = _popen(argv, cwd, env, out)
            except OSError as e:
                _log(log_path, "cannot start %s: %s" % (argv[0], e))
                with store.tx() as conn:
                    conn.execute("INSERT OR REPLACE INTO attempts (job_id, attempt, start_time, end_time, exit_code,"
                                 " note) VALUES (?,?,?,?,?,?)", (jid, n, time.time(), time.time(), 127, str(e)))
                    store.set_state(conn, jid, FAILED, reason="cannot start: %s" % e, only_from=(RUNNING,),
                                    exit_code=127, attempts=n)
                return
        cstart = proc.pid_start(child.pid)
        with store.tx() as conn:
            conn.execute("INSERT OR REPLACE INTO attempts (job_id, attempt, start_time, pid, pid_start)"
                         " VALUES (?,?,?,?,?)", (jid, n, time.time(), child.pid, cstart))
            store.update(conn, jid, attempts=n)
        rc = _supervise(store, jid, child, cstart)
        code, sig = (rc, None) if rc >= 0 else (None, -rc)
        with store.tx() as conn:
            conn.execute("UPDATE attempts SET end_time=?, exit_code=?, signal=? WHERE job_id=? AND attempt=?",
                         (time.time(), code, sig, jid, n))
            if rc == 0:
                store.set_state(conn, jid, COMPLETED, only_from=(RUNNING,), exit_code=0, signal=None)
                return
            last = i == max_attempts - 1
            state = store.get(jid)["state"]
            if state != RUNNING:
                store.update(conn, jid, exit_code=code, signal=sig)
                return
            if last:
                store.set_state(conn, jid, FAILED, only_from=(RUNNING,), exit_code=code, signal=sig,
                                reason="exit code %s" % code if code is not None else "signal %s" % sig)
                return
            store.update(conn, jid, exit_code=code, signal=sig)
        _log(log_path, "attempt %d ended with %s; retrying" % (
            n, "exit code %d" % code if code is not None else "signal %d" % sig))


def _die_with_parent(parent: int) -> Any:
    """Linux: the job's main process is SIGKILLed if the runner dies (covers the instant before
    its pid is recorded; afterwards reconcile kills the whole process group too)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:
        return None

    def _pre() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(137)

    return _pre


def _popen(argv: List[str], cwd: Optional[str], env: Dict[str, str], out: Any) -> Any:
    import subprocess

    return subprocess.Popen(argv, cwd=cwd if cwd and os.path.isdir(cwd) else None, env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True, preexec_fn=_die_with_parent(os.getpid()))


def _supervise(store: Store, jid: int, child: Any, cstart: Optional[str]) -> int:
    """Wait for the child; on a cancel, SIGTERM its process group, then SIGKILL after a grace."""
    interval = poll_interval()
    term_at: Optional[float] = None
    while True:
        try:
            return child.wait(timeout=interval)
        except Exception:  # subprocess.TimeoutExpired
            pass
        state = store.get(jid)["state"]
        if state == CANCELLED and term_at is None:
            term_at = time.time()
            proc.signal_group(child.pid, cstart, signal.SIGTERM)
        elif term_at is not None and time.time() - term_at > KILL_GRACE_S:
            proc.signal_group(child.pid, cstart, signal.SIGKILL)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="jobman.runner")
    p.add_argument("--home", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--parent", default="0:")
    p.add_argument("ids", nargs="+", type=int)
    a = p.parse_args(argv)
    os.environ["JOBMAN_HOME"] = a.home
    store = Store(Path(a.home))
    if not _claim(store, a.ids, a.token, a.parent):
        return 0
    first = store.get(a.ids[0])
    if first["backend"] == "local":
        if _wait_for_start(store, first):
            _run_local(store, first["id"])
        return 0
    # remote launcher: one process per submission (a job or a whole array)
    if _wait_for_start(store, first):
        rows = [r for r in (store.get(i) for i in a.ids) if r["state"] == PENDING]
        if rows:
            launch(store, rows)
    else:
        cur = store.get(first["id"])
        if cur["state"] == CANCELLED:
            with store.tx() as conn:
                for i in a.ids[1:]:
                    store.set_state(conn, i, CANCELLED, reason=cur["reason"], only_from=ACTIVE_STATES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
