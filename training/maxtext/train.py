"""Continued pre-training on MaxText: the kit's training options in, a Hugging Face checkpoint out.

    OUT/maxtext/                 the converted starting point (lpc convert --to maxtext) and the run
    OUT/maxtext/data/            the kit's token file as ArrayRecord (tf.train.Example, int64 `text`:
                                 the layout of the collection's DCLM `llama3_64_array_record`)
    OUT/maxtext/runs/train/      MaxText's own output: checkpoints/<step>/items, metrics.jsonl
    OUT/                         the trained model exported back to Hugging Face, plus train.json

The trainer is MaxText's (`python -m maxtext.trainers.pre_train.train`), one process per host, with
the config generated from the checkpoint (model keys) and the kit's options (training keys,
config.training_overrides). Three phases, all run by one `lpc train --engine maxtext`, or one at a
time (`--phase`) where a TPU slice has several hosts and OUT is on storage they all mount (`lpc repro
--submit skypilot --tpu v4-32` chains them as three jobs): `prepare` converts the checkpoint and the
data on one host; `run` is MaxText's trainer on every host of the slice (`--tpu` names it: its chips
share the global batch); `export` writes the Hugging Face checkpoint and train.json on one host.
Here it all runs on the CPU with JAX's CPU build.

Kinds: `cpt`. `sparse` needs the gradient masking the collection patched into MaxText (0.2.5 has
only its own N:M mask search, weight_sparsity_n/m, which re-selects the mask), `kd` MaxText's
separate distillation trainer, `lora` the HF path; all three are refused here in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from methods.core.errors import UsageError
from training.maxtext import config as mtconfig
from training.maxtext import convert

KINDS = ("cpt",)
RUN_NAME = "train"
ARRAY_RECORD_SUFFIX = ".array_record"


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        why = {"sparse": "MaxText 0.2.5 cannot keep a given mask's zeros at zero (its weight_sparsity "
                         "re-selects N:M masks); use --engine hf",
               "kd": "MaxText's distillation is a separate trainer the kit does not drive yet; use --engine hf",
               "lora": "LoRA recovery runs on the Hugging Face model; use --engine hf"}.get(kind, "unknown kind")
        raise UsageError(f"lpc train --engine maxtext: kind {kind} is not supported ({why})")


def write_array_record(tokens: np.ndarray, path: Path) -> Path:
    """Token windows [N, S] as ArrayRecord records of tf.train.Example with an int64 `text` feature."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from maxtext.input_pipeline.protos import example_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for row in np.asarray(tokens, dtype=np.int64):
            example = example_pb2.Example()
            example.features.feature["text"].int64_list.value.extend(row.tolist())
            writer.write(example.SerializeToString())
    finally:
        writer.close()
    return path


# The collection's DCLM shards (`llama3_64_array_record`: 64 ArrayRecord files of Llama-3 tokens,
# spec 4.1) live in the user's own bucket or disk: a recipe names them by this spec, and the files
# are where this variable points (a glob or gs:// pattern), on every host that reads them.
DCLM_ARRAY_RECORD = "dclm-arrayrecord"
DCLM_ARRAY_RECORD_ENV = "LPC_DCLM_ARRAY_RECORD"


def resolve_data(spec: str) -> str:
    """The files `--data SPEC` names: `dclm-arrayrecord` through its variable, anything else as given."""
    if spec != DCLM_ARRAY_RECORD:
        return spec
    files = os.environ.get(DCLM_ARRAY_RECORD_ENV, "").strip()
    if not files:
        raise UsageError(f"--data {DCLM_ARRAY_RECORD}: set {DCLM_ARRAY_RECORD_ENV} to the collection's DCLM "
                         "ArrayRecord files (a glob or gs://BUCKET/.../*.array_record)")
    return files


def data_files(spec: str, folder: Path, seqlen: int) -> str:
    """MaxText's grain_train_files for `spec`: ArrayRecord files as given, or a token file converted."""
    from methods.core import text

    spec = resolve_data(spec)
    if ARRAY_RECORD_SUFFIX in spec or spec.startswith("gs://"):
        return spec  # the collection's DCLM shards (a local glob or a bucket path), used as they are
    path = Path(os.path.expanduser(spec))
    if path.suffix not in text.TOKEN_FILE_SUFFIXES:
        raise UsageError(f"--engine maxtext reads ArrayRecord files (*{ARRAY_RECORD_SUFFIX}) or a token file "
                         f"({', '.join(text.TOKEN_FILE_SUFFIXES)}), not {spec!r}")
    tokens = np.asarray(text.load_token_file(str(path)))
    if tokens.shape[1] < seqlen:
        raise UsageError(f"token file rows have {tokens.shape[1]} tokens, fewer than --seqlen {seqlen}")
    return str(write_array_record(tokens[:, :seqlen], folder / f"train{ARRAY_RECORD_SUFFIX}"))


def epochs_needed(files: str, steps: int, global_batch: int) -> int:
    """Passes over a local ArrayRecord file that `steps` batches need (MaxText stops when data runs out)."""
    path = Path(files)
    if not path.is_file():
        return 1  # a glob or a bucket: the collection's data is far larger than a run
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        windows = reader.num_records()
    finally:
        reader.close()
    return max(1, -(-steps * global_batch // max(windows, 1)))


def run_overrides(options, *, files: str, devices: int, hardware: str, base_output: Path) -> Dict[str, Any]:
    keys = mtconfig.training_overrides(
        steps=options.steps, global_batch=options.global_batch, micro_batch=options.micro_batch,
        seqlen=options.seqlen, lr=options.lr, warmup_fraction=options.warmup_fraction,
        warmup_cap=options.warmup_cap, final_lr_fraction=options.final_lr_fraction, beta1=options.beta1,
        beta2=options.beta2, eps=options.eps, weight_decay=options.weight_decay, grad_clip=options.grad_clip,
        devices=devices, seed=options.seed, checkpoint_period=options.save_every or None)
    keys.update({
        "hardware": hardware,
        "base_output_directory": str(base_output),
        "run_name": RUN_NAME,
        "dataset_type": "grain",
        "grain_file_type": "arrayrecord",
        "grain_train_files": files,
        "tokenize_train_data": False,
        "packing": False,
        "enable_data_shuffling": options.shuffle,
        "num_epoch": epochs_needed(files, options.steps, options.global_batch),
        "metrics_file": str(base_output / RUN_NAME / "metrics.jsonl"),
        "enable_tensorboard": False,
        "weight_dtype": "float32",
    })
    if hardware == "cpu":
        keys.update({"dtype": "float32", "matmul_precision": "highest", "attention": "dot_product",
                     "grain_worker_count": 0, "skip_jax_distributed_system": True})
    return keys


PREPARED = "prepared.json"   # in OUT/maxtext: the inputs' fingerprint and the data files, once both are ready
TIMING = "run.json"          # in OUT/maxtext/runs/train: the trainer's wall time, for train.json


def slice_of(options, hardware: Optional[str], devices: int):
    """(hardware, devices) of a run: --tpu names the slice (all its chips share the global batch);
    without it, TPU when the host is a TPU VM, else the CPU with `devices` host devices."""
    if options.tpu is not None:
        from training.options import tpu_slice

        return "tpu", tpu_slice(options.tpu).chips
    return hardware or ("cpu" if options.device != "cuda" and not os.environ.get("TPU_NAME") else "tpu"), devices


def prepared_stamp(out: Path) -> Optional[str]:
    """The fingerprint whose inputs OUT/maxtext was prepared from, or None."""
    path = Path(out) / "maxtext" / PREPARED
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


def prepare(options, *, fingerprint: str, log: Callable[[str], None] = print) -> None:
    """One host: the starting checkpoint converted to MaxText and the data written as ArrayRecord.
    Done once; a rerun finds both and leaves them."""
    check_kind(options.kind)
    work = Path(options.out) / "maxtext"
    if prepared_stamp(options.out) == fingerprint:
        return
    from methods.core.models import resolve
    from methods.core.results import write_json_atomic

    model_dir = Path(resolve(options.model))
    mtconfig.model_overrides(mtconfig.read_hf_config(model_dir))
    work.mkdir(parents=True, exist_ok=True)
    resolve_data(options.data)  # an unset data location stops before the conversion
    if not (work / convert.MANIFEST).is_file():
        log(f"converting {options.model} to MaxText")
        convert.to_maxtext(model_dir, work)  # replaces the folder whole
    files = data_files(options.data, work / "data", options.seqlen)
    write_json_atomic(work / PREPARED, {"fingerprint": fingerprint, "files": files})


def run(options, *, log: Callable[[str], None] = print, hardware: Optional[str] = None, devices: int = 1) -> None:
    """Every host of the slice: MaxText's trainer over the prepared folder. MaxText resumes from the
    last checkpoint it finds under its run folder, so a rerun after a preemption continues."""
    check_kind(options.kind)
    work = Path(options.out) / "maxtext"
    if not (work / PREPARED).is_file():
        raise UsageError(f"{work} is not prepared: run the same command with --phase prepare first")
    from methods.core.results import write_json_atomic

    hardware, devices = slice_of(options, hardware, devices)
    files = json.loads((work / PREPARED).read_text())["files"]
    manifest = convert.read_manifest(work)
    base_output = work / "runs"
    # No model_name (MaxText's default): the generated keys alone describe the model.
    keys = {**manifest["maxtext_model"], "load_parameters_path": str(work / manifest["checkpoint"]),
            # MaxText's default tokenizer is a Llama-2 asset of its own; the checkpoint's is in hf/.
            "tokenizer_path": str(work / convert.HF_SUBDIR), "tokenizer_type": "huggingface",
            **run_overrides(options, files=files, devices=devices, hardware=hardware, base_output=base_output)}
    command = [sys.executable, "-m", "maxtext.trainers.pre_train.train", str(work / convert.CONFIG_YML),
               *convert.maxtext_args(keys)]
    env = dict(os.environ)
    if hardware == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    (base_output / RUN_NAME).mkdir(parents=True, exist_ok=True)  # MaxText appends its metrics file there
    log(f"MaxText training: {options.steps} steps, global batch {options.global_batch}, seq {options.seqlen}, "
        f"{devices} {hardware} device(s)")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=str(work))
    if done.returncode != 0:
        raise RuntimeError(f"MaxText's trainer exited with {done.returncode}; its log is above")
    # Every host writes the same record (an atomic replace): the last one's wall time stays.
    write_json_atomic(base_output / RUN_NAME / TIMING, {"seconds": time.perf_counter() - start, "keys": keys,
                                                         "command": command})


def finish(options) -> Dict[str, Any]:
    """One host, after the run: the last checkpoint exported to Hugging Face in OUT; the report."""
    work = Path(options.out) / "maxtext"
    run_folder = work / "runs" / RUN_NAME
    if not (run_folder / TIMING).is_file():
        raise UsageError(f"{run_folder} holds no finished MaxText run: run the same command with --phase run first")
    timing = json.loads((run_folder / TIMING).read_text())
    step_dir = last_checkpoint(run_folder / "checkpoints")
    export(work, step_dir, Path(options.out))
    return {"engine": "maxtext", "losses": read_losses(run_folder / "metrics.jsonl"), "seconds": timing["seconds"],
            "maxtext_checkpoint": str(step_dir), "maxtext_keys": timing["keys"]}


def train(options, *, fingerprint: str, log: Callable[[str], None] = print, hardware: Optional[str] = None,
          devices: int = 1) -> Dict[str, Any]:
    """Train `options.model` with MaxText as `options` says, all three phases here; returns the
    report written to train.json."""
    prepare(options, fingerprint=fingerprint, log=log)
    run(options, log=log, hardware=hardware, devices=devices)
    return finish(options)


def read_losses(metrics: Path) -> List[float]:
    if not metrics.is_file():
        return []
    losses = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "learning/loss" in record:
            losses.append(float(record["learning/loss"]))
    return losses


def last_checkpoint(folder: Path) -> Path:
    steps = sorted((int(p.name), p) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    if not steps:
        raise RuntimeError(f"MaxText wrote no checkpoint under {folder}")
    return steps[-1][1] / "items"


def export(work: Path, items: Path, out: Path) -> None:
    """The trained parameters as a Hugging Face checkpoint in `out` (beside the maxtext/ folder)."""
    manifest = convert.read_manifest(work)
    trained = work / "trained"
    if trained.exists():
        shutil.rmtree(trained)
    (trained / convert.HF_SUBDIR).parent.mkdir(parents=True)
    shutil.copytree(work / convert.HF_SUBDIR, trained / convert.HF_SUBDIR)
    shutil.copy2(work / convert.CONFIG_YML, trained / convert.CONFIG_YML)
    manifest = {**manifest, "checkpoint": os.path.relpath(items, trained)}
    (trained / convert.MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    hf = work / "hf-export"
    convert.to_hf(trained, hf)
    for path in hf.iterdir():
        target = out / path.name
        if target.exists():
            target.unlink()
        shutil.move(str(path), str(target))
    hf.rmdir()
