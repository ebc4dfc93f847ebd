"""Fixtures for the jobman tests: a private JOBMAN_HOME per test and a CLI runner.

The local-backend tests start real processes on this machine; nothing contacts a cloud.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def jm_home(tmp_path, monkeypatch):
    home = tmp_path / "jobman-home"
    monkeypatch.setenv("JOBMAN_HOME", str(home))
    monkeypatch.setenv("JOBMAN_POLL", "0.05")
    monkeypatch.delenv("JOBMAN_BACKEND", raising=False)
    monkeypatch.delenv("JOBMAN_TEST_HOOK", raising=False)
    pp = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + (os.pathsep + pp if pp else ""))
    monkeypatch.chdir(tmp_path)
    yield home
    kill_leftover_jobs(home)


def kill_leftover_jobs(home: Path) -> None:
    """Stop any runner or job process a failed test left behind (only ours, by recorded pid)."""
    import sqlite3
    import signal

    db = home / "jobman.db"
    if not db.exists():
        return
    from jobman import proc

    conn = sqlite3.connect(str(db), timeout=30)
    try:
        for pid, start in conn.execute("SELECT pid, pid_start FROM attempts WHERE end_time IS NULL"):
            proc.signal_group(pid, start, signal.SIGKILL)
        for pid, start in conn.execute(
                "SELECT runner_pid, runner_start FROM jobs WHERE state IN ('PENDING','RUNNING','RECOVERING')"):
            if pid and pid != os.getpid():
                proc.signal_group(pid, start, signal.SIGKILL)
    finally:
        conn.close()
