"""The collection through Slurm: `lpc repro --all --profile smoke --submit slurm` for three methods
(pruning only, pruning with training, a depth method), waited for, diffed, and rerun to submit
nothing. `lpc` runs in the kit's main venv (LPC_MAIN_PYTHON, set by `make test-cluster`)."""
from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

from slurm_helpers import rows, wait_jobs

REPO = Path(__file__).resolve().parents[2]
# width pruning alone, sparse pruning then training, layer removal: each with the dense gate before it
METHODS = {"minitron-width": ["dense", "h288-f768"], "wanda": ["dense", "2of4-sparse"], "shortgpt": ["dense", "bi-6"]}


def lpc(*args, env):
    python = os.environ.get("LPC_MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    return subprocess.run([python, "-m", "repro.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)


def test_three_methods_through_slurm_then_a_rerun_submits_nothing(slurm, tmp_path, checked):
    results = tmp_path / "results"
    sentinel = "hf_lpc_sentinel_%s" % uuid.uuid4().hex
    env = dict(os.environ, HF_TOKEN=sentinel)
    rows_arg = ",".join(sorted({r for rs in METHODS.values() for r in rs}))
    command = ["repro", "--all", "--methods", ",".join(METHODS), "--rows", rows_arg, "--profile", "smoke",
               "--submit", "slurm", "--results-dir", str(results)]
    start = time.time()
    p = lpc(*command, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    ids = [int(i) for i in re.findall(r"^submitted job (\d+) ", p.stdout, re.M)]
    evals = sum(len(rs) for rs in METHODS.values())
    expected = evals + (evals - len(METHODS)) + 1 + len(METHODS)  # evals, prunes, wanda's training, diffs
    assert len(ids) == len(rows()) == expected, p.stdout
    assert {r["backend"] for r in rows()} == {"slurm"} and all(r["backend_id"] for r in rows())
    status = wait_jobs(*ids, timeout=3600)
    elapsed = time.time() - start
    states = {r["name"]: r["state"] for r in rows()}
    assert status == 0 and set(states.values()) == {"COMPLETED"}, states
    for method, method_rows in METHODS.items():  # the diff jobs passed; so does lpc diff here
        d = lpc("diff", method, "--profile", "smoke", "--results-dir", str(results), "--rows", ",".join(method_rows),
                "--no-plots", env=env)
        assert d.returncode == 0, d.stdout + d.stderr
        assert all((results / "smoke" / method / ("%s.json" % r)).is_file() for r in method_rows)
    again = lpc(*command, env=env)
    assert again.returncode == 0 and again.stdout.count("0 jobs submitted to slurm") == len(METHODS), again.stdout
    assert len(rows()) == expected
    stored = [f for d in (slurm, results) for f in d.rglob("*") if f.is_file()]
    assert not [str(f) for f in stored if sentinel.encode() in f.read_bytes()]
    checked("lpc repro --all --methods %s --rows %s --submit slurm: %d jobs (dense gate, prune -> train -> eval, "
            "diff), all COMPLETED in %.0f s; lpc diff passes; the rerun submitted nothing; HF_TOKEN by name only"
            % (",".join(METHODS), rows_arg, len(ids), elapsed))
