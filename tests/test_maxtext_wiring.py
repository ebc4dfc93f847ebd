"""`lpc train --engine maxtext` and `lpc eval --backend maxtext`: what is refused, in one line, in any venv.

The MaxText runs themselves are tested in the MaxText venv (test_maxtext_train.py, test_maxtext_lm.py).
"""
from __future__ import annotations

import importlib.util

import pytest

from methods.core.errors import UsageError
from repro import cli, eval_stage
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
        eval_stage.EVAL_BACKENDS["maxtext"](str(tmp_path), dtype="float32")


def test_eval_backend_refuses_a_directory_that_is_not_maxtext(tmp_path):
    if not HAS_MAXTEXT:
        pytest.skip("needs MaxText (else the missing install is what is refused)")
    with pytest.raises(UsageError, match="not a MaxText directory"):
        eval_stage.EVAL_BACKENDS["maxtext"](str(tmp_path), dtype="float32")


def test_tpu_and_phase_are_maxtext_settings_checked_against_jobmans_table():
    values = dict(model="smoke", data="smoke", kind="cpt", steps=2, global_batch=2, micro_batch=2, seqlen=16,
                  lr=1e-3, out="o")
    for extra, flag in (({"tpu": "v4-32"}, "--tpu"), ({"phase": "run"}, "--phase")):
        with pytest.raises(UsageError, match=f"{flag} is an --engine maxtext setting"):
            parse_options({**values, **extra})
    with pytest.raises(UsageError, match="--tpu: unknown TPU accelerator type 'v4-31'"):
        parse_options({**values, "engine": "maxtext", "tpu": "v4-31"})
    sliced = parse_options({**values, "engine": "maxtext", "tpu": "v5p-16", "phase": "run"})
    whole = parse_options({**values, "engine": "maxtext"})
    # where and in how many parts it runs does not change what it computes
    assert sliced.fingerprint_fields() == whole.fingerprint_fields()


def test_the_slice_gives_the_trainer_its_chips(monkeypatch):
    from training.maxtext import train

    values = dict(model="smoke", data="smoke", kind="cpt", steps=2, global_batch=64, micro_batch=2, seqlen=16,
                  lr=1e-3, out="o", engine="maxtext")
    assert train.slice_of(parse_options({**values, "tpu": "v4-32"}), None, 1) == ("tpu", 16)
    assert train.slice_of(parse_options({**values, "tpu": "v6e-8"}), None, 1) == ("tpu", 8)
    monkeypatch.delenv("TPU_NAME", raising=False)
    assert train.slice_of(parse_options(values), None, 2) == ("cpu", 2)


def test_the_dclm_arrayrecord_spec_reads_its_variable(monkeypatch):
    from training.maxtext import train

    monkeypatch.delenv(train.DCLM_ARRAY_RECORD_ENV, raising=False)
    with pytest.raises(UsageError, match="set LPC_DCLM_ARRAY_RECORD") as info:
        train.resolve_data("dclm-arrayrecord")
    assert len(str(info.value).splitlines()) == 1
    monkeypatch.setenv(train.DCLM_ARRAY_RECORD_ENV, "gs://bucket/dclm/llama3_64_array_record/*.array_record")
    assert train.resolve_data("dclm-arrayrecord") == "gs://bucket/dclm/llama3_64_array_record/*.array_record"
    assert train.resolve_data("tokens.npy") == "tokens.npy"
