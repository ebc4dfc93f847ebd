"""Stand-ins of the paper profiles' hub models: random weights in each paper model's topology.

Each stand-in keeps what pruning and training act on: the layer count, the attention and key/value
head counts, tied or untied embeddings, the RoPE settings (theta, Llama-3.1's scaling), the context
length, the norm epsilon and the stored dtype. It shrinks every width by WIDTH_DIVISOR (hidden size,
MLP width, head_dim: 128 -> 4), which keeps the divisibility the methods rely on (11008 / 32 = 344 is
still a multiple of 8 for 4:8 sparsity), and its vocabulary is the stand-in tokenizer's. Depth and
head choices then act on the same structure as the paper's, at a few MB per model (6-7 M parameters).

The stand-in tokenizer is a byte-level BPE of 2048 tokens learned from the shipped public-domain text
(every byte is a token, so any text encodes; about 3.5 characters per token, so a 32-shot prompt stays
short on the CPU), with Llama's special tokens at Llama's ids (<unk> 0, <s> 1, </s> 2) and a BOS put
in front of every text, as Llama's tokenizers do. The config.json is written in the hub's own format (rope_theta,
rope_scaling), not re-serialized by the installed transformers, and the weights as the hub stores them:
safetensors shards with an index.
"""
from __future__ import annotations

import functools
import json
import shutil
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

from methods.core.errors import UsageError

WIDTH_DIVISOR = 32
SHARDS = 2
MARKER = ".lpc-standin.json"
STANDIN_VERSION = 1
SPECIAL = ("<unk>", "<s>", "</s>")
VOCAB = 2048

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
          "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096, "use_cache": True}
# The paper models' config.json, as published (the fields the kit and transformers read). One value is
# recalled, not read off the hub: the stored dtype (float32) of the Sheared "Pruned" checkpoints.
TOPOLOGIES: Dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": {**_LLAMA, "intermediate_size": 11008, "num_key_value_heads": 32,
                                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                                 "rope_scaling": None, "pretraining_tp": 1, "attention_bias": False,
                                 "torch_dtype": "float16", "vocab_size": 32000},
    "meta-llama/Llama-3.1-8B": {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8,
                                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                                "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                                "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                                "torch_dtype": "bfloat16", "vocab_size": 128256, "bos_token_id": 128000,
                                "eos_token_id": 128001},
    "huggyllama/llama-7b": {**_LLAMA, "intermediate_size": 11008, "max_position_embeddings": 2048,
                            "max_sequence_length": 2048, "rms_norm_eps": 1e-6, "pad_token_id": 0,
                            "torch_dtype": "float16", "vocab_size": 32000},
    "princeton-nlp/Sheared-LLaMA-2.7B-Pruned": {**_LLAMA, "hidden_size": 2560, "intermediate_size": 6912,
                                                "num_attention_heads": 20, "num_key_value_heads": 20,
                                                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                                "torch_dtype": "float32", "vocab_size": 32000},
    "princeton-nlp/Sheared-LLaMA-1.3B-Pruned": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 5504,
                                                "num_attention_heads": 16, "num_key_value_heads": 16,
                                                "num_hidden_layers": 24, "max_position_embeddings": 4096,
                                                "rms_norm_eps": 1e-5, "torch_dtype": "float32", "vocab_size": 32000},
}
WIDTHS = ("hidden_size", "intermediate_size", "head_dim")


def standin_config(repo: str) -> dict:
    """The stand-in's config.json: the paper model's, widths divided, the stand-in tokenizer's ids."""
    if repo not in TOPOLOGIES:
        raise UsageError(f"no stand-in topology for hub model {repo} (add its config to "
                         "repro/standin_models.py TOPOLOGIES)")
    config = dict(TOPOLOGIES[repo])
    for key in WIDTHS:
        if key in config:
            if config[key] % WIDTH_DIVISOR:
                raise UsageError(f"{repo}: {key} {config[key]} is not a multiple of {WIDTH_DIVISOR}")
            config[key] //= WIDTH_DIVISOR
    config.update(vocab_size=vocab_size(), bos_token_id=SPECIAL.index("<s>"), eos_token_id=SPECIAL.index("</s>"))
    return config


def scale_width(value: int) -> int:
    """A paper width (a row's hidden_size, a target shape's) in the stand-in's units."""
    return max(1, int(value) // WIDTH_DIVISOR)


# ----------------------------------------------------------------------------- the tokenizer

def vocab_size() -> int:
    return len(tokenizer())


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The stand-in tokenizer (module docstring) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from methods.core.text import SMOKE_CALIB_TEXT

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # Every byte is in the alphabet, so any text encodes; the merges come from the shipped text.
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train(sorted(str(p) for p in SMOKE_CALIB_TEXT.glob("*.txt")), trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", SPECIAL.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# ----------------------------------------------------------------------------- the models

def write_model(out: Path, repo: str) -> Path:
    """The stand-in of `repo` at out/<repo> (skipped when a complete one is there)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = out / repo
    if complete(folder):
        return folder
    config = standin_config(repo)
    torch.manual_seed(zlib.crc32(repo.encode()))
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
    dtype = getattr(torch, config["torch_dtype"])
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (config["tie_word_embeddings"] and k == "lm_head.weight")}

    def write(staging: Path) -> None:
        names = list(state)
        size = -(-len(names) // SHARDS)
        weight_map = {}
        for index in range(SHARDS):
            file = f"model-{index + 1:05d}-of-{SHARDS:05d}.safetensors"
            part = {k: state[k] for k in names[index * size:(index + 1) * size]}
            save_file(part, str(staging / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(staging / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                               "weight_map": weight_map})
        _write_json(staging / "config.json", {**config, "transformers_version": "4.43.0"})
        _write_json(staging / "generation_config.json", {"bos_token_id": config["bos_token_id"],
                                                         "eos_token_id": config["eos_token_id"]})
        tokenizer().save_pretrained(str(staging))

    write_staged(folder, write, of=repo, width_divisor=WIDTH_DIVISOR)
    return folder


def write_all(out: Path, objects) -> List[str]:
    lines = []
    for obj in objects:
        folder = write_model(out, obj.repo)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
        lines.append(f"model   {obj.repo}: {folder} ({size / 2**20:.1f} MiB, widths / {WIDTH_DIVISOR})")
    return lines


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_staged(folder: Path, writer: Callable[[Path], Optional[str]], **marker) -> Optional[str]:
    """A stand-in object written whole or not at all (the datasets too: repro/standin_data.py): `writer`
    fills a staging folder, which gets the marker (with `marker`'s fields) and is renamed into place.
    Returns the writer's reason when it skipped the object."""
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    skipped = writer(staging)
    if skipped:
        shutil.rmtree(staging, ignore_errors=True)
        return skipped
    (staging / MARKER).write_text(json.dumps({"version": STANDIN_VERSION, **marker}) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return None


def complete(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("version") == STANDIN_VERSION
