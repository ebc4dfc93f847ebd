"""`make bench`: how long each method takes, against one plain forward pass over the same tokens.

For every method, in a fresh process (so peak memory is the method's own): load the model, draw the
calibration tokens, time one plain forward pass over them (batch 1 per sample, as the calibration
engine runs), time the pruning alone, and time the whole prune end to end (load, calibration, prune,
save). Results go to a JSON file; the targets (Wanda <= 2x the forward, SparseGPT <= 4x) are reported,
never asserted: timings belong to benchmarks, not tests.

    python -m repro.bench --out bench/out/bench.json [--model smoke] [--nsamples 16 --seqlen 256]
    python -m repro.bench --random-llama2-7b --dtype bfloat16 --device cuda   # on a GPU machine
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

TARGETS = {"wanda": 2.0, "sparsegpt": 4.0}
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
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--maxtext-eval", metavar="MT_DIR",
                        help="only the MaxText lm-eval bench on this converted checkpoint (MaxText venv)")
    args = parser.parse_args(argv)
    if args.maxtext_eval:
        result = maxtext_eval(args.maxtext_eval)
        print(json.dumps(result, indent=1))
        from repro.results import write_json_atomic

        write_json_atomic(args.out, {"results": [result]})
        return 0
    if args.one:
        print(json.dumps(bench_one(args.one, args)))
        return 0
    results = []
    for method in args.methods.split(","):
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run([sys.executable, "-m", "repro.bench", *passthrough, "--one", method],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        target = f" (target <= {result['target_ratio']}x: {'met' if result['meets_target'] else 'MISSED'})" \
            if "target_ratio" in result else ""
        print(f"{method:10s} prune {result['prune_seconds']:8.2f}s  forward {result['forward_seconds']:7.2f}s  "
              f"ratio {result['ratio_to_forward']:5.2f}x{target}  end-to-end {result['end_to_end_seconds']:7.2f}s  "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    write_json_atomic(args.out, {"results": results, "provenance": provenance()})
    print(f"wrote {args.out}")
    return 0


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
