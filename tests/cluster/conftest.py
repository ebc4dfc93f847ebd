"""The cluster tier: tests against the live one-node Slurm that `make test-cluster` starts.

`make test-cluster` starts the cluster (tests/cluster/slurm_lab.py), sets LPC_CLUSTER to its
directory, runs this folder and stops the cluster. Without LPC_CLUSTER the `lab` fixture skips
every test here for one reason (one line under pytest -rs). Each test says what it checked
through the `checked` fixture; the lines are printed at the end of the run under "cluster tier:
what was checked".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "jobman"))

from slurm_lab import Lab  # noqa: E402

CLUSTER = os.environ.get("LPC_CLUSTER")
_CHECKED = []


def pytest_report_header(config):
    if CLUSTER:
        version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True,
                                 env=dict(os.environ, SLURM_CONF=str(Path(CLUSTER) / "etc" / "slurm.conf")))
        return "cluster tier: %s at %s" % ((version.stdout or version.stderr).strip(), CLUSTER)
    return None


def pytest_terminal_summary(terminalreporter):
    if _CHECKED:
        terminalreporter.section("cluster tier: what was checked")
        for test, line in _CHECKED:
            terminalreporter.write_line("%s: %s" % (test, line))


@pytest.fixture(scope="session")
def lab():
    if not CLUSTER:
        pytest.skip("cluster tier not requested: `make test-cluster` runs it against a live Slurm")
    lab = Lab(Path(CLUSTER))
    os.environ["SLURM_CONF"] = str(lab.etc / "slurm.conf")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    assert ping.returncode == 0, "the cluster at %s does not answer: %s" % (CLUSTER, ping.stdout + ping.stderr)
    lab.settings = json.loads((lab.root / "settings.json").read_text())
    return lab


@pytest.fixture
def slurm(lab, tmp_path, monkeypatch):
    """A private JOBMAN_HOME whose jobs go to the live Slurm; the cluster's node is up."""
    home = tmp_path / "jobman-home"
    monkeypatch.setenv("JOBMAN_HOME", str(home))
    monkeypatch.setenv("JOBMAN_BACKEND", "slurm")
    monkeypatch.setenv("JOBMAN_POLL", "0.2")
    monkeypatch.setenv("JOBMAN_REMOTE_POLL", "1")
    monkeypatch.delenv("JOBMAN_TEST_HOOK", raising=False)
    pp = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + (os.pathsep + pp if pp else ""))
    monkeypatch.chdir(tmp_path)
    yield home
    # whatever a failed test left in Slurm goes; the node comes back for the next test
    from jobman.store import Store

    with Store(home) as s:
        ids = [r["backend_id"] for r in s.jobs() if r["backend_id"]]
    if ids:
        subprocess.run(["scancel"] + ids, capture_output=True)
    subprocess.run(["scontrol", "update", "nodename=" + lab.settings["node"], "state=resume"], capture_output=True)


@pytest.fixture
def checked(request):
    def say(line: str) -> None:
        _CHECKED.append((request.node.name, line))

    return say
