"""Slurm backend, fast: the outputs of a live Slurm 22.05 recorded in data/ (see data/README.md for
how they were captured) read into jobman's states. Launching, cancelling, requeueing and every
state reached for real are the cluster tier's (tests/cluster, `make test-cluster`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobman.backends.slurm import merge_views, parse_sacct, parse_sbatch_parsable, parse_squeue
from jobman.errors import BackendError
from jobman.spec import build_spec

DATA = Path(__file__).parent / "data"
JOBS = json.loads((DATA / "jobs.json").read_text())
ARRAY = ["%s_%d" % (JOBS["array"], t) for t in range(4)]


def views(moment):
    return parse_squeue((DATA / ("squeue_%s.txt" % moment)).read_text()), \
        parse_sacct((DATA / ("sacct_%s.txt" % moment)).read_text())


def merged(moment, live=True, acct=True, now=None):
    q, a = views(moment)
    return merge_views(q if live else None, a if acct else None, list(JOBS.values()) + ARRAY, now=now)


def test_recorded_outputs_are_from_slurm_22_05():
    assert (DATA / "slurm_version.txt").read_text().strip() == "slurm-wlm 22.05.8"


def test_parse_sbatch():
    assert parse_sbatch_parsable((DATA / "sbatch_parsable.txt").read_text()) == JOBS["completed"]
    with pytest.raises(BackendError):
        parse_sbatch_parsable("sbatch: error: Batch job submission failed: Invalid account\n")


def test_every_terminal_state_and_exit_code():
    r = merged("final")
    got = {name: (r[JOBS[name]]["state"], r[JOBS[name]]["exit_code"]) for name in JOBS if name != "array"}
    assert got == {
        "completed": ("COMPLETED", 0), "failed_exit3": ("FAILED", 3),
        # the job ended FAILED (exit 1): its srun step was the one killed for memory
        "oom": ("OUT_OF_MEMORY", 1), "timeout": ("TIMEOUT", 0), "cancelled_running": ("CANCELLED", 0),
        "pending_dependency": ("CANCELLED", 0), "node_fail": ("NODE_FAIL", 0),
        "node_fail_requeued": ("COMPLETED", 0)}
    assert r[JOBS["oom"]]["reason"] == "a step ran out of memory"
    assert r[JOBS["cancelled_running"]]["signal"] == 0
    assert r[JOBS["pending_dependency"]]["reason"] == "DependencyNeverSatisfied"
    assert r[JOBS["pending_dependency"]]["start_time"] is None
    assert [r[t]["state"] for t in ARRAY] == ["COMPLETED"] * 4
    # a requeued job is a second accounting record: two attempts, the second one's times
    requeued = r[JOBS["node_fail_requeued"]]
    assert requeued["attempts"] == 2 and requeued["end_time"] - requeued["start_time"] >= 20
    assert r[JOBS["completed"]]["attempts"] == 1


def test_accounting_alone_names_the_cancel_and_the_step_killed_for_memory():
    q, a = views("final")
    assert a[JOBS["cancelled_running"]]["reason"] == "CANCELLED by 0"
    assert a[JOBS["oom"]]["state"] == "FAILED" and a[JOBS["oom"]]["oom"]
    assert q[JOBS["oom"]]["state"] == "FAILED"  # slurmctld does not know about the step


def test_live_queue_running_pending_and_array_tasks_held_back():
    r = merged("live")
    assert r[JOBS["timeout"]]["state"] == "RUNNING" and r[JOBS["timeout"]]["end_time"] is None
    assert (r[JOBS["pending_dependency"]]["state"], r[JOBS["pending_dependency"]]["reason"]) == \
        ("PENDING", "Dependency")
    assert [r[t]["state"] for t in ARRAY] == ["RUNNING", "RUNNING", "PENDING", "PENDING"]
    assert r[ARRAY[3]]["reason"] == "JobArrayTaskLimit"


def test_node_down_requeued_job_is_pending_though_accounting_says_node_fail():
    q, a = views("nodedown")
    requeued, failed = JOBS["node_fail_requeued"], JOBS["node_fail"]
    assert a[requeued]["state"] == "NODE_FAIL"
    r = merged("nodedown")
    assert (r[requeued]["state"], r[requeued]["reason"]) == ("PENDING", "BeginTime")
    assert (r[failed]["state"], r[failed]["reason"]) == ("NODE_FAIL", "NodeDown")


def test_without_slurmctld_accounting_answers():
    r = merged("live", live=False)
    assert r[JOBS["timeout"]]["state"] == "RUNNING" and r[JOBS["failed_exit3"]]["state"] == "FAILED"
    assert r[ARRAY[2]]["state"] == "PENDING"


def test_accounting_alone_never_moves_a_running_job_back_to_pending():
    _, a = views("live")
    pending = JOBS["pending_dependency"]
    assert merge_views(None, a, [pending])[pending]["state"] == "PENDING"
    # jobman saw it running just before slurmctld went away; accounting has not heard of the start yet
    assert merge_views(None, a, [pending], running=[pending]) == {}
    q, _ = views("live")
    assert merge_views(q, a, [pending], running=[pending])[pending]["state"] == "PENDING"  # slurmctld's word


def test_an_end_waits_for_accounting_then_is_taken_alone():
    q, _ = views("final")
    _, behind = views("live")  # accounting still saying RUNNING for the jobs that ended since
    ended = q[JOBS["timeout"]]["end_time"]
    soon = merge_views(q, behind, [JOBS["timeout"]], now=ended + 5)
    assert soon == {}
    late = merge_views(q, behind, [JOBS["timeout"]], now=ended + 3600)
    assert late[JOBS["timeout"]]["state"] == "TIMEOUT"
    # without accounting at all, slurmctld's word is all there is
    assert merge_views(q, None, [JOBS["timeout"]])[JOBS["timeout"]]["state"] == "TIMEOUT"


def test_missing_slurm_commands_are_reported(jm_home, monkeypatch, tmp_path):
    from jobman import api

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendError, match="sbatch not found"):
        api.submit(build_spec({"backend": "slurm"}, ["true"]))
