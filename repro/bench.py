"""`make bench`: how long each method takes, against one plain forward pass over the same tokens.

For every method, in a fresh process (so peak memory is the method's own): load the model, draw the
calibration tokens, time one plain forward pass over them (batch 1 per sample, as the calibration
engine runs), time the pruning alone, and time the whole prune end to end (load, calibration, prune,
save). Results go to a JSON file; the targets (Wanda <= 2x the forward, SparseGPT <= 4x) are reported,
never asserted: timings belong to benchmarks, not tests.

Training throughput (`--train`, on by default; `--no-train` skips it): tokens/s of the training
engine as `lpc train` runs it, against a bare forward + backward + AdamW step loop of the same model,
batch, sequence length and precision, in the same process (target: engine <= 1.15x the bare loop's
time per token on CPU). Where CUDA exists, also the engine's model FLOP utilisation on a Llama-shaped
bf16 model (`--train-mfu`).

    python -m repro.bench --out bench/out/bench.json [--model smoke] [--nsamples 16 --seqlen 256]
    python -m repro.bench --random-llama2-7b --dtype bfloat16 --device cuda   # on a GPU machine
    python -m repro.bench --methods '' --train-steps 3 --train-batch 2 --train-seqlen 128   # training only
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

TARGETS = {"wanda": 2.0, "sparsegpt": 4.0}
TRAIN_OVERHEAD_TARGET = 1.15  # the engine's time per token over the bare loop's, on CPU
H200_PEAK_BF16_FLOPS = 989e12  # dense, no sparsity
REPEATS = 3
OPTIONS = {"magnitude": {"sparsity_ratio": 0.5}, "wanda": {"sparsity_ratio": 0.5},
           "sparsegpt": {"sparsity_ratio": 0.5}}


def bench_one(method: str, args) -> dict:
    import torch

    import methods
    from repro import data
    from repro.models import load_model, quiet_transformers, save_checkpoint

    quiet_transformers()
    start = time.perf_counter()
    if args.random_llama2_7b:
        model, tokenizer = random_llama2_7b(args.dtype), None
        calib = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                              generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        calib = data.calibration(args.calib, tokenizer=tokenizer, nsamples=args.nsamples, seqlen=args.seqlen)
    prepare = time.perf_counter() - start
    device = torch.device(args.device)
    forward = plain_forward_seconds(model, calib, device)  # the yardstick: not part of a prune
    report = methods.prune(model, method, calib, device=args.device, **OPTIONS[method])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if not args.random_llama2_7b:
            save_checkpoint(model, tokenizer, Path(out) / "model")
    end_to_end = prepare + report["seconds"] + time.perf_counter() - start
    result = {"method": method, "forward_seconds": forward, "prune_seconds": report["seconds"],
              "end_to_end_seconds": end_to_end, "ratio_to_forward": report["seconds"] / forward,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "calibration_shape": list(calib.shape), "device": args.device, "dtype": args.dtype}
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if method in TARGETS:
        result["target_ratio"] = TARGETS[method]
        result["meets_target"] = result["ratio_to_forward"] <= TARGETS[method]
    return result


def plain_forward_seconds(model, calib, device) -> float:
    """One ordinary forward of the model over every calibration sample (batch 1, as the engine feeds
    them): the median of REPEATS runs, so that one noisy run does not set the yardstick."""
    import torch

    home = next(model.parameters()).device
    model.to(device)
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            for row in calib:
                model(row[None].to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    model.to(home)
    return statistics.median(runs)


def random_llama2_7b(dtype: str):
    """Llama-2-7B's shapes with random weights: for timing only, no download needed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from repro.models import DTYPES

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.set_default_dtype(DTYPES[dtype])
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/bench.json"))
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--model", default="smoke")
    parser.add_argument("--calib", default="smoke")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-llama2-7b", action="store_true")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="training throughput: the engine against a bare loop (and the GPU's MFU where CUDA exists)")
    parser.add_argument("--train-model", default="smoke")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=2, help="sequences per step (one micro-batch)")
    parser.add_argument("--train-seqlen", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method (or train, train-mfu) here
    parser.add_argument("--maxtext-eval", metavar="MT_DIR",
                        help="only the MaxText lm-eval bench on this converted checkpoint (MaxText venv)")
    args = parser.parse_args(argv)
    if args.maxtext_eval:
        result = maxtext_eval(args.maxtext_eval)
        print(json.dumps(result, indent=1))
        from repro.results import write_json_atomic

        write_json_atomic(args.out, {"results": [result]})
        return 0
    if args.one == "train":
        print(json.dumps(training_throughput(args.train_model, steps=args.train_steps, global_batch=args.train_batch,
                                             seqlen=args.train_seqlen)))
        return 0
    if args.one == "train-mfu":
        print(json.dumps(training_mfu()))
        return 0
    if args.one:
        print(json.dumps(bench_one(args.one, args)))
        return 0
    results = []
    for method in [m for m in args.methods.split(",") if m]:
        result = _in_fresh_process(method, argv)
        if result is None:
            return 1
        results.append(result)
        target = f" (target <= {result['target_ratio']}x: {'met' if result['meets_target'] else 'MISSED'})" \
            if "target_ratio" in result else ""
        print(f"{method:10s} prune {result['prune_seconds']:8.2f}s  forward {result['forward_seconds']:7.2f}s  "
              f"ratio {result['ratio_to_forward']:5.2f}x{target}  end-to-end {result['end_to_end_seconds']:7.2f}s  "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    training = []
    if args.train:
        for which in ("train", "train-mfu"):
            result = _in_fresh_process(which, argv)
            if result is None:
                return 1
            training.append(result)
            print_training(result)
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    write_json_atomic(args.out, {"results": results, "training": training, "provenance": provenance()})
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- training throughput
# The engine (`lpc train` through repro/stages.py) and a bare loop train the same model on the same
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

    from repro import stages
    from repro.models import checked_path, quiet_transformers
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
            stages.train(options, log=lambda line: None)
        report = json.loads((Path(tmp) / "out" / stages.TRAIN_MANIFEST).read_text())
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

    from training.engine import load_causal_lm, lm_loss

    cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(options.seed)
    model = load_causal_lm(path).to(device).train()
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
    for name, kwargs in (("one_at_a_time", {"batch_size": 1, "buckets": False}),
                         ("batched_buckets", {"batch_size": batch_size, "buckets": True})):
        lm = MaxTextLM(checkpoint, max_length=max_length, **kwargs)
        start = time.perf_counter()
        outputs[name] = lm.loglikelihood(instances)
        timings[name] = {"seconds": time.perf_counter() - start, "compiled_shapes": len(lm.compiled_shapes)}
    worst = max(abs(a[0] - b[0]) for a, b in zip(outputs["one_at_a_time"], outputs["batched_buckets"]))
    return {"bench": "maxtext_eval", "checkpoint": checkpoint, "requests": requests, "batch_size": batch_size,
            **timings, "speedup": timings["one_at_a_time"]["seconds"] / timings["batched_buckets"]["seconds"],
            "max_loglikelihood_difference": worst}


if __name__ == "__main__":
    sys.exit(main())
