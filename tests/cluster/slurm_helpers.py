"""What the cluster tier's tests share: submitting through the jobman CLI, reading jobman's rows,
and asking Slurm itself (sacct, squeue) for the same jobs, to compare."""
from __future__ import annotations

import subprocess

from jobman_testutil import jobman, wait_for

__all__ = ["jobman", "wait_for", "submit", "row", "rows", "slurm_state", "sacct_job", "wait_jobs"]


def submit(*args, env=None) -> str:
    p = jobman("submit", "--parsable", *args, env=env)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p.stdout.strip()


def rows():
    from jobman.store import Store

    with Store() as s:
        return [dict(r) for r in s.jobs()]


def row(ref):
    from jobman.store import Store

    with Store() as s:
        found = s.resolve(str(ref))
        assert len(found) == 1, (ref, found)
        return dict(found[0])


def slurm_state(bid: str) -> str:
    """slurmctld's state of one job (squeue), '' once it has forgotten it."""
    p = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T", "--jobs=" + bid],
                       capture_output=True, text=True)
    return p.stdout.strip()


def sacct_job(bid: str) -> dict:
    """Accounting's own line for a job: State, ExitCode, Start, End (the latest record)."""
    out = subprocess.run(["sacct", "--parsable2", "--noheader", "--allocations", "--jobs=" + bid,
                          "--format=JobID,State,ExitCode,Start,End"], capture_output=True, text=True,
                         check=True).stdout
    lines = [ln.split("|") for ln in out.splitlines() if ln.split("|")[0] == bid]
    assert lines, "sacct has no record of %s: %r" % (bid, out)
    f = lines[-1]
    return {"State": f[1], "ExitCode": f[2], "Start": f[3], "End": f[4]}


def wait_jobs(*ids, timeout=300) -> int:
    from jobman import api

    return api.wait([int(i) for i in ids], timeout=timeout)
