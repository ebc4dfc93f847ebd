"""Continued pre-training on MaxText, a few CPU steps end to end (the MaxText venv: `make test-maxtext`).

A converted tiny Llama trains on the kit's token file (written as ArrayRecord, the collection's data
layout) with MaxText's own trainer; the loss goes down, the result exports to Hugging Face and the
kit's loader and perplexity read it, and the perplexity on the training windows went down too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("maxtext", reason="MaxText runs in .venv-maxtext (make test-maxtext)")

sys.path.insert(0, str(Path(__file__).parent))
from test_maxtext_convert import _save, _tiny  # noqa: E402

from methods import scoring  # noqa: E402
from training import stage  # noqa: E402
from methods.core.errors import UsageError  # noqa: E402
from methods.core.models import load_model  # noqa: E402
from training.maxtext import train  # noqa: E402
from training.options import parse_options  # noqa: E402


def _options(**values):
    base = dict(kind="cpt", steps=6, global_batch=4, micro_batch=4, seqlen=32, lr=1e-2, warmup_fraction=0.0)
    base.update(values)
    return parse_options(base)


def test_cpt_few_steps_loss_decreases_and_exports(tmp_path):
    hf = _save(_tiny(num_key_value_heads=2), tmp_path / "tiny")
    rows = np.random.default_rng(0).integers(0, 512, size=(4, 33))
    tokens = np.repeat(rows, 4, axis=0)  # a few windows seen again and again: learnable in six steps
    np.save(tmp_path / "tokens.npy", tokens)
    options = _options(model=str(hf), data=str(tmp_path / "tokens.npy"), out=str(tmp_path / "out"), engine="maxtext")
    # As a TPU slice's chain runs it (lpc repro --submit skypilot --tpu): three phases, each a command.
    phase = {name: options.model_copy(update={"phase": name}) for name in ("prepare", "run", "export")}
    with pytest.raises(UsageError, match="--phase prepare first"):
        stage.train(phase["run"], log=lambda _: None)
    assert stage.train(phase["prepare"], log=lambda _: None) == 0
    assert stage.train(phase["prepare"], log=lambda _: None) == 0  # a rerun finds it prepared, keeps it
    with pytest.raises(UsageError, match="--phase run first"):
        stage.train(phase["export"], log=lambda _: None)
    assert stage.train(phase["run"], log=lambda _: None) == 0
    assert not (tmp_path / "out" / "train.json").exists()
    assert stage.train(phase["export"], log=lambda _: None) == 0
    report = json.loads((tmp_path / "out" / "train.json").read_text())
    # the whole command (phase all) then finds the same inputs trained
    assert stage.train(options, log=lambda _: None) == 0
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == report
    assert report["engine"] == "maxtext" and report["options"]["engine"] == "maxtext"

    losses = report["losses"]
    assert len(losses) == options.steps and losses[-1] < losses[0]
    out = tmp_path / "out"
    assert (out / "maxtext" / "data" / "train.array_record").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["num_key_value_heads"] == 2
    before, _ = load_model(str(hf), load_tokenizer=False)
    after, _ = load_model(str(out), load_tokenizer=False)
    windows = torch.as_tensor(rows[:, :32])
    assert scoring.perplexity(after, windows, "rows") < scoring.perplexity(before, windows, "rows")
    changed = [name for name, p in after.named_parameters()
               if not torch.equal(p, dict(before.named_parameters())[name])]
    assert changed  # every kind of weight moved, not only some
    assert {name.split(".")[-2] for name in changed} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj", "embed_tokens", "lm_head"}


@pytest.mark.parametrize("kind", ["sparse", "kd", "lora"])
def test_kinds_maxtext_cannot_express_are_refused(kind):
    with pytest.raises(UsageError, match=f"kind {kind} is not supported"):
        train.check_kind(kind)


def test_text_data_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="ArrayRecord") as info:
        train.data_files(str(tmp_path / "corpus.txt"), tmp_path, 32)
    assert len(str(info.value).splitlines()) == 1
