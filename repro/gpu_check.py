"""`make gpu-check`: the checks that need a CUDA GPU, in one run that writes one JSON (sized for 8 min on one
H100; not yet timed on one).

    eval-parity-bf16, eval-parity-fp16   the kit's task and a windowed perplexity at batch 1 against batch
                                         32 on a rehearsal model (the stand-in of Llama-2-7B), per dtype
    wanda, sparsegpt                     pruning timed on a Llama-2-7B-shaped random model in bf16
                                         (repro/bench.py's prune bench, calibration cut to fit the run)
    train-mfu                            a few FSDP2 training steps of `lpc train` on CUDA, with MFU
                                         (repro/bench_training.py)
    sparse-2of4                          a Llama-2-7B-shaped MLP pruned 2:4 (the kit's N:M mask), dense
                                         against torch's semi-structured sparse weights, where torch has them

Each part runs in a process of its own (its GPU memory and peak its own); a part that fails is recorded
with its error and makes the exit status 1, after the others ran. Without CUDA it refuses in one line.
The figures are measurements, not assertions: the JSON says what a check found, the reader judges it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from methods.core.errors import UsageError

PARTS = ("eval-parity-bf16", "eval-parity-fp16", "wanda", "sparsegpt", "train-mfu", "sparse-2of4")
STANDIN = "meta-llama/Llama-2-7b-hf"
LLAMA2_7B_MLP = (4096, 11008)


def eval_parity(dtype: str, args) -> dict:
    from repro import bench, standin_models

    with tempfile.TemporaryDirectory() as tmp:
        folder = standin_models.write_model(Path(tmp), STANDIN)
        result = bench.eval_parity(str(folder), batch_size=args.eval_batch, device=args.device, dtype=dtype,
                                   limit=args.eval_limit)
    return {**result, "model": f"rehearsal stand-in of {STANDIN}"}


def prune(method: str, args) -> dict:
    from repro import bench

    options = argparse.Namespace(random_llama2_7b=True, dtype="bfloat16", device=args.device,
                                 nsamples=args.nsamples, seqlen=args.seqlen, calib_batch="auto")
    return bench.bench_one(method, options)


def train_mfu(args) -> dict:
    from repro import bench_training

    return bench_training.training_mfu(steps=args.train_steps, global_batch=args.train_batch, seqlen=args.seqlen)


def sparse_2of4(args) -> dict:
    """Dense against semi-structured sparse forward of a 2:4-pruned Llama MLP (gate, up, down), bf16."""
    import torch
    import torch.nn.functional as F

    from methods.sparsity import nm_mask

    hidden, inner = args.mlp or LLAMA2_7B_MLP
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    weights = []
    for shape in ((inner, hidden), (inner, hidden), (hidden, inner)):
        weight = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        weight[nm_mask(weight.abs(), 2, 4)] = 0  # the two smallest of every four, as magnitude 2:4 keeps
        weights.append(weight.to(device, torch.bfloat16))
    tokens = torch.randn(args.tokens, hidden, generator=generator).to(device, torch.bfloat16)

    def mlp(gate, up, down):
        return F.linear(F.silu(F.linear(tokens, gate)) * F.linear(tokens, up), down)

    result = {"bench": "sparse_2of4", "mlp": [hidden, inner], "tokens": args.tokens, "dtype": "bfloat16",
              "torch": torch.__version__}
    try:
        from torch.sparse import to_sparse_semi_structured

        sparse = [to_sparse_semi_structured(w) for w in weights]
        with torch.no_grad():
            expected, got = mlp(*weights), mlp(*sparse)
    except Exception as exc:  # torch raises several types where the device or build lacks the kernels
        return {**result, "supported": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    dense_s, sparse_s = _timed(lambda: mlp(*weights), device), _timed(lambda: mlp(*sparse), device)
    return {**result, "supported": True, "dense_seconds": dense_s, "sparse_seconds": sparse_s,
            "speedup": dense_s / sparse_s,
            "max_relative_difference": float(((got - expected).abs().max() / expected.abs().max()).item())}


def _timed(call, device, repeats: int = 20) -> float:
    import torch

    with torch.no_grad():
        call()  # warm-up: kernel selection and caches
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run_part(name: str, args) -> dict:
    if name.startswith("eval-parity-"):
        return eval_parity(name.rsplit("-", 1)[1].replace("bf16", "bfloat16").replace("fp16", "float16"), args)
    if name in ("wanda", "sparsegpt"):
        return prune(name, args)
    if name == "train-mfu":
        return train_mfu(args)
    return sparse_2of4(args)


def _in_fresh_process(name: str, argv: List[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "repro.gpu_check", *argv, "--part", name],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"part": name, "ok": False, "seconds": seconds, "error": (proc.stderr.strip() or "no output")[-2000:]}
    return {"part": name, "ok": True, "seconds": seconds, **json.loads(lines[-1])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m repro.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/gpu-check.json"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    p.add_argument("--nsamples", type=int, default=64, help="calibration samples of the prune parts (default 64)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sample / training window (default 2048)")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-limit", type=int, help="documents of the kit's task (default all)")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="tokens through the 2:4 MLP (default 4096)")
    # The plumbing's own test runs the parts on the CPU at toy sizes; a user's run is on CUDA.
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--mlp", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        if args.part:
            print(json.dumps(run_part(args.part, args), default=str))
            return 0
        parts = [p for p in args.parts.split(",") if p]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise UsageError(f"unknown part {', '.join(unknown)}; known: {', '.join(PARTS)}")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UsageError("make gpu-check needs a CUDA GPU and torch sees none; run it on a GPU machine")
    except UsageError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    from methods.core.provenance import provenance
    from methods.core.results import write_json_atomic

    results: Dict[str, dict] = {}
    for name in parts:
        results[name] = _in_fresh_process(name, argv)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']:.0f} s)", flush=True)
    write_json_atomic(args.out, {"parts": results, "provenance": provenance()})
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
