"""Integration tests of the local backend with real processes, driven through the CLI."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from jobman_testutil import jobman, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process checks use /proc")


def submit(*args, **kw):
    p = jobman("submit", "--parsable", *args, check=0, **kw)
    return p.stdout.strip()


def state(jid):
    from jobman.store import Store

    s = Store()
    try:
        rows = s.resolve(str(jid))
        return rows[0]["state"] if len(rows) == 1 else [r["state"] for r in rows]
    finally:
        s.close()


def row(jid):
    from jobman.store import Store

    s = Store()
    try:
        return dict(s.resolve(str(jid))[0])
    finally:
        s.close()


def wait_done(*ids, timeout=60):
    from jobman import api

    return api.wait([int(i) for i in ids], timeout=timeout)


def log(jid):
    return jobman("logs", jid, check=0).stdout


def test_afterok_chain_of_three(jm_home, tmp_path):
    out = tmp_path / "order.txt"
    a = submit("-J", "a", "--", "sh", "-c", "sleep 0.3; echo a >> %s" % out)
    b = submit("-J", "b", "-d", "afterok:%s" % a, "--", "sh", "-c", "echo b >> %s" % out)
    c = submit("-J", "c", "--dependency=afterok:%s" % b, "--", "sh", "-c", "echo c >> %s" % out)
    assert jobman("submit", "--wait", "-d", "afterok:%s" % c, "--", "true").returncode == 0
    assert out.read_text().split() == ["a", "b", "c"]
    assert [state(j) for j in (a, b, c)] == ["COMPLETED"] * 3
    acct = jobman("acct", "--parsable", check=0).stdout.splitlines()
    assert acct[0].startswith("JobID|JobName|Backend|State|ExitCode|Start|End")
    assert any(line.startswith("%s|a|local|COMPLETED|0:0|" % a) for line in acct)


def test_afterok_after_failure_is_never_satisfied_and_afternotok_runs(jm_home, tmp_path):
    bad = submit("-J", "bad", "--", "sh", "-c", "sleep 0.2; exit 4")
    ok_branch = submit("-d", "afterok:%s" % bad, "--", "sh", "-c", "echo should-not-run")
    rescue = submit("-d", "afternotok:%s" % bad, "--", "sh", "-c", "echo rescued")
    anyway = submit("-d", "afterany:%s" % bad, "--", "true")
    assert wait_done(bad, ok_branch, rescue, anyway) == 4
    assert state(bad) == "FAILED" and row(bad)["exit_code"] == 4
    assert state(ok_branch) == "CANCELLED"
    assert row(ok_branch)["reason"] == "DependencyNeverSatisfied"
    assert state(rescue) == "COMPLETED" and "rescued" in log(rescue)
    assert state(anyway) == "COMPLETED"
    # afternotok on a job that succeeded can never run
    good = submit("--", "true")
    skip = submit("-d", "afternotok:%s" % good, "--", "true")
    wait_done(good, skip)
    assert state(skip) == "CANCELLED"


def test_array_of_four_tasks_end_to_end(jm_home, tmp_path):
    script = tmp_path / "task.sh"
    script.write_text("#!/bin/sh\n#JOBMAN -J sweep\n#JOBMAN --array 0-3%2\necho \"task $JOBMAN_ARRAY_TASK_ID of "
                      "$JOBMAN_ARRAY_JOB_ID arg=$1\"\n")
    p = jobman("submit", "--wait", script, "x y", check=0)
    assert "Submitted array job" in p.stdout
    arr = p.stdout.split()[3]
    rows = [row("%s_%d" % (arr, t)) for t in range(4)]
    assert [r["state"] for r in rows] == ["COMPLETED"] * 4
    assert [r["name"] for r in rows] == ["sweep"] * 4
    for t in range(4):
        assert log("%s_%d" % (arr, t)).strip() == "task %d of %s arg=x y" % (t, arr)
    q = jobman("queue", "--all", "-n", "sweep", check=0).stdout
    assert "%s_3" % arr in q
    # a dependency on the array id waits for every task
    after = submit("-d", "afterok:%s" % arr, "--", "true")
    wait_done(after)
    assert state(after) == "COMPLETED"


def test_retry_after_nonzero_exit(jm_home, tmp_path):
    marker = tmp_path / "count"
    # fails on the first two attempts, succeeds on the third
    cmd = "n=$(cat %s 2>/dev/null || echo 0); n=$((n+1)); echo $n > %s; echo attempt $JOBMAN_ATTEMPT; " \
          "[ $n -ge 3 ]" % (marker, marker)
    p = jobman("submit", "--wait", "--retries", "3", "--", "sh", "-c", cmd)
    assert p.returncode == 0, p.stderr
    jid = p.stdout.split()[2]
    r = row(jid)
    assert r["state"] == "COMPLETED" and r["attempts"] == 3
    acct = jobman("acct", "-j", jid, "--attempts", "--parsable", check=0).stdout
    assert "%s.1|attempt||" % jid in acct and "|1:0|" in acct and "%s.3|" % jid in acct
    # out of retries: the last exit code is the job's
    p = jobman("submit", "--wait", "--retries", "1", "--", "sh", "-c", "exit 7")
    assert p.returncode == 7
    assert row(p.stdout.split()[2])["attempts"] == 2


def test_wait_exits_with_the_jobs_status_and_parsable(jm_home):
    p = jobman("submit", "--wait", "--parsable", "--", "sh", "-c", "exit 3")
    assert p.returncode == 3
    assert p.stdout.strip().isdigit()
    assert jobman("submit", "--wait", "--", "python3", "-c", "print('ok')").returncode == 0


def test_cancel_running_job(jm_home, tmp_path):
    jid = submit("--", "sh", "-c", "echo started; sleep 60")
    wait_for(lambda: state(jid) == "RUNNING" and "started" in log(jid), what="job to start")
    p = jobman("cancel", jid, check=0)
    assert "Cancelled job %s" % jid in p.stdout
    assert wait_done(jid, timeout=30) != 0
    r = row(jid)
    assert r["state"] == "CANCELLED"
    from jobman.store import Store

    s = Store()
    attempts = s.attempts(int(jid))
    s.close()
    wait_for(lambda: _attempt_closed(jid), timeout=30, what="attempt to be closed")
    pid = attempts[0]["pid"]
    from jobman import proc

    assert not proc.alive(pid, attempts[0]["pid_start"])
    # a dependent of a cancelled job never runs
    dep = submit("-d", "afterok:%s" % jid, "--", "true")
    wait_done(dep)
    assert state(dep) == "CANCELLED"


def _attempt_closed(jid):
    from jobman.store import Store

    s = Store()
    try:
        return all(a["end_time"] is not None for a in s.attempts(int(jid)))
    finally:
        s.close()


def test_logs_follow_streams_until_the_end(jm_home):
    jid = submit("--", "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done")
    p = jobman("logs", "-f", jid, check=0, timeout=60)
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("line")] == ["line1", "line2", "line3"]


def _pending_hook_submit(hook, *cmd):
    env = dict(os.environ, JOBMAN_TEST_HOOK=hook)
    p = subprocess.Popen([sys.executable, "-m", "jobman", "submit", "--parsable", "--"] + list(cmd),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stderr.readline()
    assert line.strip() == "JOBMAN_HOOK %s" % hook, line
    return p


@pytest.mark.parametrize("hook", ["submit:before_commit", "submit:after_commit"])
def test_kill_dash_nine_during_submit_loses_nothing(jm_home, tmp_path, hook):
    out = tmp_path / "ran"
    p = _pending_hook_submit(hook, "sh", "-c", "echo x > %s" % out)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # the database is consistent and another submitter is not blocked
    other = submit("--", "true")
    wait_done(other)
    from jobman.store import Store

    s = Store()
    rows = s.jobs()
    s.close()
    ids = [r["id"] for r in rows]
    if hook == "submit:before_commit":
        assert ids == [int(other)]  # the killed submission never happened
        time.sleep(0.5)
        assert not out.exists()
    else:
        assert len(ids) == 2  # committed: the job runs to completion without its submitter
        wait_done(ids[0])
        assert state(ids[0]) == "COMPLETED" and out.exists()
    assert all(r["state"] in ("COMPLETED",) for r in _all_rows())


def _all_rows():
    from jobman.store import Store

    s = Store()
    try:
        return [dict(r) for r in s.jobs()]
    finally:
        s.close()


def test_kill_dash_nine_during_wait_keeps_the_job(jm_home, tmp_path):
    flag = tmp_path / "go"
    p = subprocess.Popen([sys.executable, "-m", "jobman", "submit", "--wait", "--", "sh", "-c",
                          "while [ ! -e %s ]; do sleep 0.05; done; exit 5" % flag],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    jid = line.split()[2]
    wait_for(lambda: state(jid) == "RUNNING", what="job to run")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert state(jid) == "RUNNING"  # killing the CLI does not touch the job
    flag.write_text("")
    assert wait_done(jid) == 5
    r = row(jid)
    assert r["state"] == "FAILED" and r["exit_code"] == 5
    # a later --wait-style query sees the same outcome
    assert "FAILED" in jobman("acct", "-j", jid, check=0).stdout


def test_dead_runner_is_detected_not_running_forever(jm_home):
    jid = submit("--", "sleep", "60")
    wait_for(lambda: state(jid) == "RUNNING" and row(jid)["attempts"] == 1, what="job to run")
    r = row(jid)
    os.kill(r["runner_pid"], signal.SIGKILL)
    wait_for(lambda: "NODE_FAIL" in jobman("queue", "--all", check=0).stdout, timeout=30, what="NODE_FAIL")
    r = row(jid)
    assert r["state"] == "NODE_FAIL" and "runner process" in r["reason"]
    from jobman import proc
    from jobman.store import Store

    s = Store()
    a = s.attempts(int(jid))[0]
    s.close()
    wait_for(lambda: not proc.alive(a["pid"], a["pid_start"]), timeout=10, what="orphan job killed")
    # and it can be requeued
    assert "Requeued job %s" % jid in jobman("requeue", jid, check=0).stdout
    wait_for(lambda: state(jid) == "RUNNING", what="requeued job to run")
    jobman("cancel", jid, check=0)
    wait_done(jid)


def test_two_concurrent_submitters(jm_home, tmp_path):
    n = 8
    code = ("import sys; from jobman.cli import main\n"
            "for i in range(%d):\n"
            "    assert main(['submit', '--parsable', '-J', sys.argv[1], '--', 'true']) == 0\n") % n
    procs = [subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True)
             for name in ("left", "right")]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ids = [int(x) for o in outs for x in o]
    assert len(ids) == 2 * n and len(set(ids)) == 2 * n
    assert wait_done(*ids, timeout=120) == 0
    rows = _all_rows()
    assert sorted(r["name"] for r in rows) == ["left"] * n + ["right"] * n
    assert all(r["state"] == "COMPLETED" for r in rows)
    conn = sqlite3.connect(str(jm_home / "jobman.db"))
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_requeue_finished_job_and_show(jm_home):
    p = jobman("submit", "--wait", "--", "sh", "-c", "echo run $JOBMAN_ATTEMPT")
    jid = p.stdout.split()[2]
    jobman("requeue", jid, check=0)
    wait_done(jid)
    r = row(jid)
    assert r["state"] == "COMPLETED" and r["attempts"] == 2
    assert [ln for ln in log(jid).splitlines() if ln.startswith("run")] == ["run 1", "run 2"]
    show = jobman("show", jid, check=0).stdout
    assert "state=COMPLETED" in show and "attempt.2" in show
    assert jobman("requeue", "999", check=None).returncode == 2


def test_argv_is_not_shell_interpreted(jm_home, tmp_path):
    evil = "$(touch %s); `touch %s` ; echo \"quoted\" 'single'" % (tmp_path / "pwn1", tmp_path / "pwn2")
    p = jobman("submit", "--wait", "--", "printf", "%s\\n", evil)
    assert p.returncode == 0
    assert log(p.stdout.split()[2]).strip() == evil
    assert not (tmp_path / "pwn1").exists() and not (tmp_path / "pwn2").exists()


def test_secrets_are_read_at_run_time_and_never_stored(jm_home):
    env = {"MY_API_TOKEN": "s3cr3t-value"}
    p = jobman("submit", "--wait", "--secret", "MY_API_TOKEN", "--env", "PLAIN=1", "--", "sh", "-c",
               'echo "secret-length=${#MY_API_TOKEN}"', env=env)
    assert p.returncode == 0, p.stderr
    jid = p.stdout.split()[2]
    assert "secret-length=12" in log(jid)
    for f in jm_home.rglob("*"):
        if f.is_file():
            assert b"s3cr3t-value" not in f.read_bytes(), f
    # a secret-looking name passed as a plain value is refused
    bad = jobman("submit", "--env", "HF_TOKEN=abc", "--", "true")
    assert bad.returncode == 2 and "--secret HF_TOKEN" in bad.stderr
    # a declared secret missing from the environment fails the job clearly
    e = dict(os.environ)
    e.pop("NOT_SET_TOKEN", None)
    p = jobman("submit", "--wait", "--secret", "NOT_SET_TOKEN", "--", "true")
    assert p.returncode != 0
    assert "NOT_SET_TOKEN" in row(p.stdout.split()[2])["reason"]
