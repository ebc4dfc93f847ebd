"""`make bench`: how long pruning and evaluation take, in units a user feels, and what batching changes.

Pruning (`--methods`, each in a fresh process so that peak memory is its own): load the model, draw
the calibration tokens and time two yardsticks over them: a batch-1-per-sample forward (how the
calibration engine feeds samples by default) and one batched forward of all samples in one call. Then
the pruning alone on the default path (`calib_batch` 1, bit-exact with the originals) and, for
methods that allow it, on the batched path (`--calib-batch`, default "auto"), with the batched path's
mask agreement with the default one. Targets, in the batched unit: Wanda <= 2x, SparseGPT <= 4x. Also
the end-to-end wall of a real `lpc prune` process, and of a bare process that only loads and saves the
model, whose difference is what the kit adds.

A smoke row (`--smoke-row`, default wanda/unstructured-0.5): `lpc repro` of that one row in a fresh
results folder, its time split by stage (prune: load, calibration, prune, save; evaluate: load,
metrics) with each stage's peak memory; target: the row's evaluation takes no longer than its pruning.

Evaluation parity (`--eval-parity`): the smoke task's per-request log-likelihoods and accuracy, and a
windowed perplexity, at batch 1 against batch N (`--eval-batch`). On a GPU, the same check in fp16
before any recipe's evaluation batch changes:

    python -m repro.bench --only eval-parity --model DIR --device cuda --dtype float16 --eval-batch 32

Training throughput (`--train`, on by default; `--no-train` skips it): tokens/s of the training
engine as `lpc train` runs it, against a bare forward + backward + AdamW step loop of the same model,
batch, sequence length and precision, in the same process (target: engine <= 1.15x the bare loop's
time per token on CPU). Where CUDA exists, also the engine's model FLOP utilisation on a Llama-shaped
bf16 model.

Results go to a JSON file; targets are reported, never asserted: timings belong to benchmarks, not tests.

    python -m repro.bench --out bench/out/bench.json [--model smoke] [--nsamples 8 --seqlen 256]
    python -m repro.bench --random-llama2-7b --dtype bfloat16 --device cuda --nsamples 128 --seqlen 4096 \
        --only prune   # on a GPU machine: the Llama-2-7B-shaped targets (Wanda <= 30 s, SparseGPT <= 5 min)
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

TARGETS = {"wanda": 2.0, "sparsegpt": 4.0}        # pruning alone, in batched forwards
GPU_7B_TARGET_SECONDS = {"wanda": 30.0, "sparsegpt": 300.0}
TRAIN_OVERHEAD_TARGET = 1.15  # the engine's time per token over the bare loop's, on CPU
H200_PEAK_BF16_FLOPS = 989e12  # dense, no sparsity
REPEATS = 3
OPTIONS = {"magnitude": {"sparsity_ratio": 0.5}, "wanda": {"sparsity_ratio": 0.5},
           "sparsegpt": {"sparsity_ratio": 0.5}}
SMOKE_ROW = "wanda/unstructured-0.5"


def bench_one(method: str, args) -> dict:
    import torch

    import methods
    from repro import data
    from methods.core.models import load_model, quiet_transformers

    quiet_transformers()
    if args.random_llama2_7b:
        model = random_llama2_7b(args.dtype)
        calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                              generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        calib = data.calibration(args.calib, tokenizer=tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    device = torch.device(args.device)
    units = {"per_sample_forward_seconds": forward_seconds(model, calib, device, batched=False),
             "batched_forward_seconds": forward_seconds(model, calib, device, batched=True)}
    batched_copy = copy.deepcopy(model) if methods.get(method).batched_calibration else None
    paths = {"default": _prune_path(model, method, calib, args.device, 1, units)}
    if batched_copy is not None:
        paths["batched"] = _prune_path(batched_copy, method, calib, args.device, args.calib_batch, units)
        paths["batched"]["mask_agreement"] = mask_agreement(model, batched_copy)
    result = {"bench": "prune", "method": method, **units, "paths": paths,
              "calibration_shape": list(calib.shape), "device": args.device, "dtype": args.dtype,
              "torch_threads": torch.get_num_threads(),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    best = paths.get("batched", paths["default"])
    if method in TARGETS:
        result["target_ratio"] = TARGETS[method]
        result["meets_target"] = best["ratio_to_batched_forward"] <= TARGETS[method]
    if args.random_llama2_7b and method in GPU_7B_TARGET_SECONDS:
        result["target_seconds"] = GPU_7B_TARGET_SECONDS[method]
        result["meets_target_seconds"] = best["prune_seconds"] <= GPU_7B_TARGET_SECONDS[method]
    if not args.random_llama2_7b:
        result["process"] = prune_process_seconds(method, args, units["batched_forward_seconds"])
    return result


def _prune_path(model, method: str, calib, device: str, calib_batch, units: dict) -> dict:
    import methods

    extra = {"calib_batch": calib_batch} if calib_batch != 1 else {}
    report = methods.prune(model, method, calib, device=device, **extra, **OPTIONS[method])
    seconds = report["seconds"]
    return {"prune_seconds": seconds, "calib_batch": report.get("calib_batch"),
            "ratio_to_per_sample_forward": seconds / units["per_sample_forward_seconds"],
            "ratio_to_batched_forward": seconds / units["batched_forward_seconds"]}


def mask_agreement(model, other) -> dict:
    """The fraction of equal zero/non-zero decisions over every decoder Linear, and the worst one's."""
    from torch import nn

    theirs = dict(other.named_modules())
    equal = total = 0
    worst = 1.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            same = int(((module.weight == 0) == (theirs[name].weight == 0)).sum())
            equal, total = equal + same, total + module.weight.numel()
            worst = min(worst, same / module.weight.numel())
    return {"overall": equal / total, "worst_linear": worst}


def forward_seconds(model, calib, device, *, batched: bool) -> float:
    """One ordinary forward of the model over every calibration sample, either one sample per call (as
    the calibration engine feeds them by default) or all in one call: the median of REPEATS runs."""
    import torch

    home = next(model.parameters()).device
    model.to(device)
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            for rows in ([calib] if batched else calib.split(1)):
                model(rows.to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    model.to(home)
    return statistics.median(runs)


def prune_process_seconds(method: str, args, batched_forward: float) -> dict:
    """Wall time of a real `lpc prune` process against a process that only loads and saves the model:
    the difference is what pruning costs a user, calibration drawing and imports included."""
    import methods

    options = [f"--option={key}={value}" for key, value in OPTIONS[method].items()]
    with tempfile.TemporaryDirectory() as tmp:
        # The fastest of two: the first process of a bench may pay for cold file caches.
        bare = min(_timed([sys.executable, "-c",
                           "import sys; from methods.core.models import load_model, save_checkpoint; "
                           "m, t = load_model(sys.argv[1], dtype=sys.argv[2]); save_checkpoint(m, t, sys.argv[3])",
                           args.model, args.dtype, f"{tmp}/bare{attempt}"]) for attempt in range(2))
        walls = {}
        for path, calib_batch in (("default", "1"), ("batched", str(args.calib_batch))):
            if path == "batched" and not methods.get(method).batched_calibration:
                continue
            out = Path(tmp) / path
            walls[path] = _timed([sys.executable, "-m", "repro.cli", "prune", "--model", args.model, "--method", method,
                                  "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                  "--dtype", args.dtype, "--device", args.device, "--calib-batch", calib_batch,
                                  *options, "--out", str(out)])
            manifest = json.loads((out / "prune.json").read_text())
            walls[path] = {"wall_seconds": walls[path], "over_bare_seconds": walls[path] - bare,
                           "over_bare_in_batched_forwards": (walls[path] - bare) / batched_forward,
                           "stages_seconds": manifest["timings_seconds"], "peak_rss_mib": manifest["peak_rss_mib"]}
    return {"bare_load_save_seconds": bare, **walls}


def _timed(command) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def smoke_row(row: str = SMOKE_ROW) -> dict:
    """`lpc repro` of one smoke row in a fresh results folder: its wall, and its time by stage."""
    method, row_id = row.split("/")
    with tempfile.TemporaryDirectory() as tmp:
        wall = _timed([sys.executable, "-m", "repro.cli", "repro", method, "--profile", "smoke", "--rows", row_id,
                       "--results-dir", tmp])
        result = json.loads((Path(tmp) / "smoke" / method / f"{row_id}.json").read_text())
    stages = result["stages"]
    prune_seconds, eval_seconds = stages["prune"]["seconds"], stages["evaluate"]["seconds"]
    return {"bench": "smoke_row", "row": row, "repro_wall_seconds": wall, "stages": stages,
            "evaluate_over_prune": eval_seconds / prune_seconds, "meets_target": eval_seconds <= prune_seconds}


def eval_parity(model_spec: str = "smoke", *, batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                limit: Optional[int] = None, windows: int = 8, seqlen: int = 256) -> dict:
    """The smoke task at batch 1 and at `batch_size`: every request's log-likelihood and the accuracy;
    and the windowed perplexity of the smoke evaluation text at both batch sizes."""
    from methods import scoring
    from repro import data
    from methods.core.models import load_model, quiet_transformers

    quiet_transformers()
    model, tokenizer = load_model(model_spec, dtype=dtype)
    model.to(device)
    task = scoring.TaskSpec(scoring.SMOKE_TASK)
    runs, ppl, seconds = {}, {}, {}
    tokens = data.eval_tokens("smoke", tokenizer=tokenizer)[:, : windows * seqlen]
    for batch in (1, batch_size):
        start = time.perf_counter()
        runs[batch] = scoring.run_tasks(model, tokenizer, [task], batch_size=batch, limit=limit,
                                        per_request=True)[task.key]
        seconds[batch] = time.perf_counter() - start
        ppl[batch] = scoring.perplexity(model, tokens, "windows", seqlen=seqlen, batch_size=batch)
    one, many = runs[1]["loglikelihoods"], runs[batch_size]["loglikelihoods"]
    return {"bench": "eval_parity", "model": model_spec, "device": device, "dtype": dtype, "batch_size": batch_size,
            "requests": len(one), "max_abs_loglikelihood_difference": max(abs(a - b) for a, b in zip(one, many)),
            "accuracy": {str(b): r["metrics"]["acc"]["value"] for b, r in runs.items()},
            "accuracy_norm": {str(b): r["metrics"].get("acc_norm", {}).get("value") for b, r in runs.items()},
            "task_seconds": {str(b): s for b, s in seconds.items()},
            "perplexity": {str(b): v for b, v in ppl.items()},
            "perplexity_relative_difference": abs(ppl[batch_size] / ppl[1] - 1)}


def random_llama2_7b(dtype: str):
    """Llama-2-7B's shapes with random weights: for timing only, no download needed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from methods.core.models import DTYPES

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.set_default_dtype(DTYPES[dtype])
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


PARTS = ("prune", "smoke-row", "eval-parity", "train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/bench.json"))
    parser.add_argument("--only", help=f"comma-separated parts to run: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--model", default="smoke")
    parser.add_argument("--calib", default="smoke")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-batch", default="auto", help="the batched path's --calib-batch (default auto)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-llama2-7b", action="store_true")
    parser.add_argument("--smoke-row", default=SMOKE_ROW, help="METHOD/ROW of the smoke profile")
    parser.add_argument("--eval-batch", type=int, default=8, help="the batch compared with batch 1 (eval parity)")
    parser.add_argument("--eval-limit", type=int, help="examples of the smoke task (eval parity; default all)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="training throughput: the engine against a bare loop (and the GPU's MFU where CUDA exists)")
    parser.add_argument("--train-model", default="smoke")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=2, help="sequences per step (one micro-batch)")
    parser.add_argument("--train-seqlen", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one part here
    parser.add_argument("--maxtext-eval", metavar="MT_DIR|smoke",
                        help="only the MaxText lm-eval bench on this converted checkpoint, or on the smoke model "
                             "converted once next to --out (MaxText venv)")
    args = parser.parse_args(argv)
    from methods.core.results import write_json_atomic

    if args.maxtext_eval:
        from methods.core.provenance import provenance

        result = maxtext_eval(maxtext_checkpoint(args.maxtext_eval, args.out.parent))
        print_maxtext_eval(result)
        write_json_atomic(args.out, {"results": [result], "provenance": provenance()})
        print(f"wrote {args.out}")
        return 0
    if args.one:
        print(json.dumps(_run_here(args.one, args)))
        return 0
    parts = [p for p in (args.only or ",".join(PARTS)).split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench: unknown part {', '.join(unknown)}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if "train" in parts and not args.train:
        parts.remove("train")
    which = [m for m in args.methods.split(",") if m] if "prune" in parts else []
    which += [p for p in ("smoke-row", "eval-parity") if p in parts]
    which += ["train", "train-mfu"] if "train" in parts else []
    results = []
    for item in which:
        result = _in_fresh_process(item, argv)
        if result is None:
            return 1
        results.append(result)
        PRINTERS[result["bench"]](result)
    from methods.core.provenance import provenance

    write_json_atomic(args.out, {"results": results, "provenance": provenance()})
    print(f"wrote {args.out}")
    return 0


def _run_here(item: str, args) -> dict:
    if item == "train":
        return training_throughput(args.train_model, steps=args.train_steps, global_batch=args.train_batch,
                                   seqlen=args.train_seqlen)
    if item == "train-mfu":
        return training_mfu()
    if item == "smoke-row":
        return smoke_row(args.smoke_row)
    if item == "eval-parity":
        return eval_parity(args.model, batch_size=args.eval_batch, device=args.device, dtype=args.dtype,
                           limit=args.eval_limit)
    return bench_one(item, args)


def print_prune(result: dict) -> None:
    verdict = ""
    if "target_ratio" in result:
        verdict = f"  target <= {result['target_ratio']}x batched forward: {'met' if result['meets_target'] else 'MISSED'}"
    print(f"{result['method']:10s} forward: per-sample {result['per_sample_forward_seconds']:.2f}s, "
          f"batched {result['batched_forward_seconds']:.2f}s  peak RSS {result['peak_rss_mib']:.0f} MiB{verdict}")
    for path, numbers in result["paths"].items():
        agreement = numbers.get("mask_agreement")
        agree = f"  masks equal to default: {agreement['overall']:.4%} (worst Linear {agreement['worst_linear']:.4%})" \
            if agreement else ""
        used = (numbers["calib_batch"] or {}).get("used", "-")
        print(f"{'':10s} {path:8s} calib batch {used!s:>4s}  prune {numbers['prune_seconds']:7.2f}s = "
              f"{numbers['ratio_to_per_sample_forward']:.2f}x per-sample, {numbers['ratio_to_batched_forward']:.2f}x batched{agree}")
    for path, wall in (result.get("process") or {}).items():
        if isinstance(wall, dict):
            print(f"{'':10s} lpc prune ({path}) {wall['wall_seconds']:.1f}s wall, {wall['over_bare_seconds']:.1f}s over a "
                  f"bare load+save process ({result['process']['bare_load_save_seconds']:.1f}s) = "
                  f"{wall['over_bare_in_batched_forwards']:.2f}x batched forward; peak RSS {wall['peak_rss_mib']:.0f} MiB")


def print_smoke_row(result: dict) -> None:
    stages = result["stages"]
    split = "; ".join(f"{stage} {numbers['seconds']:.1f}s (" + ", ".join(f"{k} {v:.1f}" for k, v in numbers["parts"].items())
                      + f"; peak RSS {numbers['peak_rss_mib']:.0f} MiB)" for stage, numbers in stages.items())
    print(f"smoke row  {result['row']}: lpc repro {result['repro_wall_seconds']:.1f}s wall; {split}; evaluation "
          f"{result['evaluate_over_prune']:.2f}x pruning (target <= 1: {'met' if result['meets_target'] else 'MISSED'})")


def print_eval_parity(result: dict) -> None:
    print(f"eval parity batch 1 vs {result['batch_size']} ({result['device']} {result['dtype']}, {result['requests']} "
          f"requests): max |d loglik| {result['max_abs_loglikelihood_difference']:.2e}, accuracy {result['accuracy']}, "
          f"perplexity {result['perplexity']} (rel. diff {result['perplexity_relative_difference']:.1e}); "
          f"task seconds {result['task_seconds']}")


# ----------------------------------------------------------------------------- training throughput
# The engine (`lpc train`, training/stage.py) and a bare loop train the same model on the same
# windows in one process. The engine's train.json times its whole step loop, which includes the final
# checkpoint write (model + AdamW state through torch.distributed.checkpoint); that write is timed
# separately here so that the step loop alone is compared with the bare loop, and both figures are kept.

def training_throughput(model: str = "smoke", *, steps: int = 6, global_batch: int = 4, seqlen: int = 128,
                        device: str = "cpu") -> dict:
    """Tokens/s of the training engine (`kind cpt`, micro batch = global batch) and of a bare forward +
    backward + AdamW loop over the same windows, with the same precision and optimizer settings. The
    bare loop runs before and after the engine; its yardstick is the mean of the two."""
    import contextlib
    from unittest import mock

    import torch
    from transformers import AutoConfig

    from methods.core.identity import TRAIN_MANIFEST
    from training import stage
    from methods.core.models import checked_path, quiet_transformers
    from training import checkpoint
    from training.options import TrainOptions

    quiet_transformers()
    path = checked_path(model)
    vocab = AutoConfig.from_pretrained(path).vocab_size
    windows = torch.randint(0, vocab, (steps * global_batch, seqlen), generator=torch.Generator().manual_seed(0))
    saves: list = []
    real_save = checkpoint.save

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_save(*args, **kwargs)
        finally:
            saves.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "tokens.pt")
        options = TrainOptions(model=path, kind="cpt", data=str(Path(tmp) / "tokens.pt"), steps=steps,
                               global_batch=global_batch, micro_batch=global_batch, seqlen=seqlen, lr=1e-4,
                               shuffle=False, device=device, out=str(Path(tmp) / "out"))
        bare = [bare_training_seconds(path, windows, options)]
        with mock.patch.object(checkpoint, "save", timed_save), contextlib.redirect_stdout(sys.stderr):
            stage.train(options, log=lambda line: None)
        report = json.loads((Path(tmp) / "out" / TRAIN_MANIFEST).read_text())
        bare.append(bare_training_seconds(path, windows, options))
    tokens = steps * global_batch * seqlen
    loop = report["seconds"]["train"]
    stepping = loop - sum(saves)
    bare_seconds = statistics.mean(bare)
    return {"bench": "train_throughput", "model": model, "device": report["device"],
            "precision": report["precision"], "steps": steps, "global_batch": global_batch, "seqlen": seqlen,
            "tokens": tokens, "torch_threads": torch.get_num_threads(),
            "engine_tokens_per_second": report["tokens_per_second"],
            "engine_step_tokens_per_second": tokens / stepping,
            "engine_checkpoint_seconds": sum(saves),
            "bare_seconds": bare, "bare_tokens_per_second": tokens / bare_seconds,
            "overhead": stepping / bare_seconds, "overhead_with_checkpoint": loop / bare_seconds,
            "target_overhead": TRAIN_OVERHEAD_TARGET,
            "meets_target": stepping / bare_seconds <= TRAIN_OVERHEAD_TARGET,
            "peak_memory_mib": report["peak_memory_mib"]}


def bare_training_seconds(path: str, windows, options) -> float:
    """Seconds of a plain loop over the engine's global batches: forward, the engine's loss, backward,
    AdamW step; bf16 autocast over fp32 weights on a GPU (the engine's mixed precision), fp32 on a CPU.
    No sharding, clipping, logging or checkpoints: what the engine's loop adds to the arithmetic."""
    import contextlib

    import torch

    from methods.core.models import load_model
    from training.losses import lm_loss

    cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(options.seed)
    model = load_model(path, load_tokenizer=False)[0].to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=(options.beta1, options.beta2),
                                  eps=options.eps, weight_decay=options.weight_decay)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    start = time.perf_counter()
    for batch in windows.split(options.global_batch):
        ids = batch.to(device)
        with precision:
            logits = model(input_ids=ids, use_cache=False).logits
        lm_loss(logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model, optimizer
    return seconds


def matmul_flops_per_token(model, seqlen: int) -> float:
    """Training FLOPs per token: 6 x the weights of every matrix multiply (the LM head included, the
    embedding lookup not) plus the attention scores and values, 12 x layers x heads x head size x
    seqlen (PaLM's accounting, which counts the full square rather than the causal half)."""
    from torch import nn

    config = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6.0 * weights + 12.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * seqlen


def training_mfu(*, steps: int = 12, global_batch: int = 8, seqlen: int = 2048) -> dict:
    """The engine's model FLOP utilisation on one GPU: a Llama-3.2-1B-shaped model with random weights
    (bf16 compute, fp32 master weights, as `lpc train` runs on GPUs), against the H200's dense bf16
    peak. Only where CUDA exists; elsewhere the result says it was not measured."""
    import torch

    if not torch.cuda.is_available():
        return {"bench": "train_mfu", "measured": False, "reason": "no CUDA device in this run"}
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max(seqlen, 2048),
                         tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = LlamaForCausalLM(config)
        flops = matmul_flops_per_token(model, seqlen)
        model.save_pretrained(tmp)
        del model
        result = training_throughput(tmp, steps=steps, global_batch=global_batch, seqlen=seqlen, device="cuda")
    achieved = flops * result["engine_step_tokens_per_second"]
    return {**result, "bench": "train_mfu", "measured": True, "model": "llama-3.2-1b-shaped (random weights)",
            "gpu": torch.cuda.get_device_name(), "flops_per_token": flops, "achieved_flops": achieved,
            "peak_flops": H200_PEAK_BF16_FLOPS, "mfu": achieved / H200_PEAK_BF16_FLOPS}


def _in_fresh_process(which: str, argv) -> Optional[dict]:
    """One bench in a process of its own (peak memory its own, no state left by the one before)."""
    passthrough = list(argv if argv is not None else sys.argv[1:])
    proc = subprocess.run([sys.executable, "-m", "repro.bench", *passthrough, "--one", which],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_training(result: dict) -> None:
    if result["bench"] == "train_mfu" and not result["measured"]:
        print(f"train MFU  not measured: {result['reason']}")
        return
    shape = f"{result['global_batch']}x{result['seqlen']} tokens/step, {result['steps']} steps, " \
            f"{result['device']} {result['precision']}"
    verdict = "met" if result["meets_target"] else "MISSED"
    print(f"{'train' if result['bench'] == 'train_throughput' else 'train GPU':10s} engine "
          f"{result['engine_step_tokens_per_second']:8.1f} tok/s  bare loop {result['bare_tokens_per_second']:8.1f} tok/s  "
          f"overhead {result['overhead']:5.2f}x (target <= {result['target_overhead']}x: {verdict})  "
          f"with final checkpoint {result['engine_tokens_per_second']:8.1f} tok/s "
          f"({result['overhead_with_checkpoint']:.2f}x)  [{shape}]")
    if result["bench"] == "train_mfu":
        print(f"{'':10s} MFU {result['mfu']:.1%} of {result['peak_flops'] / 1e12:.0f} TFLOP/s "
              f"({result['achieved_flops'] / 1e12:.1f} TFLOP/s achieved on {result['gpu']})")


# ----------------------------------------------------------------------------- MaxText lm-eval backend
# Runs in the MaxText venv only (`.venv-maxtext/bin/python -m repro.bench --maxtext-eval MT_DIR`): the
# one-request-at-a-time MaxText path (batch 1, unpadded: a compile per distinct length, as the
# collection's orbax_lm) against the batched, length-bucketed backend, on the same requests, in one run.

def maxtext_checkpoint(spec: str, folder: Path) -> str:
    """`smoke`: the smoke model converted to MaxText once, in `folder`; anything else: a MaxText directory."""
    if spec != "smoke":
        return spec
    from methods.core.models import resolve
    from training.maxtext import convert

    target = folder / "maxtext-smoke"
    if not (target / convert.MANIFEST).is_file():
        convert.to_maxtext(Path(resolve("smoke")), target)
    return str(target)


def print_maxtext_eval(result: dict) -> None:
    one, batched = result["one_at_a_time"], result["batched_buckets"]
    print(f"{'maxtext':10s} lm-eval loglikelihood, {result['requests']} requests: one at a time "
          f"{one['seconds']:7.2f} s ({one['compiled_shapes']} compiled shapes)  batched {result['batch_size']} in "
          f"length buckets {batched['seconds']:7.2f} s ({batched['compiled_shapes']} shapes)  speed-up "
          f"{result['speedup']:.2f}x (collection's claim 2-4x)  max |d loglik| {result['max_loglikelihood_difference']:.1e}")


def maxtext_eval(checkpoint: str, *, requests: int = 64, batch_size: int = 8, max_length: int = 256) -> dict:
    from lm_eval.api.instance import Instance

    from repro import data
    from training.maxtext.lm import MaxTextLM

    folder = Path(data.SMOKE_CALIB_TEXT)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    words = " ".join(p.read_text() for p in files).split()
    pairs = []
    for i in range(requests):  # contexts of 4..67 words, continuations of 1..4 words, from the smoke text
        start, size = (i * 37) % (len(words) - 80), 4 + (i * 13) % 64
        pairs.append((" ".join(words[start:start + size]), " " + " ".join(words[start + size:start + size + 1 + i % 4])))
    instances = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    timings, outputs = {}, {}
    from training.maxtext import model as mt_model

    for name, kwargs in (("one_at_a_time", {"batch_size": 1, "buckets": False}),
                         ("batched_buckets", {"batch_size": batch_size, "buckets": True})):
        # MaxText's persistent compilation cache off: each path pays for the programs it compiles
        model = mt_model.load(Path(checkpoint), seqlen=max_length, batch=kwargs["batch_size"],
                              extra={"jax_cache_dir": ""})
        lm = MaxTextLM(checkpoint, max_length=max_length, model=model, **kwargs)
        start = time.perf_counter()
        outputs[name] = lm.loglikelihood(instances)
        timings[name] = {"seconds": time.perf_counter() - start, "compiled_shapes": len(lm.compiled_shapes)}
    worst = max(abs(a[0] - b[0]) for a, b in zip(outputs["one_at_a_time"], outputs["batched_buckets"]))
    return {"bench": "maxtext_eval", "checkpoint": checkpoint, "requests": requests, "batch_size": batch_size,
            **timings, "speedup": timings["one_at_a_time"]["seconds"] / timings["batched_buckets"]["seconds"],
            "max_loglikelihood_difference": worst}


PRINTERS = {"prune": print_prune, "smoke_row": print_smoke_row, "eval_parity": print_eval_parity,
            "train_throughput": print_training, "train_mfu": print_training, "maxtext_eval": print_maxtext_eval}

if __name__ == "__main__":
    sys.exit(main())
