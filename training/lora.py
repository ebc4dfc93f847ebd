"""LoRA recovery after pruning: LLM-Pruner's `post_training.py`, which Shortened LLaMA's
`lora_retrain.py` repeats, as one plain training loop (`lpc train --kind lora` runs it as a stage).

    report = recover(model, tokenizer, LoraRecipe.from_spec({"data": "alpaca-cleaned", "max_steps": 20}),
                     device="cuda", seed=42)

What the original does, and this file reproduces:

* data: `yahma/alpaca-cleaned` (or a local JSONL of {instruction, input, output}); a validation
  split of `val_set_size` (2000) drawn as `datasets.train_test_split(test_size, shuffle=True,
  seed=42)` draws it; the training part is then shuffled (unseeded in the original, seeded here);
* the Alpaca prompt template; each example tokenized with truncation at `cutoff_len` (256); an EOS
  appended to the full text when it is not already last and was not truncated; with
  `train_on_inputs` false the labels of the prompt part (the prompt tokenized alone, no EOS) are -100;
* micro-batches of `micro_batch_size` (4) padded on the left with id 0 to a multiple of 8 (labels
  with -100), gradients accumulated to `batch_size` (64); `epochs` (2) passes;
* LoRA r 8, alpha 16, dropout 0.05 on q, k, v, o, gate, down, up, no bias; every other weight frozen;
* AdamW (torch defaults, weight decay 0), learning rate `lr` (1e-4) with `warmup_steps` (100) of
  linear warm-up from 0, then linear decay to 0 at the last step; gradient norm clipped at 1.0
  (the HF Trainer defaults the original relied on);
* precision: "fp16" (the original's `fp16=True`) or "bf16" autocast on a GPU, LoRA weights in fp32;
  "fp32" on a CPU;
* validation loss every `eval_steps` (100) and at the end; `select_best` keeps the LoRA weights of
  the best validation loss (the original's `load_best_model_at_end`).

Afterwards the adapters are merged (`merge_and_unload`) into the very `model` object passed in, which
holds no peft module afterwards, so the caller evaluates and saves it like any other model.

Deliberate differences (none changes what is optimised): the loss of a micro-batch is its mean
token loss and a step averages its micro-batches (the 2023 Trainer's `loss / accumulation`, with a
short last step of an epoch averaged over what it has); each epoch is one seeded permutation; the
original's `prepare_model_for_int8_training` fp32 casts of norms and lm_head are left to autocast
(HF Llama computes its norms and loss in fp32 anyway).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from methods.core.errors import UsageError
from methods.core.text import SMOKE_INSTRUCTIONS

if TYPE_CHECKING:
    from training.kinds.lora import LoraRecipe

ALPACA_HUB = "yahma/alpaca-cleaned"
ALPACA_NAMES = ("alpaca-cleaned", ALPACA_HUB)
IGNORE = -100
PAD_MULTIPLE = 8

# The Alpaca template (tloen/alpaca-lora's `alpaca.json`, which LLM-Pruner's Prompter uses verbatim).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# ----------------------------------------------------------------------------- data

def load_instructions(spec: str) -> Tuple[List[dict], dict]:
    """(records, provenance) for `alpaca-cleaned` (the hub), `smoke` (the shipped offline set) or a
    local JSONL file."""
    if spec in ALPACA_NAMES:
        from methods.core import hub

        rows = hub.load_dataset(ALPACA_HUB, split="train")
        records = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
                   for r in rows]
        return records, {"data": ALPACA_HUB, "fingerprint": getattr(rows, "_fingerprint", None)}
    path = SMOKE_INSTRUCTIONS if spec == "smoke" else Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"recovery data not found: {spec} (use 'alpaca-cleaned' or a JSONL file)")
    raw = path.read_bytes()
    records = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("instruction"), str) \
                or not isinstance(item.get("output"), str) or not isinstance(item.get("input", ""), str):
            raise UsageError(f"{path}:{number}: expected an object with string instruction, output (and input)")
        records.append({"instruction": item["instruction"], "input": item.get("input", ""), "output": item["output"]})
    if not records:
        raise UsageError(f"recovery data {path} holds no records")
    return records, {"data": spec, "sha256": hashlib.sha256(raw).hexdigest()}


def split_validation(count: int, val_size: int, seed: int = 42) -> Tuple[List[int], List[int]]:
    """(train, val) indices as `datasets.Dataset.train_test_split(test_size=val_size, shuffle=True,
    seed=seed)` draws them: one numpy PCG64 permutation, the first val_size rows are the test part."""
    if val_size == 0:
        return list(range(count)), []
    if val_size >= count:
        raise UsageError(f"val_set_size {val_size} leaves no training examples out of {count}")
    permutation = np.random.default_rng(seed).permutation(count)
    return permutation[val_size:].tolist(), permutation[:val_size].tolist()


def prompt(instruction: str, input_text: str = "", output: Optional[str] = None) -> str:
    """The Alpaca prompt (with the response appended when given), as LLM-Pruner's Prompter builds it."""
    text = (PROMPT_INPUT.format(instruction=instruction, input=input_text) if input_text
            else PROMPT_NO_INPUT.format(instruction=instruction))
    return f"{text}{output}" if output else text


def tokenize_example(tokenizer, record: dict, recipe: LoraRecipe) -> Dict[str, List[int]]:
    """input_ids and labels of one example (post_training.py's generate_and_tokenize_prompt)."""
    full = _tokenize(tokenizer, prompt(record["instruction"], record["input"], record["output"]),
                     recipe.cutoff_len, add_eos=True)
    labels = list(full)
    if not recipe.train_on_inputs:
        user = _tokenize(tokenizer, prompt(record["instruction"], record["input"]), recipe.cutoff_len,
                         add_eos=recipe.add_eos_token)
        masked = len(user) - (1 if recipe.add_eos_token else 0)
        labels = [IGNORE] * masked + labels[masked:]
    return {"input_ids": full, "labels": labels[:len(full)]}


def _tokenize(tokenizer, text: str, cutoff: int, *, add_eos: bool) -> List[int]:
    ids = list(tokenizer(text, truncation=True, max_length=cutoff, padding=False)["input_ids"])
    eos = tokenizer.eos_token_id
    # The EOS goes on only when the text was not cut off and does not already end with it.
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff:
        ids.append(eos)
    return ids


def collator(tokenizer, pad_id: int):
    """transformers' DataCollatorForSeq2Seq as the original configured it: left padding with `pad_id`
    to the longest example rounded up to a multiple of 8, labels padded with -100. It pads a copy of
    the tokenizer, so the caller's (saved with the checkpoint) keeps its own padding settings."""
    from transformers import DataCollatorForSeq2Seq

    padder = copy.deepcopy(tokenizer)
    padder.padding_side = "left"
    padder.pad_token_id = pad_id
    return DataCollatorForSeq2Seq(padder, pad_to_multiple_of=PAD_MULTIPLE, label_pad_token_id=IGNORE,
                                  return_tensors="pt")


# ----------------------------------------------------------------------------- training

def recover(model: nn.Module, tokenizer, recipe: "LoraRecipe", *, device: str = "cpu", seed: int = 0) -> dict:
    """Fine-tune LoRA adapters on instruction data, merge them into `model` in place, return a report."""
    target = torch.device(device)
    if recipe.precision != "fp32" and target.type != "cuda":
        raise UsageError(f"precision {recipe.precision} is mixed-precision training on a GPU; use fp32 on {target.type}")
    if tokenizer is None:
        raise UsageError("LoRA recovery needs the model's tokenizer")
    start = time.perf_counter()
    records, provenance = load_instructions(recipe.data)
    train_idx, val_idx = split_validation(len(records), recipe.val_set_size, recipe.split_seed)
    train = [tokenize_example(tokenizer, records[i], recipe) for i in train_idx]
    val = [tokenize_example(tokenizer, records[i], recipe) for i in val_idx]

    model.to(target)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    torch.manual_seed(seed)  # LoRA A init and dropout
    targets = stored_targets(model, recipe.targets)
    peft_model = _attach(model, targets, recipe)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    try:
        log = _train(peft_model, lora_params, train, val, recipe, target, seed,
                     collator(tokenizer, recipe.pad_token_id))
        if recipe.select_best and log["best_state"] is not None:
            _load_lora_state(peft_model, log["best_state"])
        merged = peft_model.merge_and_unload()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
    if merged is not model:
        raise RuntimeError("peft returned another model object on merge; the caller's model would be stale")
    _strip_peft(model)
    model.eval()
    report = {
        "kind": "lora", **provenance,
        "examples": {"train": len(train), "val": len(val)},
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(recipe).items()},
        "adapted_modules": targets, "seed": seed, "device": str(target),
        "trainable_parameters": sum(p.numel() for p in lora_params),
        **{k: v for k, v in log.items() if k != "best_state"},
        "seconds": round(time.perf_counter() - start, 3),
    }
    return report


def stored_targets(model: nn.Module, targets) -> List[str]:
    """The target names as the model's architecture stores them: a projection fused with others into
    one Linear (Phi-3's q, k, v in qkv_proj, gate and up in gate_up_proj) is adapted as that Linear, one
    adapter of rank r over the fused rows rather than one per projection."""
    from methods.anatomy import anatomy_of
    from methods.architectures import PARTS, SEPARATE

    try:
        anatomy = anatomy_of(model)
    except UsageError:
        return list(targets)
    stored = {SEPARATE[p].rsplit(".", 1)[-1]: anatomy.projections[p].rsplit(".", 1)[-1] for p in PARTS}
    return list(dict.fromkeys(stored.get(t, t) for t in targets))


def _attach(model: nn.Module, targets: List[str], recipe: LoraRecipe):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("LoRA recovery needs the 'peft' package: pip install peft") from None
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UsageError(f"LoRA targets {', '.join(missing)} match no Linear of the model")
    config = LoraConfig(r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft asks transformers 5 for a renamed attribute; the deprecation notice is peft's to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # adapters train in fp32 whatever the base weights are
    return peft_model


def _train(model, params: List[torch.Tensor], train: List[dict], val: List[dict], recipe: LoraRecipe,
           device: torch.device, seed: int, collate) -> dict:
    from transformers import get_linear_schedule_with_warmup

    micro_per_epoch = int(math.ceil(len(train) / recipe.micro_batch_size))
    steps_per_epoch = int(math.ceil(micro_per_epoch / recipe.accumulation))
    total = recipe.max_steps or steps_per_epoch * recipe.epochs
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, recipe.warmup_steps, total)
    autocast = _autocast(recipe.precision, device)
    # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16")
    generator = torch.Generator().manual_seed(seed)
    log = {"steps": 0, "micro_batches": 0, "tokens": 0, "label_tokens": 0, "train_loss": None,
           "val_loss": None, "best_val_loss": None, "best_step": None, "history": [], "best_state": None,
           "steps_planned": total}
    step_losses: List[float] = []
    for batches in _optimizer_steps(train, recipe, generator, total, collate):
        model.train()
        losses = []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = model(**batch, use_cache=False).loss
            scaler.scale(loss / len(batches)).backward()
            losses.append(float(loss.detach()))
            log["micro_batches"] += 1
            log["tokens"] += int(batch["attention_mask"].sum())
            log["label_tokens"] += int((batch["labels"] != IGNORE).sum())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log["steps"] += 1
        step_losses.append(sum(losses) / len(losses))
        last = log["steps"] == total
        if val and (log["steps"] % recipe.eval_steps == 0 or last):
            loss = evaluate_loss(model, val, collate, recipe.micro_batch_size, device, autocast)
            log["history"].append({"step": log["steps"], "train_loss": step_losses[-1], "val_loss": loss})
            log["val_loss"] = loss
            if log["best_val_loss"] is None or loss < log["best_val_loss"]:
                log["best_val_loss"], log["best_step"] = loss, log["steps"]
                if recipe.select_best:
                    log["best_state"] = _lora_state(model)
    model.eval()
    # The last logging window of the Trainer (10 steps): what "final train loss" reads.
    window = step_losses[-10:]
    log["train_loss"] = sum(window) / len(window) if window else None
    log["first_train_loss"] = step_losses[0] if step_losses else None
    log["selected_step"] = log["best_step"] if recipe.select_best and log["best_state"] is not None else log["steps"]
    return log


def _optimizer_steps(train: List[dict], recipe: LoraRecipe, generator: torch.Generator,
                     total: int, collate) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Micro-batches grouped per optimizer step, epoch after epoch, until `total` steps."""
    done = 0
    while done < total:
        order = torch.randperm(len(train), generator=generator).tolist()
        micro = [order[i:i + recipe.micro_batch_size] for i in range(0, len(order), recipe.micro_batch_size)]
        for first in range(0, len(micro), recipe.accumulation):
            yield [collate([train[i] for i in ids]) for ids in micro[first:first + recipe.accumulation]]
            done += 1
            if done >= total:
                return


def evaluate_loss(model, val: List[dict], collate, micro_batch_size: int, device: torch.device,
                  autocast=contextlib.nullcontext) -> float:
    """Mean over validation examples of their micro-batch's mean token loss (the Trainer's eval_loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(val), micro_batch_size):
            chunk = val[first:first + micro_batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            with autocast():
                loss = model(**batch, use_cache=False).loss
            total += float(loss) * len(chunk)
            count += len(chunk)
    model.train(was_training)
    return total / count


def _autocast(precision: str, device: torch.device):
    """A context factory: fp16 / bf16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _lora_state(model) -> Dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _load_lora_state(model, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _strip_peft(model: nn.Module) -> None:
    """Whatever peft left on the base model after unloading (its config attribute, adapter hooks)."""
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    leftovers = [name for name, m in model.named_modules() if "lora" in type(m).__name__.lower()]
    if leftovers:
        raise RuntimeError(f"LoRA modules left after merge_and_unload: {leftovers[:3]}")
