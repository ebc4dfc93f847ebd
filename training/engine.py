"""Continued pre-training (`cpt`), logit distillation (`kd`), sparse retraining (`sparse`) and Sheared
LLaMA's pruning run (`sheared`) of a Hugging Face causal LM with PyTorch FSDP2, one process per
device (torchrun), as `lpc train` runs it.

The whole run, top to bottom, is `train()`:

1. process group: gloo on CPU, NCCL on GPUs; torchrun's environment, or a group of one in-process;
2. data: global batch = world x accumulation x micro batch (training/data.py);
3. the student (and for `kd` the frozen teacher) from Hugging Face checkpoints, fp32 master weights;
   for `sparse`, the positions of the student's zeros;
4. FSDP2: `fully_shard` on every decoder layer, then the root; bf16 compute on GPUs, fp32 on CPUs;
5. AdamW(0.9, 0.95, eps 1e-8, weight decay 0.1), the learning rate of `lr_at` set before every step;
6. resume from the newest complete checkpoint under OUT/checkpoints (training/checkpoint.py);
7. every step: the micro-batches' losses (divided by the accumulation) backward, gradient norm
   clipped at 1.0, for `sparse` the gradients and optimizer state at the zeros masked, the optimizer
   step, a check that every zero is still zero; a checkpoint every `save_every` steps and at the end;
8. export: the full state dict gathered on rank 0 and saved as a plain Hugging Face checkpoint.

Dynamic batch loading (training/data.py `DomainStream`, any kind): after every `update_interval`-th
step, each domain's mean token loss on its held-out windows (every rank a strided share, summed over
ranks) updates the proportions the next steps draw with; losses and proportions go into the log.

`sheared` (`Shearing`): the hard-concrete gates and Lagrange multipliers of methods/sheared.py,
replicated on every rank beside the sharded model, multiplied into it by forward hooks. Each
micro-batch draws its gates from a generator seeded by (seed, step, micro-batch of the global
batch), so the draws do not depend on the world size; the loss adds the Lagrangian at the step's
target; the gates' gradients are averaged over ranks like the weights', clipped together with them,
and stepped by their own AdamW (log-alphas at `mask_lr`, multipliers by gradient ascent at the same
rate, no weight decay) whose learning rates follow the weights' schedule. Gates and their optimizer
are part of every checkpoint; the export folds the deterministic gates into the weights and removes
the zeroed units, so the output is the pruned model.

Gradient accumulation steps after exactly `global_batch / (micro_batch * world)` micro-batches.
(The collection's FMS-FSDP loop steps after its first micro-batch, one too early, and its resume
offsets assume a multiple of the accumulation; this engine has neither quirk.) Sparse masking
follows the collection's MaxText change: gradients are zeroed after clipping, before the update,
so the clipped norm still counts the zeros' gradients.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods.errors import UsageError
from training import checkpoint
from training.options import TrainOptions

# Decoder Linear weights: what the sparse methods prune and the sparse kind keeps at zero.
SPARSE_PARAMETER_SUFFIXES = ("_proj.weight",)


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


def load_causal_lm(path: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An HF checkpoint the kit wrote or can read (the per-layer-width `lpc_<arch>` formats included), on the CPU."""
    from transformers import AutoModelForCausalLM

    from methods.modeling_lpc import register

    register()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype) if _old_transformers() else \
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    return model


def _old_transformers() -> bool:
    import transformers

    return tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56)


def sparse_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters()
            if name.endswith(SPARSE_PARAMETER_SUFFIXES) and ".layers." in name}


def zero_fraction(model: nn.Module) -> float:
    params = sparse_parameters(model).values()
    total = sum(p.numel() for p in params)
    return sum(int((p == 0).sum()) for p in params) / total if total else 0.0


def shard(model: nn.Module, run: Run, *, activation_checkpointing: bool = False) -> nn.Module:
    """FSDP2 over the model: every decoder layer its own unit, the rest (embeddings, norm, head) the root's."""
    fully_shard, MixedPrecisionPolicy = _fsdp2()
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs = {}
    if run.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model.to(run.device)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp2():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4/2.5 (the `train` image): the same API under its first name
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


class SparsityMasks:
    """The zeros of the sparse parameters, per local shard; their gradients and optimizer state are
    zeroed every step, and every step checks that they stayed zero."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.params = sparse_parameters(model)
        self.masks = {name: (_local(p) == 0) for name, p in self.params.items()}
        count = torch.tensor(float(sum(int(m.sum()) for m in self.masks.values())), device=device)
        dist.all_reduce(count)
        self.zeros = int(count)

    def mask_gradients(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                _local(p.grad).masked_fill_(self.masks[name], 0)

    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for name, p in self.params.items():
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    _local(value).masked_fill_(self.masks[name], 0)

    def check(self, step: int) -> None:
        moved = sum(int((_local(p)[self.masks[name]] != 0).sum()) for name, p in self.params.items())
        if moved:
            raise RuntimeError(f"step {step}: {moved} pruned weights became non-zero")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2 parameters, gradients and optimizer state), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class Shearing:
    """The `sheared` kind's part of a run: gates beside the model, their optimizer, the Lagrangian."""

    def __init__(self, model: nn.Module, options: TrainOptions, run: Run):
        import methods
        from methods import sheared

        self.options = methods.make_options(methods.get("sheared"), options.recipe)
        self.seed, self.run = options.seed, run
        self.gates = sheared.Gates.for_model(model, self.options, steps=options.steps, seed=options.seed).to(run.device)
        self.masking = sheared.Masking(model, mask_embedding=self.options.mask_embedding)
        scale = self.options.mask_lr / options.lr
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.gates.log_alpha.values()), "lr_scale": scale},
             {"params": list(self.gates.lambdas.values()), "lr_scale": scale, "maximize": True}],
            lr=self.options.mask_lr, betas=(options.beta1, options.beta2), eps=options.eps, weight_decay=0.0)
        self.folded: Optional[dict] = None

    def parameters(self) -> List[nn.Parameter]:
        return list(self.gates.parameters())

    def sample(self, step: int, micro: int) -> None:
        """Gates for one micro-batch, from its own generator: (seed, step, index in the global batch)."""
        seed = int(np.random.SeedSequence([self.seed, step, micro]).generate_state(1)[0])
        self.masking.zs = self.gates.sample(generator=torch.Generator().manual_seed(seed))

    def lagrangian(self, step: int) -> torch.Tensor:
        return self.gates.lagrangian(step)

    @contextlib.contextmanager
    def evaluating(self):
        """Deterministic gates (current expected size, or the target's) for an evaluation."""
        with self.masking.using(self.gates.deterministic(target=self.options.eval_target_model)):
            yield

    def average_gradients(self) -> None:
        if self.run.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.run.world
        offset = 0
        for p, g in zip(self.parameters(), grads):
            p.grad = flat[offset:offset + g.numel()].reshape(g.shape).clone()
            offset += g.numel()

    def state_dict(self) -> dict:
        return {"gates": {k: v.detach().cpu() for k, v in self.gates.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])

    def record(self, step: int) -> dict:
        """After optimizer step `step` (0-based): the expected sparsities reached, the ramp's target that
        step used, the multipliers."""
        summary = self.gates.summary(step)
        return {key: summary[key] for key in ("expected_sparsity", "target_sparsity", "expected_parameters", "lambdas")}

    def fold(self, model: nn.Module) -> None:
        """At the export: the deterministic gates at the target folded in, the zeroed units removed."""
        import dataclasses

        import methods

        self.masking.remove()
        self.folded = methods.prune(model, "sheared", state=self.gates.cpu(), device="cpu",
                                    **dataclasses.asdict(self.options))


def clip_together(parameter_sets: List[List[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip the gradients of sharded and replicated parameters by their joint norm (clip_grad_norm_
    does not mix DTensors with plain tensors); returns the norm before clipping."""
    norms = [_full(torch.nn.utils.clip_grad_norm_(params, float("inf"))) for params in parameter_sets]
    total = torch.sqrt(sum(n.double() ** 2 for n in norms))
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1:
        for params in parameter_sets:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coefficient)
    return total


def domain_losses(model: nn.Module, stream, run: Run, micro_batch: int, shearing: Optional[Shearing]) -> List[float]:
    """Each domain's mean token loss on its held-out windows; every rank runs the same number of forward
    passes (FSDP gathers parameters in each), a rank short of windows repeating one with weight 0."""
    sums = torch.zeros(len(stream.evaluation), 2, dtype=torch.float64, device=run.device)
    with torch.no_grad(), (shearing.evaluating() if shearing else contextlib.nullcontext()):
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


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over every position (mean, or "sum"), logits in fp32."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, *, temperature: float,
            alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * cross-entropy, per token.

    Forward KL from the teacher's distribution, as the Minitron paper distils (alpha 1: logits only).
    """
    s = F.log_softmax(student[:, :-1].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1].float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
    loss = alpha * temperature ** 2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * lm_loss(student, ids)
    return loss


def check_teacher(student_path: str, teacher_path: str) -> None:
    """Refuse, in one line, a teacher whose vocabulary is not the student's.

    Logit distillation compares the two distributions token id by token id, so any two architectures
    may distil into each other as long as the ids mean the same tokens: the same vocabulary size and,
    where both checkpoints carry a tokenizer, the same token for every id (Llama-2 and Mistral-7B
    both have 32000 ids, not the same tokens).
    """
    from transformers import AutoConfig

    from methods.modeling_lpc import register

    register()
    sizes = []
    for flag, path in (("--model", student_path), ("--teacher", teacher_path)):
        try:
            sizes.append(AutoConfig.from_pretrained(path).vocab_size)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{flag} {path}: cannot read its config: {str(exc).splitlines()[0]}") from None
    if sizes[0] != sizes[1]:
        raise UsageError(f"the teacher's vocabulary ({sizes[1]} tokens) is not the student's "
                         f"({sizes[0]}): logit distillation needs the same tokenizer")
    vocabularies = [_vocabulary(path) for path in (student_path, teacher_path)]
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        differ = sum(1 for token, index in vocabularies[1].items() if vocabularies[0].get(token) != index)
        raise UsageError(f"the teacher's tokenizer maps {differ} of its {len(vocabularies[1])} tokens to other ids "
                         "than the student's: logit distillation needs the same tokenizer")


def _vocabulary(path: str) -> Optional[Dict[str, int]]:
    """The checkpoint's token -> id map, or None where it carries no tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError, TypeError, KeyError):
        return None


def train(options: TrainOptions, *, student_path: str, teacher_path: Optional[str], data_factory: Callable,
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
        model = load_causal_lm(student_path)
        shearing = Shearing(model, options, run) if options.kind == "sheared" else None
        masks_zero_fraction = zero_fraction(model) if options.kind == "sparse" else None
        teacher = None
        if options.kind == "kd":
            teacher = load_causal_lm(teacher_path).eval()
            teacher.requires_grad_(False)
        model.train()
        shard(model, run, activation_checkpointing=options.activation_checkpointing)
        if teacher is not None:
            shard(teacher, run)
        masks = SparsityMasks(model, run.device) if options.kind == "sparse" else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=(options.beta1, options.beta2),
                                      eps=options.eps, weight_decay=options.weight_decay)
        optimizers = [optimizer] + ([shearing.optimizer] if shearing else [])
        interval = stream.dynamic.update_interval if hasattr(stream, "dynamic") else 0
        load_seconds = time.perf_counter() - started

        state = checkpoint.resume(Path(options.out), model, optimizer, stream, fingerprint=fingerprint, run=run,
                                  extension=shearing)
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
                model.set_requires_gradient_sync(index == len(batches) - 1)
                if shearing:
                    shearing.sample(step, run.rank * len(batches) + index)
                objective = loss = _loss(model, teacher, ids, options)
                if shearing:
                    lagrangian = shearing.lagrangian(step)
                    objective = loss + lagrangian
                (objective / len(batches)).backward()
                total += loss.detach().double()
            if shearing:
                shearing.average_gradients()
                grad_norm = clip_together([list(model.parameters()), shearing.parameters()], options.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            if masks:
                masks.mask_gradients()
            for each in optimizers:
                each.step()
                each.zero_grad(set_to_none=True)
            if masks:
                masks.mask_optimizer_state(optimizer)
                masks.check(step + 1)
            mean = total / len(batches)
            dist.all_reduce(mean)
            tokens += options.global_batch * options.seqlen
            record = {"step": step + 1, "loss": float(mean) / run.world, "lr": lr, "tokens": tokens,
                      "grad_norm": float(_full(grad_norm))}
            if shearing:
                record["lagrangian"] = float(lagrangian.detach())
                record.update(shearing.record(step))
            if interval and (step + 1) % interval == 0 and step + 1 < options.steps:
                losses = domain_losses(model, stream, run, options.micro_batch, shearing)
                record["domain_losses"] = dict(zip(stream.names, losses))
                record["proportions"] = dict(zip(stream.names, stream.update(losses)))
            history.append(record)
            if run.main:
                log(f"step {record['step']}/{options.steps} loss {record['loss']:.6f} lr {lr:.3e} "
                    f"grad_norm {record['grad_norm']:.4f}")
            if step + 1 == options.steps or (options.save_every and (step + 1) % options.save_every == 0):
                checkpoint.save(Path(options.out), model, optimizer, stream, step=step + 1, log=history,
                                fingerprint=fingerprint, run=run, extension=shearing)
        loop_seconds = time.perf_counter() - loop_start

        export_start = time.perf_counter()
        checkpoint.export(Path(options.out), model, tokenizer, run=run, prepare=shearing.fold if shearing else None)
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
            "sparsity": None if masks is None else {"zeros_kept": masks.zeros, "zero_fraction": masks_zero_fraction,
                                                    "checked_every_step": True},
            **({"prune": shearing.folded} if shearing else {}),
            **({"proportions": dict(zip(stream.names, stream.proportions))} if hasattr(stream, "dynamic") else {}),
            "seconds": {"load": load_seconds, "train": loop_seconds, "export": export_seconds},
        }
    finally:
        if run.owns_group:
            dist.destroy_process_group()


def _loss(model: nn.Module, teacher: Optional[nn.Module], ids: torch.Tensor, options: TrainOptions) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    if teacher is None:
        return lm_loss(logits, ids)
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits
    return kd_loss(logits, target, ids, temperature=options.kd_temperature, alpha=options.kd_alpha)


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _peak_memory(device: torch.device) -> Dict[str, float]:
    out = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
