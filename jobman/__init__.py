"""jobman: Slurm-style jobs (submit, queue, acct, cancel, logs, requeue) on top of real engines.

Backends: ``local`` (real processes on this machine), ``skypilot`` (managed jobs on cloud TPU/GPU)
and ``slurm`` (sbatch/squeue/sacct/scancel). State lives in one SQLite database (WAL mode) under
``$JOBMAN_HOME`` (default ``~/.jobman``). See ``jobman/README.md``.

Library use::

    from jobman import api
    ids = api.submit(api.JobSpec(argv=["python", "train.py"], name="train"))
    api.wait(ids)
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]
