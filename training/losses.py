"""What the loop minimises and how it clips: the losses and the joint gradient clipping the kinds share."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


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


def clip_together(parameter_sets: List[List[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip the gradients of sharded and replicated parameters by their joint norm (clip_grad_norm_
    does not mix DTensors with plain tensors); returns the norm before clipping."""
    norms = [full_tensor(torch.nn.utils.clip_grad_norm_(params, float("inf"))) for params in parameter_sets]
    total = torch.sqrt(sum(n.double() ** 2 for n in norms))
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1:
        for params in parameter_sets:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coefficient)
    return total


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (FSDP2's norms and parameters), else the tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
