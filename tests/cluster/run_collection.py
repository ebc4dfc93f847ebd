"""`make cluster-collection`: the whole collection through the cluster tier's Slurm, timed.

    python tests/cluster/run_collection.py --profile smoke --results-dir results/cluster

Runs `lpc repro --all --profile P --submit slurm` (every method with the profile; a rehearsal
profile goes the same way), waits for every job jobman holds in $JOBMAN_HOME, runs `lpc diff --all`
on the results and prints the wall time from the first submission to the last job's end. Exits
with the diff's status, or 1 if a job did not complete.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--results-dir", default="results/cluster")
    a = p.parse_args(argv)
    from jobman import api
    from jobman.store import Store

    lpc = [sys.executable, "-m", "repro.cli"]
    start = time.time()
    subprocess.run(lpc + ["repro", "--all", "--profile", a.profile, "--submit", "slurm", "--results-dir",
                          a.results_dir], check=True)
    with Store() as store:
        jobs = store.jobs()
        status = api.wait([r["id"] for r in jobs]) if jobs else 0
        failed = [(r["name"], r["state"]) for r in store.jobs() if r["state"] != "COMPLETED"]
    elapsed = time.time() - start
    print("collection through Slurm (%s): %d jobs in %dh %02dm %02ds; not completed: %s" % (
        a.profile, len(jobs), elapsed // 3600, elapsed % 3600 // 60, elapsed % 60, failed or "none"))
    diff = subprocess.run(lpc + ["diff", "--all", "--no-plots", "--results-dir", a.results_dir])
    return diff.returncode or (1 if failed or status else 0)


if __name__ == "__main__":
    sys.exit(main())
