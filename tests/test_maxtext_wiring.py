"""`lpc train --engine maxtext` and `lpc eval --backend maxtext`: what is refused, in one line, in any venv.

The MaxText runs themselves are tested in the MaxText venv (test_maxtext_train.py, test_maxtext_lm.py).
"""
from __future__ import annotations

import importlib.util

import pytest

from methods.errors import UsageError
from repro import cli, stages
from training.options import parse_options

HAS_MAXTEXT = importlib.util.find_spec("maxtext") is not None
BASE = ["train", "--model", "smoke", "--data", "smoke", "--steps", "2", "--global-batch", "2",
        "--micro-batch", "2", "--seqlen", "16", "--lr", "1e-3"]


def _run(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("kind, extra", [("kd", ["--teacher", "smoke"]), ("sparse", []), ("sheared", [])])
def test_kinds_other_than_cpt_are_refused(tmp_path, capsys, kind, extra):
    code, err = _run(capsys, BASE + ["--kind", kind, "--engine", "maxtext", "--out", str(tmp_path / "o"), *extra])
    assert code == 2 and len(err.splitlines()) == 1
    assert "--engine maxtext" in err and not (tmp_path / "o").exists()


def test_engine_defaults_to_hf_and_leaves_fingerprints_alone():
    values = dict(model="smoke", data="smoke", kind="cpt", steps=2, global_batch=2, micro_batch=2, seqlen=16,
                  lr=1e-3, out="o")
    hf = parse_options(values)
    assert hf.engine == "hf" and "engine" not in hf.fingerprint_fields()
    assert parse_options({**values, "engine": "maxtext"}).fingerprint_fields()["engine"] == "maxtext"
    with pytest.raises(UsageError, match="--nproc"):
        parse_options({**values, "engine": "maxtext", "nproc": 2})


@pytest.mark.skipif(HAS_MAXTEXT, reason="the refusal is for environments without MaxText")
def test_without_maxtext_both_are_refused_in_one_line(tmp_path, capsys):
    code, err = _run(capsys, BASE + ["--kind", "cpt", "--engine", "maxtext", "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.splitlines()) == 1 and "MaxText is not installed" in err
    with pytest.raises(UsageError, match="MaxText is not installed"):
        stages.EVAL_BACKENDS["maxtext"](str(tmp_path), dtype="float32")


def test_eval_backend_refuses_a_directory_that_is_not_maxtext(tmp_path):
    if not HAS_MAXTEXT:
        pytest.skip("needs MaxText (else the missing install is what is refused)")
    with pytest.raises(UsageError, match="not a MaxText directory"):
        stages.EVAL_BACKENDS["maxtext"](str(tmp_path), dtype="float32")
