"""Faults injected into the live cluster, with nothing lost: slurmctld restarted under a chain, the
node set DOWN and back, jobman killed in the middle of its store's write, two submitters at once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

from slurm_helpers import jobman, row, rows, slurm_state, submit, wait_for, wait_jobs


def queue_states(*extra) -> dict:
    p = jobman("queue", "--all", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return {j["name"]: j["state"] for j in json.loads(p.stdout)}


def slurm_ids_named(name: str) -> list:
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--name=" + name, "--format=%i"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def test_slurmctld_restarted_in_the_middle_of_a_chain(slurm, lab, tmp_path, checked):
    order = tmp_path / "order"
    a = submit("-J", "a", "--", "sh", "-c", "sleep 12; echo a >> %s" % order)
    b = submit("-J", "b", "-d", "afterok:%s" % a, "--", "sh", "-c", "sleep 2; echo b >> %s" % order)
    c = submit("-J", "c", "-d", "afterok:%s" % b, "--", "sh", "-c", "echo c >> %s" % order)
    wait_for(lambda: slurm_state(row(a)["backend_id"]) == "RUNNING", timeout=60, what="a to run")
    before = queue_states()
    assert before == {"a": "RUNNING", "b": "PENDING", "c": "PENDING"}, before
    pid = lab.daemons()["slurmctld"]["pid"]
    lab.stop_daemon("slurmctld")
    try:
        assert subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0
        during = queue_states()
        time.sleep(14)  # a's command ends while slurmctld is away
        later = queue_states()
    finally:
        lab.start_daemon("slurmctld")
    assert during == before and later == before, (during, later)
    assert wait_jobs(a, b, c, timeout=300) == 0
    assert order.read_text().split() == ["a", "b", "c"]
    after = queue_states()
    assert after == {"a": "COMPLETED", "b": "COMPLETED", "c": "COMPLETED"}, after
    checked("slurmctld stopped (pid %d) while a ran: jobman queue answered from accounting, %s, twice, "
            "14 s apart; restarted: the chain a->b->c finished in order, %s"
            % (pid, before, after))


def test_node_down_and_back(slurm, lab, checked):
    node = lab.settings["node"]
    requeued = submit("-J", "requeued", "--", "sh", "-c", "echo run ${SLURM_RESTART_COUNT:-0}; sleep 10")
    lost = submit("-J", "lost", "--", "sleep", "300", env={"SBATCH_NO_REQUEUE": "1"})
    after_ok = submit("-J", "after-ok", "-d", "afterok:%s" % lost, "--", "true")
    after_any = submit("-J", "after-any", "-d", "afterany:%s" % lost, "--", "true")
    wait_for(lambda: slurm_state(row(requeued)["backend_id"]) == slurm_state(row(lost)["backend_id"]) == "RUNNING",
             timeout=60, what="two running jobs")
    subprocess.run(["scontrol", "update", "nodename=" + node, "state=down", "reason=lpc-cluster-tier"], check=True)
    try:
        wait_for(lambda: queue_states()["lost"] == "NODE_FAIL", timeout=60, what="NODE_FAIL")
        wait_for(lambda: queue_states()["after-ok"] == "CANCELLED", timeout=60, what="the afterok dependant")
        down = queue_states()
        assert down["requeued"] == "PENDING" and down["after-any"] == "PENDING", down
    finally:
        subprocess.run(["scontrol", "update", "nodename=" + node, "state=resume"], check=True)
    wait_jobs(requeued, lost, after_ok, after_any, timeout=300)
    end = queue_states()
    assert end == {"requeued": "COMPLETED", "lost": "NODE_FAIL", "after-ok": "CANCELLED", "after-any": "COMPLETED"}
    assert row(after_ok)["reason"] == "DependencyNeverSatisfied" and row(requeued)["attempts"] == 2
    assert "run 1" in jobman("logs", requeued, check=0).stdout
    checked("node %s DOWN under 2 running jobs: the --no-requeue one NODE_FAIL, its afterok dependant CANCELLED "
            "(DependencyNeverSatisfied); the other requeued (PENDING while down): %s; node back: %s"
            % (node, down, end))


def _killed_at(hook: str, name: str, marker) -> None:
    env = dict(os.environ, JOBMAN_TEST_HOOK=hook)
    p = subprocess.Popen([sys.executable, "-m", "jobman", "submit", "--parsable", "-J", name, "--", "sh", "-c",
                          "echo ran > %s" % marker], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    assert p.stderr.readline().strip() == "JOBMAN_HOOK " + hook
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def test_jobman_killed_in_the_middle_of_its_store_write(slurm, tmp_path, checked):
    # unique names: squeue remembers the jobs of earlier runs for a while (MinJobAge)
    tag = uuid.uuid4().hex[:6]
    cases = {"submit:before_commit": "kill-before-commit-" + tag, "submit:after_commit": "kill-after-commit-" + tag,
             "launch:recording": "kill-while-recording-" + tag}
    before, after, recording = cases.values()
    for hook, name in cases.items():
        _killed_at(hook, name, tmp_path / name)
    states = queue_states()  # the next command reconciles: adopts from Slurm, or marks what Slurm never got
    # killed before the row committed: no job anywhere
    assert before not in states and slurm_ids_named(before) == []
    # killed after the commit, before sbatch: a job Slurm never saw ends NODE_FAIL, not PENDING forever
    lost = [r for r in rows() if r["name"] == after][0]
    assert lost["state"] == "NODE_FAIL" and "submitter process" in lost["reason"], lost
    assert slurm_ids_named(after) == []
    # killed inside the transaction recording Slurm's id: the write rolled back, the job found again in Slurm
    adopted = [r for r in rows() if r["name"] == recording][0]
    assert slurm_ids_named(recording) == [adopted["backend_id"]]
    assert wait_jobs(adopted["id"]) == 0 and (tmp_path / recording).read_text() == "ran\n"
    conn = sqlite3.connect(str(slurm / "jobman.db"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    checked("kill -9 before the commit: no job in jobman or Slurm; after it: NODE_FAIL, none in Slurm; inside the "
            "transaction recording Slurm's id: rolled back, adopted from Slurm as %s by its sbatch --comment, "
            "ran once, COMPLETED; database integrity ok" % adopted["backend_id"])


def test_two_jobman_processes_submitting_at_once(slurm, checked):
    n = 6
    code = ("import sys\nfrom jobman.cli import main\n"
            "for i in range(%d):\n"
            "    assert main(['submit', '--parsable', '-J', sys.argv[1], '--', 'true']) == 0\n") % n
    names = ["%s-%s" % (side, uuid.uuid4().hex[:6]) for side in ("left", "right")]
    procs = [subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True)
             for name in names]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ids = [int(x) for o in outs for x in o]
    assert len(set(ids)) == 2 * n
    assert wait_jobs(*ids) == 0
    mine = rows()
    bids = sorted(r["backend_id"] for r in mine)
    assert len(mine) == 2 * n and len(set(bids)) == 2 * n
    in_slurm = sorted(slurm_ids_named(names[0]) + slurm_ids_named(names[1]))
    assert in_slurm == bids and all(r["state"] == "COMPLETED" for r in mine)
    checked("2 processes x %d submissions at once: %d jobman jobs, %d distinct Slurm jobs, one each, all COMPLETED"
            % (n, len(mine), len(in_slurm)))
