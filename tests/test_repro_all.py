"""`lpc repro --all`: every method of the registry, each run or submitted as `lpc repro METHOD` is.
The submissions themselves are stood in for here; the cluster tier runs them through Slurm."""
from __future__ import annotations

import pytest

from methods.registry import REGISTRY
from repro import runner, submit
from repro.cli import main


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(submit, "submit", lambda method, profile, **kw: seen.append(
        ("submit", method, profile, kw["backend"], kw["rows"])) or [])
    monkeypatch.setattr(runner, "run", lambda method, profile, **kw: seen.append(
        ("run", method, profile, None, kw["rows"])) or True)
    return seen


def test_all_submits_every_registered_method_in_order(calls, tmp_path):
    assert main(["repro", "--all", "--profile", "smoke", "--submit", "slurm", "--results-dir", str(tmp_path)]) == 0
    assert calls == [("submit", m, "smoke", "slurm", None) for m in REGISTRY]


def test_all_without_submit_runs_each_method_here(calls, tmp_path):
    assert main(["repro", "--all", "--methods", "magnitude,shortgpt", "--results-dir", str(tmp_path)]) == 0
    assert calls == [("run", "magnitude", "smoke", None, None), ("run", "shortgpt", "smoke", None, None)]


def test_all_gives_each_method_its_own_rows_and_skips_a_method_with_none(calls, tmp_path, capsys):
    assert main(["repro", "--all", "--methods", "magnitude,wanda,shortgpt,flap", "--rows",
                 "dense,2of4,2of4-sparse,bi-6", "--submit", "local", "--results-dir", str(tmp_path)]) == 0
    assert [(c[1], c[4]) for c in calls] == [("magnitude", ["dense", "2of4"]),
                                            ("wanda", ["dense", "2of4", "2of4-sparse"]),
                                            ("shortgpt", ["dense", "bi-6"]), ("flap", ["dense"])]
    assert main(["repro", "--all", "--methods", "magnitude,flap", "--rows", "2of4", "--submit", "local",
                 "--results-dir", str(tmp_path)]) == 0
    assert calls[-1][1:] == ("magnitude", "smoke", "local", ["2of4"]) and "[flap] skipped" in capsys.readouterr().out


def test_all_skips_a_method_without_the_profile(calls, tmp_path, capsys):
    assert main(["repro", "--all", "--profile", "paper-llama2", "--submit", "slurm", "--results-dir",
                 str(tmp_path)]) == 0
    having = [c[1] for c in calls]
    assert having and set(having) < set(REGISTRY)
    out = capsys.readouterr().out
    assert all("[%s] skipped" % m in out for m in REGISTRY if m not in having)


@pytest.mark.parametrize("args,needle", [
    (["repro", "--all", "magnitude"], "give a method or --all"),
    (["repro"], "give a method or --all"),
    (["repro", "magnitude", "--methods", "wanda"], "--methods goes with --all"),
    (["repro", "--all", "--methods", "wanda,nope"], "unknown method nope"),
    (["repro", "--all", "--rows", "dense,no-such-row"], "no method of --all has row no-such-row"),
    (["repro", "--all", "--recipe", "x.yaml"], "--recipe goes with one method"),
])
def test_bad_all_invocations_are_one_line_exit_2(calls, args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert calls == []
