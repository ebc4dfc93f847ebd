"""Slurm backend: parsing of recorded outputs, the generated batch script, launch and refresh.

The recorded outputs in data/ were written to Slurm's documented formats (see data/README.md),
not captured from a live cluster. sbatch/sacct/srun/scontrol are replaced by small stand-in
scripts on PATH; the batch script itself really runs under bash.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from jobman.backends.slurm import batch_script, parse_sacct, parse_sbatch_parsable, parse_squeue
from jobman.errors import BackendError
from jobman.spec import build_spec

DATA = Path(__file__).parent / "data"


def test_parse_sbatch():
    assert parse_sbatch_parsable((DATA / "sbatch_parsable.txt").read_text()) == "4242"
    assert parse_sbatch_parsable((DATA / "sbatch_parsable_cluster.txt").read_text()) == "4243"
    with pytest.raises(BackendError):
        parse_sbatch_parsable("sbatch: error: Batch job submission failed\n")


def test_parse_sacct():
    r = parse_sacct((DATA / "sacct_parsable2.txt").read_text())
    assert r["4242"]["state"] == "COMPLETED" and r["4242"]["exit_code"] == 0 and r["4242"]["end"] is not None
    assert "4242.batch" not in r and "4242.0" not in r
    assert (r["4243"]["state"], r["4243"]["exit_code"]) == ("FAILED", 2)
    assert r["4244"]["state"] == "FAILED" and r["4244"]["slurm_state"] == "TIMEOUT"
    assert r["4245"]["state"] == "FAILED" and r["4245"]["signal"] == 125
    assert r["4246"]["state"] == "CANCELLED" and r["4246"]["signal"] == 15
    assert r["4247"]["state"] == "RUNNING" and r["4247"]["end"] is None
    assert r["4248"]["state"] == "PENDING" and r["4248"]["start"] is None
    assert [r["4250_%d" % i]["state"] for i in range(4)] == ["COMPLETED", "RUNNING", "PENDING", "PENDING"]
    assert r["4251"]["state"] == "RECOVERING" and r["4252"]["state"] == "NODE_FAIL"


def test_parse_squeue():
    r = parse_squeue((DATA / "squeue_format.txt").read_text())
    assert r["4248"] == {"slurm_state": "PENDING", "state": "PENDING", "reason": "Dependency"}
    assert r["4250_2"]["reason"] == "JobArrayTaskLimit" and "4250_3" in r


def _stub(bindir: Path, name: str, body: str) -> None:
    p = bindir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    b = tmp_path / "bin"
    b.mkdir()
    # srun: drop its own options, run the rest (the prelude via bash -c, then the user argv)
    _stub(b, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _stub(b, "scontrol", 'if [ "$1" = show ]; then printf "node-a\\nnode-b\\n"; else echo "$@" >> "%s"; fi\n'
          % (tmp_path / "scontrol.log"))
    _stub(b, "sbatch", 'cat > "%s"; cat "%s"\n' % (tmp_path / "submitted.sh", DATA / "sbatch_parsable_cluster.txt"))
    _stub(b, "sacct", 'echo "$@" > "%s"\ncat "%s"\n' % (tmp_path / "sacct.args", tmp_path / "sacct.out"))
    _stub(b, "scancel", 'echo "$@" >> "%s"\n' % (tmp_path / "scancel.log"))
    monkeypatch.setenv("PATH", str(b) + os.pathsep + os.environ["PATH"])
    return tmp_path


def test_batch_script_runs_argv_with_rank_env_and_retries(fake_slurm, tmp_path):
    evil = "x; $(touch %s) 'y'" % (tmp_path / "pwn")
    counter = tmp_path / "n"
    spec = build_spec({"accelerator": "H100:8", "nodes": 2, "retries": 2, "env": ["MSG=hello world"]},
                      ["bash", "-c", 'n=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s; '
                       'echo "$JOBMAN_NODE_RANK/$JOBMAN_NUM_NODES $MASTER_ADDR $MSG attempt=$JOBMAN_ATTEMPT $1"; '
                       '[ $((n+1)) -ge 2 ]' % (counter, counter), "arg0", evil])
    text = batch_script(spec, "t", "out.log")
    assert "#SBATCH --gpus-per-node=h100:8" in text and "#SBATCH --nodes=2" in text
    env = dict(os.environ, SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_ID="77")
    p = subprocess.run(["bash", "-c", text], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "1/2 node-a hello world attempt=2 %s" % evil
    assert "attempt 1 exited with 1; retrying" in p.stderr
    assert not (tmp_path / "pwn").exists()


def test_launch_refresh_cancel_with_stub_commands(fake_slurm, jm_home, tmp_path):
    from jobman import api
    from jobman.store import Store

    spec = build_spec({"backend": "slurm", "accelerator": "A100:4", "array": "0-3"}, ["python3", "x.py"])
    ids = api.submit(spec)
    s = Store()
    assert [s.get(i)["backend_id"] for i in ids] == ["4243_0", "4243_1", "4243_2", "4243_3"]
    submitted = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-3" in submitted
    (tmp_path / "sacct.out").write_text("4243_0|x|COMPLETED|0:0|2026-01-12T12:00:00|2026-01-12T12:01:00|00:01:00\n"
                                        "4243_1|x|FAILED|3:0|2026-01-12T12:00:00|2026-01-12T12:01:00|00:01:00\n"
                                        "4243_[2-3]|x|PENDING|0:0|Unknown|Unknown|00:00:00\n")
    api.refresh(s)
    assert [s.get(i)["state"] for i in ids] == ["COMPLETED", "FAILED", "PENDING", "PENDING"]
    assert s.get(ids[1])["exit_code"] == 3
    assert "--jobs=4243" in (tmp_path / "sacct.args").read_text()
    # a dependency on a Slurm job becomes Slurm's own --dependency
    dep = build_spec({"backend": "slurm", "dependency": ["afterok:%d" % ids[0]]}, ["true"])
    api.submit(dep)
    assert "#SBATCH --dependency=afterok:4243" in (tmp_path / "submitted.sh").read_text()
    api.cancel([str(ids[2])], store=s)
    assert (tmp_path / "scancel.log").read_text().split() == ["4243_2"]
    assert s.get(ids[2])["state"] == "CANCELLED"
    s.close()


def test_missing_slurm_commands_are_reported(jm_home, monkeypatch, tmp_path):
    from jobman import api

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendError, match="sbatch not found"):
        api.submit(build_spec({"backend": "slurm"}, ["true"]))
