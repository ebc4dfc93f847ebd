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

Start-up (`--only startup`; repro/bench_startup.py): help and refusal latency, and the fixed cost of a
prune process against the original's (transformers 4.43), split by phase.

Host memory (`--only memory`; repro/bench_memory.py): the summed peak RSS of a 2-process kd run's
loading (a 0.5 B student and teacher) against 1.5x their fp32 bytes; `--memory-old` adds the loading
as it was before sharded loading.

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

from repro.bench_memory import host_memory, print_memory
from repro.bench_startup import print_startup, startup
from repro.bench_training import (maxtext_checkpoint, maxtext_eval, print_maxtext_eval, print_training,
                                  training_mfu, training_throughput)

TARGETS = {"wanda": 2.0, "sparsegpt": 4.0}        # pruning alone, in batched forwards
GPU_7B_TARGET_SECONDS = {"wanda": 30.0, "sparsegpt": 300.0}
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


PARTS = ("prune", "smoke-row", "eval-parity", "train", "startup", "memory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/bench.json"))
    parser.add_argument("--markdown", type=Path, help="also write the printed figures as a page (make bench: "
                                                       "docs/bench-figures.md)")
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
    parser.add_argument("--memory-old", action="store_true", help="memory: also measure the loading before issue 21")
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
    which += [p for p in ("startup", "memory") if p in parts]
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
    if args.markdown:
        write_markdown(args.markdown, results, provenance())
        print(f"wrote {args.markdown}")
    return 0


def write_markdown(path: Path, results: list, where: dict) -> None:
    """The figures of a bench run as a page (docs/bench-figures.md): what the printers print, with the
    machine and commit they were measured on, so that the docs quote a file `make bench` wrote."""
    import contextlib
    import io

    from methods.core.provenance import machine_summary
    from methods.core.results import write_text_atomic

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        for result in results:
            PRINTERS[result["bench"]](result)
    write_text_atomic(path, "<!-- Written by `make bench` (python -m repro.bench --markdown): do not edit by hand. -->\n\n"
                      f"# Benchmark figures\n\nMeasured at commit {(where.get('git_sha') or '?')[:12]} on "
                      f"{machine_summary(where.get('hardware') or {})}. What each figure is: "
                      "[benchmarks.md](benchmarks.md).\n\n```\n" + text.getvalue() + "```\n")


def _run_here(item: str, args) -> dict:
    if item == "train":
        return training_throughput(args.train_model, steps=args.train_steps, global_batch=args.train_batch,
                                   seqlen=args.train_seqlen)
    if item == "train-mfu":
        return training_mfu()
    if item == "startup":
        return startup()
    if item == "memory":
        return host_memory(old=args.memory_old)
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


def _in_fresh_process(which: str, argv) -> Optional[dict]:
    """One bench in a process of its own (peak memory its own, no state left by the one before)."""
    passthrough = list(argv if argv is not None else sys.argv[1:])
    proc = subprocess.run([sys.executable, "-m", "repro.bench", *passthrough, "--one", which],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


PRINTERS = {"prune": print_prune, "smoke_row": print_smoke_row, "eval_parity": print_eval_parity,
            "train_throughput": print_training, "train_mfu": print_training, "maxtext_eval": print_maxtext_eval,
            "startup": print_startup, "host_memory": print_memory}

if __name__ == "__main__":
    sys.exit(main())
