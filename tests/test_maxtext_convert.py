"""Hugging Face <-> MaxText conversion, checked by logits (the collection's `convert.sh logits_test`).

Runs in the MaxText venv (`make test-maxtext`); in the main venv the MaxText parts skip and only the
refusals that need no MaxText run. For each kind of uniform checkpoint the kit writes (tiny MHA and
GQA Llamas, a Llama-3.1-style one with RoPE scaling and tied embeddings, a depth-pruned and a
width-pruned one, and the smoke model): HF and MaxText forwards of the same tokens agree to 1e-3
in fp32 with the same argmax, and HF -> MaxText -> HF gives back every tensor bit for bit.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from repro import cli

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _has_maxtext() -> bool:
    try:
        import maxtext  # noqa: F401
    except ImportError:
        return False
    return True


needs_maxtext = pytest.mark.skipif(not _has_maxtext(), reason="MaxText runs in .venv-maxtext (make test-maxtext)")


def _smoke_dir() -> Path:
    from methods.core.models import resolve

    return Path(resolve("smoke"))


def _save(model, out: Path) -> Path:
    from methods.core.models import save_checkpoint

    save_checkpoint(model, None, out)
    for name in TOKENIZER_FILES:  # MaxText's export writes a tokenizer: give the tiny models the smoke one
        if (_smoke_dir() / name).is_file():
            shutil.copy2(_smoke_dir() / name, out / name)
    return out


def _tiny(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    values = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5)
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    with torch.no_grad():  # random norm scales, so a dropped or misplaced norm weight shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def _make(kind: str, root: Path) -> Path:
    from methods import surgery

    if kind == "smoke":
        return _smoke_dir()
    if kind == "mha":
        model = _tiny()
    elif kind == "gqa":
        model = _tiny(num_key_value_heads=2)
    elif kind == "llama31":  # Llama-3.1 RoPE scaling, theta 500000, tied embeddings (as SmolLM2)
        model = _tiny(num_key_value_heads=2, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    elif kind == "depth":
        model = _tiny(num_key_value_heads=2)
        surgery.remove_layers(model, [1, 2])
        surgery.sync_config(model)
    elif kind == "width":  # Minitron-width's shape: hidden no longer heads x head_dim, MLP cut uniformly
        model = _tiny(num_key_value_heads=2)
        surgery.keep_hidden_channels(model, list(range(0, 64, 4)) + list(range(1, 64, 2)))
        for layer in model.model.layers:
            surgery.keep_mlp_channels(layer, list(range(0, 96, 2)))
        surgery.sync_config(model)
    else:
        raise ValueError(kind)
    return _save(model, root / kind)


KINDS = ("mha", "gqa", "llama31", "depth", "width", "smoke")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (hf dir, MaxText dir, hf dir after the round trip), made once per module."""
    root = tmp_path_factory.mktemp("maxtext")
    out = {}
    for kind in KINDS:
        hf = _make(kind, root / "hf")
        mt, back = root / "mt" / kind, root / "back" / kind
        assert cli.main(["convert", "--to", "maxtext", "--model", str(hf), "--out", str(mt)]) == 0
        assert cli.main(["convert", "--to", "hf", "--model", str(mt), "--out", str(back)]) == 0
        out[kind] = (hf, mt, back)
    return out


def _hf_logits(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    from methods.core.models import load_model

    model, _ = load_model(str(model_dir), load_tokenizer=False)
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@needs_maxtext
def test_width_fixture_is_the_kits_uniform_lpc_llama(converted):
    config = json.loads((converted["width"][0] / "config.json").read_text())
    assert config["model_type"] == "lpc_llama" and config["hidden_size"] == 48
    assert config["num_attention_heads"] * config["head_dim"] != config["hidden_size"]
    assert len(set(config["layer_intermediate_size"])) == 1


@needs_maxtext
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf(converted, kind):
    from training.maxtext import model as mt_model

    hf, mt, _ = converted[kind]
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 24))
    reference = _hf_logits(hf, tokens)
    ours = mt_model.load(mt, seqlen=tokens.shape[1], batch=tokens.shape[0]).logits(tokens)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1e-3
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


@needs_maxtext
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_reproduces_every_tensor(converted, kind):
    from safetensors.numpy import load_file

    hf, _, back = converted[kind]

    def tensors(folder):
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(path)))
        return out

    before, after = tensors(hf), tensors(back)
    assert set(before) == set(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    old = json.loads((hf / "config.json").read_text())
    new = json.loads((back / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "layer_intermediate_size"):
        assert new.get(key) == old.get(key), key
    # The same RoPE, whichever layout (rope_theta or rope_parameters) the transformers version wrote.
    from training.maxtext.config import model_overrides

    assert model_overrides(new) == model_overrides(old)
    reloaded = _hf_logits(back, np.arange(12)[None] % old["vocab_size"])
    assert np.array_equal(reloaded, _hf_logits(hf, np.arange(12)[None] % old["vocab_size"]))


@needs_maxtext
def test_a_relative_maxtext_path_reads_as_the_absolute_one(converted, monkeypatch):
    """Orbax reads a relative folder as an empty tree; the kit resolves it first (`lpc eval --model mt/x`)."""
    from training.maxtext import convert

    _, mt, _ = converted["gqa"]
    monkeypatch.chdir(mt.parent)
    assert convert.params_path(Path(mt.name)) == convert.params_path(mt)


@needs_maxtext
def test_weights_only_checkpoint_converts_back_to_weights(tmp_path):
    """A checkpoint without tokenizer files (issue 21: MaxText's export loaded a tokenizer anyway and
    ended in a transformers traceback) goes to MaxText and back, weights and config, no tokenizer."""
    from methods.core.models import save_checkpoint
    from safetensors.numpy import load_file

    hf = tmp_path / "weights-only"
    save_checkpoint(_tiny(num_key_value_heads=2), None, hf)
    assert not any((hf / name).exists() for name in TOKENIZER_FILES)
    mt, back = tmp_path / "mt", tmp_path / "back"
    assert cli.main(["convert", "--to", "maxtext", "--model", str(hf), "--out", str(mt)]) == 0
    assert cli.main(["convert", "--to", "hf", "--model", str(mt), "--out", str(back)]) == 0
    assert not any((back / name).exists() for name in TOKENIZER_FILES)
    before = {k: v for p in hf.glob("*.safetensors") for k, v in load_file(str(p)).items()}
    after = {k: v for p in back.glob("*.safetensors") for k, v in load_file(str(p)).items()}
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- refusals (any venv)

def _main_error(capsys, argv):
    capsys.readouterr()  # what the fixture's saving printed
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_non_uniform_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    from methods import surgery

    model = _tiny(num_key_value_heads=2)
    surgery.keep_mlp_channels(model.model.layers[0], list(range(48)))
    surgery.sync_config(model)
    folder = _save(model, tmp_path / "flap-like")
    code, err = _main_error(capsys, ["convert", "--to", "maxtext", "--model", str(folder),
                                     "--out", str(tmp_path / "mt")])
    assert code == 2 and len(err.splitlines()) == 1
    assert "non-uniform" in err and "layer_intermediate_size=[48, 96]" in err
    assert not (tmp_path / "mt").exists()


def test_other_rope_scaling_is_refused(tmp_path, capsys):
    model = _tiny(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    folder = _save(model, tmp_path / "llama32-like")
    code, err = _main_error(capsys, ["convert", "--to", "maxtext", "--model", str(folder),
                                     "--out", str(tmp_path / "mt")])
    assert code == 2 and len(err.splitlines()) == 1 and "Llama-3.1" in err


def test_maxtext_dir_without_manifest_or_params_is_refused(tmp_path, capsys):
    code, err = _main_error(capsys, ["convert", "--to", "hf", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.splitlines()) == 1 and "lpc_maxtext.json" in err
    (tmp_path / "lpc_maxtext.json").write_text(json.dumps({"checkpoint": "checkpoint/0/items", "scan_layers": True}))
    code, err = _main_error(capsys, ["convert", "--to", "hf", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.splitlines()) == 1 and "no MaxText checkpoint" in err


@needs_maxtext
def test_checkpoint_holding_no_params_is_refused(tmp_path, capsys):
    import orbax.checkpoint as ocp

    items = tmp_path / "mt" / "checkpoint" / "0" / "items"
    ocp.PyTreeCheckpointer().save(items, {"opt_state": {"count": np.zeros((), np.int32)}})
    (tmp_path / "mt" / "lpc_maxtext.json").write_text(json.dumps({"checkpoint": "checkpoint/0/items"}))
    code, err = _main_error(capsys, ["convert", "--to", "hf", "--model", str(tmp_path / "mt"),
                                     "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.splitlines()) == 1 and "holds no model parameters" in err and "opt_state" in err


@pytest.mark.skipif(_has_maxtext(), reason="checks the message given where MaxText is missing")
def test_without_maxtext_convert_says_where_to_run(tmp_path, capsys):
    folder = _save(_tiny(), tmp_path / "tiny")
    code, err = _main_error(capsys, ["convert", "--to", "maxtext", "--model", str(folder), "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.splitlines()) == 1 and ".venv-maxtext" in err
