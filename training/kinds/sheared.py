"""sheared: Sheared LLaMA's pruning run. Hard-concrete gates beside the model learn which heads, key/value
groups, MLP channels, hidden channels and layers to keep, pushed to --option target_shape by a
Lagrangian; at the export the deterministic gates are folded into the weights and the zeroed units
removed (methods/sheared.py), so the trained checkpoint is the pruned one. Its settings are the
method's options."""
from __future__ import annotations

from typing import List, Optional

from training.kinds.base import Extension, Kind


class Sheared(Kind):
    def check_options(self, options) -> None:
        import methods

        methods.make_options(methods.get("sheared"), options.recipe)  # raises one UsageError line

    def check_inputs(self, options, config, model_path: str) -> None:
        from methods import sheared

        sheared.target_for(config, options.recipe["target_shape"])  # a target the source can reach, or one line

    def extension(self, model, options, run) -> Extension:
        return Shearing(model, options, run)


class Shearing(Extension):
    """Gates beside the model, their optimizer, the Lagrangian."""

    stateful = True

    def __init__(self, model, options, run):
        import torch

        import methods
        from methods import sheared_model

        self.options = methods.make_options(methods.get("sheared"), options.recipe)
        self.seed, self.run = options.seed, run
        self.gates = sheared_model.Gates.for_model(model, self.options, steps=options.steps, seed=options.seed).to(
            run.device)
        self.masking = sheared_model.Masking(model, mask_embedding=self.options.mask_embedding)
        scale = self.options.mask_lr / options.lr
        self.optimizer = torch.optim.AdamW(
            [{"params": list(self.gates.log_alpha.values()), "lr_scale": scale},
             {"params": list(self.gates.lambdas.values()), "lr_scale": scale, "maximize": True}],
            lr=self.options.mask_lr, betas=(options.beta1, options.beta2), eps=options.eps, weight_decay=0.0)
        self.optimizers = [self.optimizer]
        self.lagrangian = None
        self.folded: Optional[dict] = None

    def parameters(self) -> List:
        return list(self.gates.parameters())

    def sample(self, step: int, micro: int) -> None:
        """Gates for one micro-batch, from its own generator: (seed, step, index in the global batch)."""
        import numpy as np
        import torch

        seed = int(np.random.SeedSequence([self.seed, step, micro]).generate_state(1)[0])
        self.masking.zs = self.gates.sample(generator=torch.Generator().manual_seed(seed))

    def objective(self, loss, step: int):
        self.lagrangian = self.gates.lagrangian(step)
        return loss + self.lagrangian

    def clip(self, model, max_norm: float):
        from training.losses import clip_together

        self.average_gradients()
        return clip_together([list(model.parameters()), self.parameters()], max_norm)

    def average_gradients(self) -> None:
        import torch
        import torch.distributed as dist

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

    def evaluating(self):
        """Deterministic gates (current expected size, or the target's) for an evaluation."""
        return self.masking.using(self.gates.deterministic(target=self.options.eval_target_model))

    def state_dict(self) -> dict:
        return {"gates": {k: v.detach().cpu() for k, v in self.gates.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])

    def record(self, step: int) -> dict:
        """After optimizer step `step` (0-based): the Lagrangian of its last micro-batch, the expected
        sparsities reached, the ramp's target that step used, the multipliers."""
        summary = self.gates.summary(step)
        return {"lagrangian": float(self.lagrangian.detach()),
                **{key: summary[key] for key in ("expected_sparsity", "target_sparsity", "expected_parameters",
                                                 "lambdas")}}

    def fold(self, model) -> None:
        """At the export: the deterministic gates at the target folded in, the zeroed units removed."""
        import dataclasses

        import methods

        self.masking.remove()
        self.folded = methods.prune(model, "sheared", state=self.gates.cpu(), device="cpu",
                                    **dataclasses.asdict(self.options))

    def report(self) -> dict:
        return {"prune": self.folded}


KIND = Sheared("sheared", "learn Sheared LLaMA's gates toward --option target_shape=..., then prune (the output "
                          "is the pruned model)", settings="Sheared LLaMA options")
