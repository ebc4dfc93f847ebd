"""`make bench`, its training and MaxText parts: the engine's throughput against a bare loop, its MFU on
a GPU, and the MaxText lm-eval backend one request at a time against batched length buckets."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TRAIN_OVERHEAD_TARGET = 1.15  # the engine's time per token over the bare loop's, on CPU
H200_PEAK_BF16_FLOPS = 989e12  # dense, no sparsity


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


