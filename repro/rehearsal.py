"""A rehearsal: a paper profile, every row, through the same stages (prune -> train -> evaluate -> diff)
on the CPU, against the stand-in mirror (`lpc mirror rehearsal`), so that a first paper run does not
find the bugs after hours of GPU time.

It differs from the paper run in these ways only, each applied to the recipe and table as read:

* every hub read answers from the stand-in mirror (LPC_HUB_MIRROR, required; repro/standin_*.py);
* the device is the CPU, and the stand-in models' widths are the paper's / 32 (repro/standin_models.py),
  so the options that name a width (minitron-width's hidden_size and ffn_hidden_size, a sheared target
  shape) are divided by 32 too; depths, head counts and every other option stay;
* sample counts and steps are cut to the numbers below; LoRA's GPU mixed precision (fp16/bf16
  autocast with a grad scaler) trains in fp32, the only precision its loop has on a CPU. Shots,
  metrics, perplexity protocols and their window length, model dtypes, schedules and every other
  setting are the paper's.

The results carry `rehearsal` (the cuts and the mirror), so `lpc diff` shows their cells as REHEARSED
(ran, not compared): a rehearsal proves that every row runs and produces every cell, not any number.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from methods.core.errors import UsageError

CUTS: Dict[str, Any] = {
    "calibration_samples": 4,        # at most, of the calibration spec's nsamples
    "calibration_seqlen": 128,       # at most, tokens per calibration sample
    "eval_limit": 4,                 # lm-eval documents per task (recipe `limit`); shots unchanged
    "ppl_windows": 1,                # windows per perplexity metric; the protocol's window length unchanged
    "score_limit": 2,                # documents of a method's own lm-eval scorer (minitron-depth)
    "train_steps": 2,
    "train_global_batch": 4,
    "train_micro_batch": 2,
    "train_seqlen": 64,
    "train_nproc": 2,                # FSDP2 kinds run on two CPU processes, as a multi-GPU run shards
    "save_every": 1,                 # a resumable checkpoint every step (the paper's every 500 never falls)
    "held_out_windows": 2,           # dynamic batch loading's evaluation windows per domain
    "update_interval": 1,            # dynamic batch loading updates after every step (paper: 800 / 50)
    "lora_val_set_size": 2,
    "lora_steps_between": 1,         # LoRA's warmup_steps and eval_steps
}
# The local inputs a recipe names by a path of its own (sheared's converted RedPajama folders) are read
# from the stand-in mirror's local/ folder; MaxText's DCLM ArrayRecord files from local/<its variable>.
LOCAL = "local"


def mirror_root() -> Path:
    from methods.core import hub

    root = hub.mirror()
    if root is None:
        raise UsageError(f"a rehearsal reads the stand-in mirror: set {hub.MIRROR_ENV} (write one with "
                         "`lpc mirror rehearsal --out DIR`; make rehearse-<method> does both)")
    return root


def recipe_config(config: dict, rows: Dict[str, dict], method: str) -> tuple:
    """The rehearsal's (config, rows) of a paper profile's, cut as the module docstring says."""
    import copy

    from repro.standin_models import scale_width

    root = mirror_root()
    config, rows = copy.deepcopy(config), copy.deepcopy(rows)
    config["device"] = "cpu"
    config["limit"] = min(config.get("limit") or CUTS["eval_limit"], CUTS["eval_limit"])
    calibration = config.get("calibration")
    if calibration:
        calibration["nsamples"] = min(calibration["nsamples"], CUTS["calibration_samples"])
        calibration["seqlen"] = min(calibration["seqlen"], CUTS["calibration_seqlen"])
    for name, spec in (config.get("training") or {}).items():
        config["training"][name] = train_spec(spec, root)
    for options in rows.values():
        for key in ("hidden_size", "ffn_hidden_size"):
            if isinstance(options.get(key), int):
                options[key] = scale_width(options[key])
        if "target_shape" in options:
            options["target_shape"] = _scaled_shape(options["target_shape"])
        if "score" in options and options["score"] != "ppl":
            options["limit"] = min(options.get("limit") or CUTS["score_limit"], CUTS["score_limit"])
    config["rehearsal"] = {"cuts": CUTS, "mirror": str(root)}
    return config, rows


def train_spec(spec: dict, root: Path) -> dict:
    """A train spec with its steps, batches and held-out windows cut (its schedule's fractions kept)."""
    from training import kinds

    spec = dict(spec)
    spec["steps"] = min(spec.get("steps") or CUTS["train_steps"], CUTS["train_steps"])
    spec["global_batch"] = min(spec["global_batch"], CUTS["train_global_batch"])
    spec["micro_batch"] = min(spec["micro_batch"], CUTS["train_micro_batch"])
    spec["seqlen"] = min(spec["seqlen"], CUTS["train_seqlen"])
    spec["save_every"] = CUTS["save_every"]
    if kinds.get(spec["kind"]).distributed and spec.get("engine", "hf") == "hf":
        spec["nproc"] = CUTS["train_nproc"]
    if spec.get("update_interval"):
        spec["update_interval"] = CUTS["update_interval"]
    if "eval_windows" in spec:
        spec["eval_windows"] = min(spec["eval_windows"], CUTS["held_out_windows"])
    for key in ("data", "eval_data"):
        value = spec.get(key)
        if isinstance(value, str) and _is_local(value):
            spec[key] = str(root / LOCAL / value)
    if spec.get("recipe"):  # a kind's own settings (LoRA's recipe): its counts cut, as the steps are
        recipe = dict(spec["recipe"])
        for key, cut in (("val_set_size", "lora_val_set_size"), ("warmup_steps", "lora_steps_between"),
                         ("eval_steps", "lora_steps_between")):
            if key in recipe:
                recipe[key] = min(recipe[key], CUTS[cut])
        if recipe.get("precision", "fp32") != "fp32":
            # LoRA's fp16/bf16 is autocast with a GPU's grad scaler, which the CPU has not: the one
            # precision the rehearsal changes (training/lora.py refuses it on a CPU).
            recipe["precision"] = "fp32"
        spec["recipe"] = recipe
    return spec


def environment(root: Path) -> Dict[str, str]:
    """The variables a rehearsal sets for its stages: MaxText's DCLM files in the stand-in, no hub."""
    from training.maxtext.train import DCLM_ARRAY_RECORD_ENV

    return {DCLM_ARRAY_RECORD_ENV: str(root / LOCAL / DCLM_ARRAY_RECORD_ENV / "*.array_record"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def table_profile(table):
    """The table with one window per perplexity metric (the window length is the protocol's)."""
    metrics = {}
    for key, metric in table.metrics.items():
        if metric.kind == "perplexity":
            windows = min(metric.max_windows or CUTS["ppl_windows"], CUTS["ppl_windows"])
            metric = metric.model_copy(update={"max_windows": windows})
            metric.model_fields_set.add("max_windows")
        metrics[key] = metric
    rehearsed = table.model_copy(update={"metrics": metrics})
    rehearsed._name = table.name
    return rehearsed


def _is_local(spec: str) -> bool:
    from repro.hub_objects import data_objects

    return any(obj.kind == "local" and obj.repo == spec for obj in data_objects(spec))


def _scaled_shape(shape):
    from methods.sheared import read_target
    from repro.standin_models import scale_width

    values = read_target(shape)
    return {**values, "hidden_size": scale_width(values["hidden_size"]),
            "intermediate_size": scale_width(values["intermediate_size"])}
