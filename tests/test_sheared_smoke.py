"""Sheared LLaMA's smoke profile end to end (slow tier, `make test-all`): SmolLM2-135M sheared toward
hidden 384, 2 key/value groups, 24 layers, MLP 1024 on three chapters of the shipped text (about an
hour of CPU on 2 shared cores), continued pre-training, the random control, evaluation and the diff
against the stored references and claims. The fast tier covers the same pipeline on the golden tiny
model (tests/test_sheared.py).
"""
from __future__ import annotations

import pytest

from repro.cli import main
from methods.core.results import read_json


@pytest.mark.slow
def test_the_smoke_profile_shears_continues_and_passes_its_table(tmp_path, capsys):
    from methods.core.smoke_model import smoke_model_dir

    smoke_model_dir()
    code = main(["repro", "sheared", "--profile", "smoke", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out and "PENDING" not in out
    sheared = read_json(tmp_path / "smoke" / "sheared" / "shear.json")
    assert sheared["metrics"]["hidden_size"] == 384 and sheared["metrics"]["num_hidden_layers"] == 24
    assert abs(sheared["prune"]["gates"]["expected_over_target"] - 1) <= 0.02
