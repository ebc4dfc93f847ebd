"""Capture the Slurm outputs that the fast suite's recorded-output tests parse (tests/jobman/data).

    SLURM_CONF=build/cluster/etc/slurm.conf python3 tests/cluster/capture_slurm_outputs.py tests/jobman/data

Needs the cluster tier's Slurm running (tests/cluster/slurm_lab.py start) and takes about three
minutes (a job has to overrun a one-minute limit, a requeued job to wait out its begin time). Each
job is a batch script that jobman's Slurm backend writes, submitted with ``sbatch --parsable`` as
jobman does, and the outputs are read with jobman's own squeue and sacct argument vectors at three
moments: jobs running and pending, the node just set DOWN under two running jobs, all done.
`jobs.json` maps each scenario to the job id Slurm gave it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from jobman.backends.slurm import SACCT_FORMAT, SQUEUE_FORMAT, batch_script  # noqa: E402
from jobman.spec import build_spec  # noqa: E402


def run(argv, env=None, stdin=None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True,
                          env=dict(os.environ, **(env or {}))).stdout


def sbatch(out_dir: Path, name: str, argv, options=None, extra_env=None, sbatch_args=()) -> str:
    spec = build_spec(dict(options or {}), list(argv))
    spec.submit_dir = str(out_dir)
    text = batch_script(spec, name, str(out_dir / "slurm-%j.out"), None, (options or {}).get("dependency_text"))
    return run(["sbatch", "--parsable", *sbatch_args], env=extra_env, stdin=text)


def state(jid: str) -> str:
    return run(["squeue", "--noheader", "--states=all", "--format=%T", "--jobs=" + jid]).strip()


def wait_for(pred, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    raise SystemExit("timed out waiting for " + what)


def snapshot(dest: Path, tag: str, ids) -> None:
    jobs = "--jobs=" + ",".join(sorted({i.split("_")[0] for i in ids}, key=int))
    (dest / ("squeue_%s.txt" % tag)).write_text(
        run(["squeue", "--noheader", "--states=all", "--format=" + SQUEUE_FORMAT, jobs]))
    (dest / ("sacct_%s.txt" % tag)).write_text(
        run(["sacct", "--parsable2", "--noheader", "--duplicates", "--format=" + SACCT_FORMAT, jobs]))


def main(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(run(["mktemp", "-d", "/tmp/lpc-capture-XXXXXX"]).strip())
    node = run(["sinfo", "--noheader", "--format=%N"]).strip()
    raw = sbatch(work, "ok", ["sh", "-c", "echo ok"])
    (dest / "sbatch_parsable.txt").write_text(raw)
    ids = {"completed": raw.strip()}
    ids["failed_exit3"] = sbatch(work, "exit3", ["sh", "-c", "sleep 1; exit 3"]).strip()
    # the srun step is killed for memory; the batch step, and so the job, ends FAILED
    ids["oom"] = sbatch(work, "oom", ["python3", "-c", "x = bytearray(400 << 20); import time; time.sleep(5)"],
                        extra_env={"SBATCH_MEM_PER_NODE": "64M"}).strip()
    ids["timeout"] = sbatch(work, "timeout", ["sleep", "300"], {"time_limit": "0:05"}).strip()
    ids["cancelled_running"] = sbatch(work, "cancel", ["sleep", "300"]).strip()
    ids["pending_dependency"] = sbatch(work, "dep", ["true"], {"dependency_text": "afterok:" + ids["timeout"]}).strip()
    ids["array"] = sbatch(work, "sweep", ["sleep", "3"], {"array": "0-3%2"}).strip()
    wait_for(lambda: state(ids["cancelled_running"]) == "RUNNING", "a running job")
    time.sleep(2)
    snapshot(dest, "live", ids.values())
    run(["scancel", ids["cancelled_running"]])
    wait_for(lambda: state(ids["timeout"]) == "TIMEOUT", "the time limit")
    wait_for(lambda: "PENDING" not in run(["squeue", "--noheader", "--format=%T"]), "every pending job")
    # The node goes DOWN under a job Slurm may requeue (its default) and one that opted out.
    ids["node_fail_requeued"] = sbatch(work, "requeued", ["sleep", "20"]).strip()
    ids["node_fail"] = sbatch(work, "nodefail", ["sleep", "300"], sbatch_args=["--no-requeue"]).strip()
    wait_for(lambda: state(ids["node_fail"]) == "RUNNING" and state(ids["node_fail_requeued"]) == "RUNNING",
             "two running jobs")
    run(["scontrol", "update", "nodename=" + node, "state=down", "reason=capture"])
    time.sleep(2)
    snapshot(dest, "nodedown", ids.values())
    run(["scontrol", "update", "nodename=" + node, "state=resume"])
    wait_for(lambda: state(ids["node_fail_requeued"]) == "COMPLETED", "the requeued job to run again")
    snapshot(dest, "final", ids.values())
    (dest / "jobs.json").write_text(json.dumps(ids, indent=1) + "\n")
    (dest / "slurm_version.txt").write_text(run(["sinfo", "--version"]))
    run(["rm", "-rf", str(work)])
    print("captured %s into %s" % (", ".join(sorted(ids)), dest))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
