"""sparse: cross-entropy on a pruned model whose zeros stay zero (the collection's sparse retraining):
the gradients and optimizer state of the pruned weights are zeroed every step, and every step checks
that no pruned weight moved."""
from __future__ import annotations

from methods.core.errors import UsageError
from training.kinds.base import Extension, Kind

# Decoder Linear weights: what the sparse methods prune and the sparse kind keeps at zero.
SPARSE_PARAMETER_SUFFIXES = ("_proj.weight",)
# Sparse retraining keeps a pruned model's zeros; a model with fewer is not a pruned one.
MIN_SPARSE_ZERO_FRACTION = 0.1


class Sparse(Kind):
    def check_inputs(self, options, config, model_path: str) -> None:
        zeros = stored_zero_fraction(model_path)
        if zeros < MIN_SPARSE_ZERO_FRACTION:
            raise UsageError(f"{options.model} has {zeros:.2%} zeros in its decoder weights: kind sparse retrains a "
                             "pruned model keeping its zeros; prune it first (e.g. lpc prune --method wanda)")

    def extension(self, model, options, run) -> Extension:
        return KeptZeros()


class KeptZeros(Extension):
    """Its zeros are found on the loaded model's local shards (a sharded run's model is empty before)."""

    def __init__(self):
        self.fraction = None
        self.masks = None

    def sharded(self, model, run, shard) -> None:
        self.fraction = zero_fraction(model, run.device)
        self.masks = SparsityMasks(model, run.device)

    def after_clip(self) -> None:
        self.masks.mask_gradients()

    def after_step(self, optimizer, step: int) -> None:
        self.masks.mask_optimizer_state(optimizer)
        self.masks.check(step)

    def report(self) -> dict:
        return {"sparsity": {"zeros_kept": self.masks.zeros, "zero_fraction": self.fraction,
                             "checked_every_step": True}}


def sparse_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters()
            if name.endswith(SPARSE_PARAMETER_SUFFIXES) and ".layers." in name}


def zero_fraction(model, device=None) -> float:
    """Zeros among the sparse parameters; counted on the local shards and summed over the ranks where
    a process group exists (exact integers, so the fraction is the whole model's to the last bit)."""
    import torch
    import torch.distributed as dist

    params = sparse_parameters(model).values()
    total = sum(p.numel() for p in params)
    zeros = sum(int((_local(p) == 0).sum()) for p in params)
    if dist.is_initialized():
        count = torch.tensor(zeros, dtype=torch.int64, device=device)
        dist.all_reduce(count)
        zeros = int(count)
    return zeros / total if total else 0.0


def stored_zero_fraction(path: str) -> float:
    """Zeros among the decoder projection weights of a saved checkpoint, read tensor by tensor."""
    from training.loading import Checkpoint

    # Read, not memory-mapped: every rank of a sharded run checks this, and mapped pages stay resident.
    stored = Checkpoint(path)
    zeros = total = 0
    for name in stored.tensors:
        if name.endswith(SPARSE_PARAMETER_SUFFIXES) and ".layers." in name:
            tensor = stored.read(name)
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
    if total == 0:
        raise UsageError(f"{path} has no safetensors decoder weights to train sparsely")
    return zeros / total


class SparsityMasks:
    """The zeros of the sparse parameters, per local shard; their gradients and optimizer state are
    zeroed every step, and every step checks that they stayed zero."""

    def __init__(self, model, device):
        import torch
        import torch.distributed as dist

        self.params = sparse_parameters(model)
        self.masks = {name: (_local(p) == 0) for name, p in self.params.items()}
        count = torch.tensor(float(sum(int(m.sum()) for m in self.masks.values())), device=device)
        dist.all_reduce(count)
        self.zeros = int(count)

    def mask_gradients(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                _local(p.grad).masked_fill_(self.masks[name], 0)

    def mask_optimizer_state(self, optimizer) -> None:
        for name, p in self.params.items():
            for value in optimizer.state.get(p, {}).values():
                if hasattr(value, "shape") and value.shape == p.shape:
                    _local(value).masked_fill_(self.masks[name], 0)

    def check(self, step: int) -> None:
        moved = sum(int((_local(p)[self.masks[name]] != 0).sum()) for name, p in self.params.items())
        if moved:
            raise RuntimeError(f"step {step}: {moved} pruned weights became non-zero")


def _local(tensor):
    """A DTensor's shard on this rank (FSDP2 parameters, gradients and optimizer state), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


KIND = Sparse("sparse", "cross-entropy keeping the pruned zeros at zero")
