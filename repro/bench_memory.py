"""`make bench`, host-memory part (`--only memory`; issue 21): what a 2-process CPU run of `lpc train
--kind kd` holds in host memory while it loads.

A random Llama of 501,007,872 parameters (hidden 1536, 16 layers, 12 heads / 4 key-value heads,
intermediate 4096, vocabulary 32000, untied head) as the student and another, drawn with another seed,
as the teacher, both saved as safetensors in a temporary folder, once in fp32 and once in bf16 (as
Llama-3.1-8B is published; training holds fp32 master weights either way). Two gloo processes under torchrun
run the engine's own loading, `training.engine.load` (what `train()` runs as its steps 3 and 4: the
student and the kd extension's teacher loaded and sharded by FSDP2), and then report their peak
resident memory (ru_maxrss, the high-water mark of the whole process up to that point, imports
included). The phase measured is loading alone: load and shard, before the optimizer exists (AdamW's
state and the gradients come after it, two and one times the local shards, and belong to training,
not loading). Target: the ranks' peaks summed <= 1.5x the fp32 bytes of student plus teacher.

`--memory-old` also measures the loading as it was before sharded loading (every rank loads both
models whole with `load_model`, then shards them), for comparison.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TARGET_RATIO = 1.5
# The checkpoints' stored dtypes: fp32 as the kit saves a trained model, bf16 as Llama-3.1-8B is published.
STORED = ("float32", "bfloat16")
SHAPE = dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=4096, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def host_memory(*, old: bool = False) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="lpc-bench-memory-") as tmp:
        parameters = 0
        for seed, name in ((0, "student"), (1, "teacher")):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**SHAPE))
            parameters = sum(p.numel() for p in model.parameters())
            for stored in STORED:
                model.to(getattr(torch, stored)).save_pretrained(Path(tmp) / stored / name)
            del model
        result = {"bench": "host_memory", "world": WORLD, "shape": SHAPE, "parameters_per_model": parameters,
                  "model_bytes": 2 * parameters * 4, "target_ratio": TARGET_RATIO,
                  "phase": "load + shard (training.engine.load), before the optimizer", "stored": {}}
        for stored in STORED:
            for mode in ("sharded", "old") if old else ("sharded",):
                ranks = _ranks(Path(tmp) / stored, mode)
                total = sum(r["peak_rss_bytes"] for r in ranks)
                result["stored"].setdefault(stored, {})[mode] = {
                    "ranks": ranks, "sum_bytes": total, "ratio": total / result["model_bytes"],
                    "meets_target": total <= TARGET_RATIO * result["model_bytes"]}
    return result


def _ranks(folder: Path, mode: str) -> list:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "-m", "repro.bench_memory", str(folder), mode]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} loading exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(folder: Path, mode: str) -> None:
    """One rank: load as `mode` says, then every rank's peak to rank 0, which prints them."""
    import torch.distributed as dist

    from methods.core.models import load_model, quiet_transformers
    from training.engine import load, shard, start_process_group
    from training.options import TrainOptions

    quiet_transformers()
    run = start_process_group("cpu")
    student, teacher = str(folder / "student"), str(folder / "teacher")
    if mode == "old":  # what train() did before: both models whole on every rank, then sharded
        model, _ = load_model(student, load_tokenizer=False)
        other, _ = load_model(teacher, load_tokenizer=False)
        other.requires_grad_(False)
        model.train()
        shard(model, run)
        shard(other, run)
    else:
        options = TrainOptions(model=student, kind="kd", teacher=teacher, data="smoke", steps=1, global_batch=WORLD,
                               micro_batch=1, seqlen=8, lr=1e-4, out=str(folder / "out"), device="cpu")
        model, extension = load(options, student, run)
    peak = {"rank": run.rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    gathered = [None] * run.world
    dist.all_gather_object(gathered, peak)
    if run.main:
        print(json.dumps(gathered))
    dist.destroy_process_group()


def print_memory(result: dict) -> None:
    gib = 2 ** 30
    print(f"host mem   kd on {result['world']} CPU processes, student + teacher {result['parameters_per_model'] / 1e6:.0f}M "
          f"parameters each = {result['model_bytes'] / gib:.2f} GiB fp32; peak RSS after {result['phase']}:")
    for stored, modes in result["stored"].items():
        for mode, numbers in modes.items():
            ranks = ", ".join(f"rank {r['rank']} {r['peak_rss_bytes'] / gib:.2f}" for r in numbers["ranks"])
            verdict = "PASS" if numbers["meets_target"] else "FAIL"
            print(f"{'':10s} {stored:8s} stored, {mode:7s} {ranks} GiB; sum {numbers['sum_bytes'] / gib:.2f} GiB = "
                  f"{numbers['ratio']:.2f}x the models (target <= {result['target_ratio']}x: {verdict})")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
