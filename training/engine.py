"""The training loop: a Hugging Face causal LM under PyTorch FSDP2, one process per device (torchrun),
as the train stage (training/stage.py) runs it. The loop knows no kind by name: each kind of
training/kinds/ adds its loss and hooks (training/kinds/base.py, `Extension`).

The whole run, top to bottom, is `train()`:

1. process group: gloo on CPU, NCCL on GPUs; torchrun's environment, or a group of one in-process;
2. data: global batch = world x accumulation x micro batch (training/data.py);
3. the student from its Hugging Face checkpoint, fp32 master weights, and the kind's extension (`load`).
   A sharded run never holds the whole model on any rank: the student is built on the meta device
   (parameters without storage; non-persistent buffers such as rotary `inv_freq` computed for real),
   the extension is made on that empty model (sheared's gates and hooks need only its structure), FSDP2
   shards it (step 4), and then each rank reads only its own dim-0 rows of every parameter from the
   safetensors files into its local shards (training/loading.py; bf16/fp16 checkpoints converted as
   `from_pretrained` converts). Only then does the extension see weights (`Extension.sharded`): kd
   builds, shards and reads its teacher the same way, sparse finds its zeros on the local shards. One
   process on the CPU, nothing sharded, loads the whole model with `from_pretrained` as before;
4. FSDP2: `fully_shard` on every decoder layer, then the root; bf16 compute on GPUs, fp32 on CPUs (one
   process on the CPU trains the model as it is);
5. AdamW(0.9, 0.95, eps 1e-8, weight decay 0.1), the learning rate of `lr_at` set before every step
   (also on the kind's own optimizers, scaled by their `lr_scale`);
6. resume from the newest complete checkpoint under OUT/checkpoints (training/checkpoint.py);
7. every step: per micro-batch the kind's sample, loss and objective, divided by the accumulation,
   backward; the kind's clipping (gradient norm at 1.0), its after-clip hook, the optimizer steps, its
   after-step hook; a checkpoint every `save_every` steps and at the end;
8. export: the full state dict gathered on rank 0 (the kind may fold itself in) and saved as a plain
   Hugging Face checkpoint.

Dynamic batch loading (training/data.py `DomainStream`): after every `update_interval`-th step, each
domain's mean token loss on its held-out windows (every rank a strided share, summed over ranks)
updates the proportions the next steps draw with; losses and proportions go into the log.

Gradient accumulation steps after exactly `global_batch / (micro_batch * world)` micro-batches.
(The collection's FMS-FSDP loop steps after its first micro-batch, one too early, and its resume
offsets assume a multiple of the accumulation; this engine has neither quirk.)
"""
from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from methods.core.errors import UsageError
from training import checkpoint, kinds, loading
from training.losses import full_tensor, lm_loss
from training.options import TrainOptions

def lr_at(step: int, options: TrainOptions) -> float:
    """The learning rate of 0-based optimizer step `step`, W = min(cap, steps * fraction) warm-up steps.

    `fms` (the collection's FMS-FSDP and its MaxText patch): min(quadratic warm-up, cosine from step 0
    to lr * final_fraction). `composer` (Composer's cosine with warm-up): linear from 0 over W steps,
    then cosine from lr to lr * final_fraction over the remaining steps.
    """
    peak, total = options.lr, options.steps
    warmup = min(options.warmup_cap, int(total * options.warmup_fraction))
    final = options.final_lr_fraction
    if options.schedule == "composer":
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, total - warmup) / max(1, total - warmup)
        return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    warm = 1.0 if warmup == 0 else 1.0 - (1.0 - min(step, warmup) / warmup) ** 2
    cosine = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return peak * min(warm, cosine)


@dataclass
class Run:
    """Where this process stands in the job."""
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 wraps the model, except for one process on the CPU: there is nothing to shard, and
        the FSDP2 of torch < 2.6 (the method images' torch 2.5) needs CUDA streams even then."""
        return self.world > 1 or self.device.type == "cuda"


def start_process_group(device: str) -> Run:
    """torchrun's group when launched by torchrun, else a group of one in this process."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    else:
        target = torch.device("cpu")
    return Run(rank, world, target, owns)


def check_cpu_processes(options: TrainOptions) -> None:
    """Several processes on the CPU shard with FSDP2, whose CPU support came with torch 2.6."""
    cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if not cuda and version < (2, 6):
        raise UsageError(f"--nproc {options.nproc} on the CPU needs torch >= 2.6 (the FSDP2 of torch "
                         f"{torch.__version__} needs CUDA streams); train with one process here")


def shard(model: nn.Module, run: Run, *, activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 over the model (where `run.sharded`): every decoder layer its own unit, the rest
    (embeddings, norm, head) the root's."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not run.sharded:
        return model
    fully_shard, MixedPrecisionPolicy = _fsdp2()
    kwargs = {}
    if run.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if not any(p.is_meta for p in model.parameters()):  # an empty model gets storage after sharding
            model.to(run.device)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load(options: TrainOptions, student_path: str, run: Run):
    """Step 3 and 4 of `train()`: the student (and the kind's extension) loaded and sharded, before any
    optimizer state exists. A sharded run builds it empty and reads each rank's own shards
    (training/loading.py); the kind's extension is made on the unloaded model and sees the loaded,
    sharded one in `sharded()`."""
    model = loading.skeleton(student_path, run)
    extension = kinds.get(options.kind).extension(model, options, run)
    model.train()
    shard(model, run, activation_checkpointing=options.activation_checkpointing)
    loading.fill(model, student_path, run)
    extension.sharded(model, run, shard)
    return model, extension


def _fsdp2():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4/2.5 (the `train` image): the same API under its first name
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def domain_losses(model: nn.Module, stream, run: Run, micro_batch: int, extension) -> List[float]:
    """Each domain's mean token loss on its held-out windows; every rank runs the same number of forward
    passes (FSDP gathers parameters in each), a rank short of windows repeating one with weight 0."""
    sums = torch.zeros(len(stream.evaluation), 2, dtype=torch.float64, device=run.device)
    with torch.no_grad(), extension.evaluating():
        for d, windows in enumerate(stream.evaluation):
            mine = list(range(run.rank, len(windows), run.world))
            passes = math.ceil(math.ceil(len(windows) / run.world) / micro_batch)
            for k in range(passes):
                chunk = mine[k * micro_batch:(k + 1) * micro_batch]
                ids = torch.stack([windows[i] for i in chunk or [0]]).to(run.device)
                loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids, reduction="sum")
                if chunk:
                    sums[d, 0] += loss.double()
                    sums[d, 1] += ids[:, 1:].numel()
    dist.all_reduce(sums)
    return (sums[:, 0] / sums[:, 1]).tolist()


def train(options: TrainOptions, *, student_path: str, data_factory: Callable,
          tokenizer=None, fingerprint: str, log: Callable[[str], None] = print) -> Optional[dict]:
    """Run (or resume) one training stage; rank 0 returns the report, other ranks None.

    `data_factory(layout, rank)` builds this rank's data stream (training/data.py) for the layout.
    """
    from training.data import Layout

    run = start_process_group(options.device)
    try:
        layout = Layout(options.global_batch, options.micro_batch, run.world)
        stream = data_factory(layout, run.rank)
        torch.manual_seed(options.seed)

        started = time.perf_counter()
        model, extension = load(options, student_path, run)
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=(options.beta1, options.beta2),
                                      eps=options.eps, weight_decay=options.weight_decay)
        optimizers = [optimizer] + list(extension.optimizers)
        interval = stream.dynamic.update_interval if hasattr(stream, "dynamic") else 0
        load_seconds = time.perf_counter() - started

        state = checkpoint.resume(Path(options.out), model, optimizer, stream, fingerprint=fingerprint, run=run,
                                  extension=extension if extension.stateful else None)
        first = state.step if state else 0
        history: List[dict] = list(state.log) if state else []
        tokens = history[-1]["tokens"] if history else 0
        if state and run.main:
            log(f"resuming at step {first} of {options.steps} from {state.path}")
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)

        loop_start = time.perf_counter()
        for step in range(first, options.steps):
            lr = lr_at(step, options)
            for group in (g for o in optimizers for g in o.param_groups):
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batches = stream.micro_batches(step)
            total = torch.zeros((), dtype=torch.float64, device=run.device)
            for index, ids in enumerate(batches):
                ids = ids.to(run.device)
                # Reduce-scatter only after the last micro-batch: the others accumulate locally.
                if run.sharded:
                    model.set_requires_gradient_sync(index == len(batches) - 1)
                extension.sample(step, run.rank * len(batches) + index)
                loss = extension.loss(model, ids)
                (extension.objective(loss, step) / len(batches)).backward()
                total += loss.detach().double()
            grad_norm = extension.clip(model, options.grad_clip)
            extension.after_clip()
            for each in optimizers:
                each.step()
                each.zero_grad(set_to_none=True)
            extension.after_step(optimizer, step + 1)
            mean = total / len(batches)
            dist.all_reduce(mean)
            tokens += options.global_batch * options.seqlen
            record = {"step": step + 1, "loss": float(mean) / run.world, "lr": lr, "tokens": tokens,
                      "grad_norm": float(full_tensor(grad_norm))}
            record.update(extension.record(step))
            if interval and (step + 1) % interval == 0 and step + 1 < options.steps:
                losses = domain_losses(model, stream, run, options.micro_batch, extension)
                record["domain_losses"] = dict(zip(stream.names, losses))
                record["proportions"] = dict(zip(stream.names, stream.update(losses)))
            history.append(record)
            if run.main:
                log(f"step {record['step']}/{options.steps} loss {record['loss']:.6f} lr {lr:.3e} "
                    f"grad_norm {record['grad_norm']:.4f}")
            if step + 1 == options.steps or (options.save_every and (step + 1) % options.save_every == 0):
                checkpoint.save(Path(options.out), model, optimizer, stream, step=step + 1, log=history,
                                fingerprint=fingerprint, run=run, extension=extension if extension.stateful else None)
        loop_seconds = time.perf_counter() - loop_start

        export_start = time.perf_counter()
        checkpoint.export(Path(options.out), model, tokenizer, run=run, prepare=extension.fold)
        export_seconds = time.perf_counter() - export_start
        if not run.main:
            return None
        trained_tokens = (options.steps - first) * options.global_batch * options.seqlen
        return {
            "log": history,
            "resumed_from": first if state else None,
            "world": run.world,
            "accumulation": layout.accumulation,
            "device": str(run.device),
            "precision": "bf16" if run.device.type == "cuda" else "fp32",
            "tokens_per_second": trained_tokens / loop_seconds if loop_seconds > 0 else None,
            "peak_memory_mib": _peak_memory(run.device),
            "sparsity": None,
            **extension.report(),
            **({"proportions": dict(zip(stream.names, stream.proportions))} if hasattr(stream, "dynamic") else {}),
            "seconds": {"load": load_seconds, "train": loop_seconds, "export": export_seconds},
        }
    finally:
        if run.owns_group:
            dist.destroy_process_group()


def _peak_memory(device: torch.device) -> Dict[str, float]:
    out = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
