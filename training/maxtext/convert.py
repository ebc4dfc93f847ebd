"""`lpc convert`: Hugging Face <-> MaxText checkpoints, through MaxText's own conversion.

MaxText's `checkpoint_conversion.to_maxtext` / `to_huggingface` look a model up by name in tables
of fixed sizes (HF_IDS, HF_MODEL_CONFIGS, PARAM_MAPPING, HOOK_FNS, HF_SHAPE). A pruned checkpoint
has no such name, so each conversion puts its Hugging Face config and tokenizer in the Llama-3.1
entry (whose parameter mapping and hooks are size-agnostic: q/k permuted between Hugging Face's
rotate-half layout and MaxText's interleaved one, 1/sqrt(head_dim) folded into the query kernel),
and then runs MaxText's `main` unchanged. The MaxText model config is generated from the Hugging
Face config (training/maxtext/config.py), never written per size.

A MaxText checkpoint directory written here:

    DIR/lpc_maxtext.json          source, MaxText overrides, scan_layers, versions
    DIR/maxtext.yml               the generated MaxText config (base.yml + the model's keys)
    DIR/hf/                       the Hugging Face config and tokenizer (no weights), for the way back
    DIR/checkpoint/0/items/       MaxText's Orbax parameter checkpoint

Runs in the MaxText environment (Python 3.12: `.venv-maxtext` or the `maxtext` image).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from methods.core.errors import UsageError
from training.maxtext import config as mtconfig

MANIFEST = "lpc_maxtext.json"
CONFIG_YML = "maxtext.yml"
HF_SUBDIR = "hf"
CHECKPOINT_SUBDIR = "checkpoint"
# MaxText's config accepts only the model names it ships, so a conversion's model takes the place
# of the one whose parameter mapping it uses (Llama-3.1), with override_model_config letting the
# generated keys win over that model's own yml.
MODEL_NAME = "llama3.1-8b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def cpu_environment(devices: int = 1) -> None:
    """JAX on the host CPU with `devices` simulated devices; must run before JAX is first used."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def require_maxtext() -> None:
    try:
        import maxtext  # noqa: F401
    except ImportError:
        raise UsageError("MaxText is not installed here; run this from the MaxText environment "
                         "(make .venv-maxtext/.stamp, then .venv-maxtext/bin/lpc ..., or the maxtext image)") from None


def quiet() -> None:
    """MaxText's conversion logs every parameter at INFO (and sets that level when imported)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def base_yml() -> str:
    from maxtext.configs import pyconfig

    return str(Path(pyconfig.__file__).parent / "base.yml")


def maxtext_args(overrides: Dict[str, Any]) -> List[str]:
    """`key=value` arguments for MaxText's pyconfig (OmegaConf's command-line syntax)."""
    args = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        args.append(f"{key}={text}")
    return args


def runtime_overrides(*, scan_layers: bool, dtype: str = "float32", seqlen: int = 8) -> Dict[str, Any]:
    """What a CPU conversion or forward pass needs besides the model: no distributed start-up, exact fp32."""
    return {
        "hardware": "cpu",
        "skip_jax_distributed_system": True,
        "scan_layers": scan_layers,
        "dtype": dtype,
        "weight_dtype": "float32",
        "matmul_precision": "highest",
        "attention": "dot_product",
        "per_device_batch_size": 1,
        "max_target_length": seqlen,
        "max_prefill_predict_length": seqlen,
        "enable_checkpointing": False,
        "run_name": "lpc",
        "override_model_config": True,
    }


def hf_config_object(hf_dir: Path):
    """The transformers config of a kit checkpoint (the kit's lpc_llama class registered)."""
    from transformers import AutoConfig

    from methods.modeling_lpc import register

    register()
    return AutoConfig.from_pretrained(str(hf_dir))


def register(hf_config, tokenizer_dir: Path, *, head_from_embedding: bool = False) -> str:
    """Enter `hf_config` and its tokenizer in MaxText's conversion tables under MODEL_NAME (this process only).

    `head_from_embedding`: the output kernel is read from the embedding (a tied checkpoint, converted untied).
    """
    from maxtext.checkpoint_conversion.utils import hf_model_configs, param_mapping
    from maxtext.utils import globals as mt_globals

    mt_globals.HF_IDS[MODEL_NAME] = str(tokenizer_dir)
    hf_model_configs.HF_MODEL_CONFIGS[MODEL_NAME] = hf_config
    llama = param_mapping.LLAMA31_MAXTEXT_TO_HF_PARAM_MAPPING
    if head_from_embedding:
        def mapping(config, maxtext_config, scan_layers=False):
            return {**llama(config, maxtext_config, scan_layers),
                    "params-decoder-logits_dense-kernel": "model.embed_tokens.weight"}

        param_mapping.PARAM_MAPPING[MODEL_NAME] = mapping
    else:
        param_mapping.PARAM_MAPPING[MODEL_NAME] = llama
    return MODEL_NAME


def _retie(folder: Path, source_tied: bool) -> None:
    """Undo the untying of a tied checkpoint: drop lm_head while it still equals the embedding."""
    if not source_tied:
        return
    from safetensors.numpy import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    tensors = {path: load_file(str(path)) for path in files}
    head = next((path for path, values in tensors.items() if "lm_head.weight" in values), None)
    embed = next(values["model.embed_tokens.weight"] for values in tensors.values()
                 if "model.embed_tokens.weight" in values)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if head is not None and np_equal(tensors[head]["lm_head.weight"], embed):
        values = tensors[head]
        del values["lm_head.weight"]
        save_file(values, str(head), metadata={"format": "pt"})
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"].pop("lm_head.weight", None)
            index.write_text(json.dumps(data, indent=2) + "\n")
        config["tie_word_embeddings"] = True
    else:
        config["tie_word_embeddings"] = False  # trained in MaxText with two copies: now truly untied
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def np_equal(a, b) -> bool:
    import numpy as np

    return a.shape == b.shape and bool(np.array_equal(a, b))


def to_maxtext(hf_dir: Path, out: Path, *, scan_layers: bool = True) -> Dict[str, Any]:
    """Convert the Hugging Face checkpoint `hf_dir` to a MaxText checkpoint directory `out` (fp32)."""
    hf_dir, out = Path(hf_dir), Path(out)
    raw = mtconfig.read_hf_config(hf_dir)
    model = mtconfig.model_overrides(raw)  # refuses what MaxText cannot express, before any loading
    if not list(hf_dir.glob("*.safetensors")):
        raise UsageError(f"{hf_dir} has no .safetensors weights (save the checkpoint with safe_serialization)")
    require_maxtext()
    cpu_environment()
    from maxtext.checkpoint_conversion import to_maxtext as mt_to_maxtext

    quiet()
    staging = _staging(out)
    try:
        hf_copy = staging / HF_SUBDIR
        hf_copy.mkdir()
        shutil.copy2(hf_dir / "config.json", hf_copy / "config.json")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, hf_copy / name)
        hf_config = hf_config_object(hf_dir)
        name = register(hf_config, hf_copy, head_from_embedding=mtconfig.is_tied(raw))
        overrides = {**model, **runtime_overrides(scan_layers=scan_layers),
                     "model_name": name, "base_output_directory": str(staging / CHECKPOINT_SUBDIR)}
        _patch_hf_config_dict(hf_config)
        mt_to_maxtext.main(args=["lpc", base_yml(), *maxtext_args(overrides)], lazy_load_tensors=False,
                           eager_load_method="safetensors", hf_model_path=str(hf_dir), save_dtype="float32",
                           simulated_cpu_devices_count=1)
        manifest = write_manifest(staging, source=str(hf_dir), model=model, scan_layers=scan_layers)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _patch_hf_config_dict(hf_config) -> None:
    """MaxText's Llama mapping reads head_dim from the config dict; older configs derive it."""
    if getattr(hf_config, "head_dim", None) is None:
        hf_config.head_dim = hf_config.hidden_size // hf_config.num_attention_heads


def write_manifest(folder: Path, *, source: str, model: Dict[str, Any], scan_layers: bool) -> Dict[str, Any]:
    from methods.core.provenance import provenance

    manifest = {"format": 1, "source": source, "maxtext_model": model, "scan_layers": scan_layers,
                "checkpoint": f"{CHECKPOINT_SUBDIR}/0/items", **provenance()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    # base.yml without a folder: MaxText looks it up among its own configs, on whichever machine runs it.
    # No model_name: a shipped model's yml would override these keys.
    yml = ["# Generated by lpc convert from the Hugging Face config; MaxText reads it as its config file.",
           "base_config: base.yml"]
    yml += [f"{key}: {json.dumps(value)}" for key, value in model.items()]
    (folder / CONFIG_YML).write_text("\n".join(yml) + "\n")
    return manifest


def read_manifest(mt_dir: Path) -> Dict[str, Any]:
    mt_dir = Path(mt_dir)
    path = mt_dir / MANIFEST
    if not path.is_file():
        raise UsageError(f"{mt_dir} is not a MaxText checkpoint written by lpc convert (no {MANIFEST})")
    return json.loads(path.read_text())


def params_path(mt_dir: Path, manifest: Optional[Dict[str, Any]] = None) -> Path:
    """The Orbax item holding the parameters, or one UsageError line if there are none."""
    mt_dir = Path(mt_dir).resolve()  # Orbax reads a relative path as nothing at all
    manifest = manifest or read_manifest(mt_dir)
    items = mt_dir / manifest["checkpoint"]
    if not items.is_dir():
        raise UsageError(f"{mt_dir}: no MaxText checkpoint at {manifest['checkpoint']}")
    require_maxtext()
    cpu_environment()
    import orbax.checkpoint as ocp

    try:
        tree = ocp.PyTreeCheckpointer().metadata(items).item_metadata.tree
    except Exception as exc:  # orbax raises a variety of types for a broken or foreign folder
        raise UsageError(f"{items} is not a readable Orbax checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict) or "params" not in tree:
        found = ", ".join(sorted(tree)) if isinstance(tree, dict) else type(tree).__name__
        raise UsageError(f"{items} holds no model parameters ('params'; found: {found or 'nothing'})")
    return items


def to_hf(mt_dir: Path, out: Path) -> Path:
    """Convert the MaxText checkpoint directory `mt_dir` back to a Hugging Face checkpoint `out`."""
    mt_dir, out = Path(mt_dir), Path(out)
    manifest = read_manifest(mt_dir)
    items = params_path(mt_dir, manifest)
    from absl import flags
    from maxtext.checkpoint_conversion import to_huggingface as mt_to_hf

    quiet()
    hf_config = hf_config_object(mt_dir / HF_SUBDIR)
    _patch_hf_config_dict(hf_config)
    name = register(hf_config, mt_dir / HF_SUBDIR)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["lpc"])  # to_huggingface reads two absl flags of its own; their defaults apply
    staging = _staging(out)
    try:
        overrides = {**manifest["maxtext_model"], **runtime_overrides(scan_layers=manifest["scan_layers"]),
                     "model_name": name, "load_parameters_path": str(items),
                     "base_output_directory": str(staging)}
        with _tokenizer_optional(mt_to_hf, mt_dir / HF_SUBDIR):
            mt_to_hf.main(["lpc", base_yml(), *maxtext_args(overrides)])
        _retie(staging, mtconfig.is_tied(json.loads((mt_dir / HF_SUBDIR / "config.json").read_text())))
        if hf_config.model_type == "lpc_llama":
            from methods.modeling_lpc import source_files

            for source in source_files():
                shutil.copy2(source, staging / source.name)
            # MaxText writes to_json_file(), which leaves out the auto_map that lets plain transformers
            # load the class with trust_remote_code; the source config carries it.
            source = json.loads((mt_dir / HF_SUBDIR / "config.json").read_text())
            written = json.loads((staging / "config.json").read_text())
            for key in ("auto_map", "architectures"):
                if key in source:
                    written[key] = source[key]
            (staging / "config.json").write_text(json.dumps(written, indent=2) + "\n")
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


@contextlib.contextmanager
def _tokenizer_optional(mt_to_hf, hf_dir: Path):
    """A weights-only source (no tokenizer files) converts back weights only: MaxText's export loads a
    tokenizer unconditionally, though its writer saves one only when given; without files it gets none."""
    if has_tokenizer(hf_dir):
        yield
        return

    class NoTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return None

    original = mt_to_hf.AutoTokenizer
    mt_to_hf.AutoTokenizer = NoTokenizer
    try:
        yield
    finally:
        mt_to_hf.AutoTokenizer = original


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _replace(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
