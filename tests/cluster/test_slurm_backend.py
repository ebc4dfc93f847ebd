"""jobman's Slurm backend against the live Slurm: submit, arrays, afterok/afterany chains, cancel,
requeue, `logs -f`, `acct` from sacct, every terminal state reached for real, secrets by name."""
from __future__ import annotations

import subprocess
import sys
import uuid

from slurm_helpers import jobman, row, sacct_job, slurm_state, submit, wait_for, wait_jobs


def log_of(jid) -> str:
    return jobman("logs", jid, check=0).stdout


def acct_line(jid) -> dict:
    out = jobman("acct", "-j", jid, "--parsable", check=0).stdout.splitlines()
    head = out[0].split("|")
    return dict(zip(head, out[1].split("|")))


def test_submit_runs_the_argv_with_rank_env_and_acct_agrees_with_sacct(slurm, tmp_path, checked):
    evil = "a b; $(touch %s) 'q' \"d\"" % (tmp_path / "pwn")
    jid = submit("-J", "hello", "--", "python3", "-c",
                 "import os, sys; print(os.environ['JOBMAN_NODE_RANK'], os.environ['JOBMAN_NUM_NODES'], "
                 "os.environ['JOBMAN_JOB_ID'], os.environ['MASTER_ADDR'], repr(sys.argv[1]))", evil)
    assert wait_jobs(jid) == 0
    bid = row(jid)["backend_id"]
    node = subprocess.run(["sinfo", "--noheader", "--format=%N"], capture_output=True, text=True).stdout.strip()
    assert log_of(jid).strip() == "0 1 %s %s %r" % (bid, node, evil)
    assert not (tmp_path / "pwn").exists()
    mine, theirs = acct_line(jid), sacct_job(bid)
    assert (mine["State"], mine["ExitCode"]) == ("COMPLETED", "0:0") == (theirs["State"], theirs["ExitCode"])
    assert (mine["Start"], mine["End"]) == (theirs["Start"], theirs["End"])
    checked("job %s = Slurm %s: COMPLETED 0:0, rank env, argv unquoted by no shell, acct Start/End = sacct's"
            % (jid, bid))


def test_failed_job_keeps_its_exit_code(slurm, checked):
    p = jobman("submit", "--wait", "--", "sh", "-c", "echo failing; exit 7")
    assert p.returncode == 7, (p.stdout, p.stderr)
    jid = p.stdout.split()[2]
    r = row(jid)
    assert (r["state"], r["exit_code"]) == ("FAILED", 7)
    assert sacct_job(r["backend_id"])["ExitCode"] == "7:0"
    assert acct_line(jid)["ExitCode"] == "7:0"
    checked("exit 7 -> FAILED 7:0 in jobman and sacct; submit --wait exits 7")


def test_array_runs_every_task_two_at_a_time(slurm, tmp_path, checked):
    script = tmp_path / "task.sh"
    script.write_text("#!/bin/sh\n#JOBMAN -J sweep --array 0-3%2\necho \"task $JOBMAN_ARRAY_TASK_ID of "
                      "$JOBMAN_JOB_ID\"\nsleep 4\n")
    p = jobman("submit", "--wait", script, check=0)
    arr = p.stdout.split()[3]
    tasks = [row("%s_%d" % (arr, t)) for t in range(4)]
    assert [t["state"] for t in tasks] == ["COMPLETED"] * 4
    sid = tasks[0]["backend_id"].split("_")[0]
    for t in range(4):
        assert log_of("%s_%d" % (arr, t)).strip() == "task %d of %s_%d" % (t, sid, t)
    # the %2 limit, from Slurm's own start and end times
    most = max(sum(1 for o in tasks if o["start_time"] <= t["start_time"] < o["end_time"]) for t in tasks)
    assert most == 2, [(t["start_time"], t["end_time"]) for t in tasks]
    checked("array %s = Slurm %s_[0-3%%2]: 4 tasks COMPLETED, per-task logs, at most %d running at once"
            % (arr, sid, most))


def test_afterok_and_afterany_chains_are_slurms_own(slurm, tmp_path, checked):
    order = tmp_path / "order"
    a = submit("-J", "a", "--", "sh", "-c", "sleep 3; echo a >> %s" % order)
    b = submit("-J", "b", "-d", "afterok:%s" % a, "--", "sh", "-c", "echo b >> %s" % order)
    c = submit("-J", "c", "-d", "afterok:%s" % b, "--", "sh", "-c", "echo c >> %s" % order)
    bad = submit("-J", "bad", "--", "sh", "-c", "sleep 1; exit 4")
    never = submit("-J", "never", "-d", "afterok:%s" % bad, "--", "sh", "-c", "echo never >> %s" % order)
    anyway = submit("-J", "anyway", "-d", "afterany:%s" % bad, "--", "true")
    # Slurm holds the dependants: each is in Slurm already, with its dependency on Slurm's ids
    dep = subprocess.run(["squeue", "--noheader", "--format=%E", "--jobs=" + row(c)["backend_id"]],
                         capture_output=True, text=True).stdout
    assert "afterok:%s" % row(b)["backend_id"] in dep, dep
    assert wait_jobs(a, b, c, bad, never, anyway) == 4
    assert order.read_text().split() == ["a", "b", "c"]
    states = {n: row(j)["state"] for n, j in dict(a=a, b=b, c=c, bad=bad, never=never, anyway=anyway).items()}
    assert states == dict(a="COMPLETED", b="COMPLETED", c="COMPLETED", bad="FAILED", never="CANCELLED",
                          anyway="COMPLETED")
    assert row(never)["reason"] == "DependencyNeverSatisfied"
    checked("afterok chain a->b->c ran in order through Slurm's --dependency; afterok on a FAILED job "
            "CANCELLED (DependencyNeverSatisfied), afterany on it COMPLETED")


def test_cancel_a_pending_and_a_running_job(slurm, checked):
    run = submit("--", "sh", "-c", "echo started; sleep 300")
    pend = submit("-d", "afterok:%s" % run, "--", "true")
    wait_for(lambda: "started" in log_of(run), timeout=60, what="the job to start")
    assert slurm_state(row(pend)["backend_id"]) == "PENDING"
    assert "Cancelled job %s" % pend in jobman("cancel", pend, check=0).stdout
    assert "Cancelled job %s" % run in jobman("cancel", run, check=0).stdout
    for jid in (pend, run):
        bid = row(jid)["backend_id"]
        wait_for(lambda: slurm_state(bid) == "CANCELLED", timeout=60, what="Slurm to cancel %s" % bid)
        assert row(jid)["state"] == "CANCELLED"
    assert sacct_job(row(run)["backend_id"])["State"].startswith("CANCELLED")
    jobman("queue", "--all", check=0)  # a refresh keeps what Slurm says
    assert row(run)["state"] == row(pend)["state"] == "CANCELLED"
    checked("scancel through jobman: the pending and the running job CANCELLED in squeue, sacct and jobman")


def test_requeue_a_finished_job_runs_it_again_under_the_same_id(slurm, checked):
    p = jobman("submit", "--wait", "--", "sh", "-c", "echo run ${SLURM_RESTART_COUNT:-0}")
    assert p.returncode == 0, p.stderr
    jid = p.stdout.split()[2]
    bid = row(jid)["backend_id"]
    assert "Requeued job %s" % jid in jobman("requeue", jid, check=0).stdout
    assert wait_jobs(jid) == 0
    r = row(jid)
    assert (r["state"], r["backend_id"], r["attempts"]) == ("COMPLETED", bid, 2)
    assert "run 1" in log_of(jid)
    checked("jobman requeue = scontrol requeue %s: ran again (SLURM_RESTART_COUNT=1), COMPLETED, 2 attempts "
            "from sacct --duplicates" % bid)


def test_logs_follow_prints_while_the_job_writes(slurm, checked):
    jid = submit("--", "sh", "-c", "for i in 1 2 3 4 5 6; do echo line$i; sleep 1; done")
    p = subprocess.Popen([sys.executable, "-m", "jobman", "logs", "-f", jid], stdout=subprocess.PIPE, text=True)
    first = p.stdout.readline().strip()
    still = slurm_state(row(jid)["backend_id"])
    rest, _ = p.communicate(timeout=120)
    assert first == "line1" and still == "RUNNING"
    assert [first] + rest.split() == ["line%d" % i for i in range(1, 7)] and p.returncode == 0
    assert row(jid)["state"] == "COMPLETED"
    checked("logs -f printed line1 while Slurm said RUNNING, then all 6 lines, and returned when the job ended")


def test_over_its_time_limit_is_timeout(slurm, checked):
    jid = submit("-t", "0:05", "--", "sleep", "300")  # Slurm counts minutes: a one-minute limit
    assert wait_jobs(jid, timeout=300) != 0
    r = row(jid)
    assert r["state"] == "TIMEOUT" and sacct_job(r["backend_id"])["State"] == "TIMEOUT"
    assert acct_line(jid)["State"] == "TIMEOUT"
    checked("--time 0:05 under sleep 300 -> TIMEOUT after %.0f s (jobman and sacct)"
            % (r["end_time"] - r["start_time"]))


def test_over_its_memory_limit_is_out_of_memory(slurm, lab, checked):
    jid = submit("--", "python3", "-c", "x = bytearray(400 << 20); import time; time.sleep(5)",
                 env={"SBATCH_MEM_PER_NODE": "64M"})
    wait_jobs(jid)
    r = row(jid)
    steps = subprocess.run(["sacct", "--parsable2", "--noheader", "--jobs=" + r["backend_id"],
                            "--format=JobID,State,ExitCode"], capture_output=True, text=True).stdout
    if lab.settings["task_plugin"] == "task/cgroup":
        assert r["state"] == "OUT_OF_MEMORY", (r["state"], r["reason"], steps)
    else:  # the accounting poller kills the step (SIGKILL) and Slurm 22.05 records no OUT_OF_MEMORY
        assert (r["state"], r["exit_code"]) == ("FAILED", 9), (r["state"], r["reason"], steps)
    checked("400 MiB under --mem 64M, memory policed by %s -> jobman %s; Slurm's records: %s"
            % ("the kernel (cgroup v1)" if lab.settings["task_plugin"] == "task/cgroup" else "OverMemoryKill",
               r["state"], " ".join(steps.split())))


def test_secrets_pass_by_name_only(slurm, lab, checked):
    sentinel = "lpc-sentinel-%s" % uuid.uuid4().hex
    p = jobman("submit", "--wait", "--secret", "LPC_TEST_TOKEN", "--", "sh", "-c",
               'echo "secret-length=${#LPC_TEST_TOKEN}"', env={"LPC_TEST_TOKEN": sentinel})
    assert p.returncode == 0, p.stderr
    jid = p.stdout.split()[2]
    bid = row(jid)["backend_id"]
    assert "secret-length=%d" % len(sentinel) in log_of(jid)
    held = subprocess.run(["scontrol", "write", "batch_script", bid, "-"], capture_output=True, text=True).stdout
    assert "LPC_TEST_TOKEN" in held and sentinel not in held
    def submit_line():  # accounting may hold the record a moment before its SubmitLine
        return subprocess.run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs=" + bid,
                               "--format=SubmitLine"], capture_output=True, text=True).stdout.strip()

    assert sentinel not in wait_for(submit_line, timeout=60, what="sacct's SubmitLine")
    places = [f for f in slurm.rglob("*") if f.is_file()] + list((lab.root / "log").glob("*"))
    assert not [str(f) for f in places if sentinel.encode() in f.read_bytes()]
    # declared but not set: refused before Slurm sees anything
    bad = jobman("submit", "--secret", "LPC_UNSET_TOKEN", "--", "true")
    assert bad.returncode == 2 and "LPC_UNSET_TOKEN" in bad.stderr and bad.stderr.count("\n") == 1
    checked("a sentinel passed with --secret reached the job (by length) and is in none of %d files: jobman's "
            "store, scripts and logs, Slurm's logs; nor in Slurm's copy of the batch script or its SubmitLine"
            % len(places))
