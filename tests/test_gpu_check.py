"""`make gpu-check` on a machine without CUDA: the one-line refusal, and its plumbing (each part in a
process of its own, one JSON, a failed part recorded and the exit status 1) at toy sizes on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from repro import gpu_check
from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "repro.gpu_check", "--out", str(tmp_path / "g.json")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_an_unknown_part_is_refused(capsys):
    assert gpu_check.main(["--parts", "wanda,nope"]) == 2
    assert "unknown part nope" in capsys.readouterr().err


def test_parts_run_in_their_own_processes_into_one_json(tmp_path, monkeypatch):
    """The 2:4 part at a toy MLP on the CPU (where torch has no semi-structured kernels it says so),
    and a part that fails: recorded with its error, the others still run, exit status 1."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "gpu-check.json"
    argv = ["--device", "cpu", "--mlp", "64", "128", "--tokens", "16", "--out", str(out)]
    assert gpu_check.main(argv + ["--parts", "sparse-2of4"]) == 0
    part = json.loads(out.read_text())["parts"]["sparse-2of4"]
    assert part["ok"] and part["mlp"] == [64, 128] and isinstance(part["supported"], bool)
    if part["supported"]:
        assert part["dense_seconds"] > 0 and part["max_relative_difference"] < 0.05
    else:
        assert part["reason"]
    # A width no 2:4 block divides fails that part; train-mfu on the CPU still runs and says "not measured".
    argv[argv.index("128")] = "130"
    assert gpu_check.main(argv + ["--parts", "sparse-2of4,train-mfu"]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert not parts["sparse-2of4"]["ok"] and parts["sparse-2of4"]["error"]
    assert parts["train-mfu"]["ok"] and parts["train-mfu"]["measured"] is False
