"""Kernels of the unstructured / N:M family, on one weight matrix at a time.

Pure tensor functions, no model and no hooks: Magnitude, Wanda and SparseGPT masks, the statistics
they need (Wanda's per-input-channel squared norms, SparseGPT's Hessian) and SparseGPT's OBS weight
update. They can be checked on random tensors against brute-force restatements.

Tie-breaking is part of the result. Quantized and low-precision weights tie often; the originals break
ties the way `torch.topk` (N:M), a stable `torch.sort` (Wanda rows) or a `<=` threshold (Magnitude and
SparseGPT unstructured) do, and so does every function here, on the same float32 scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional, Tuple, Union

from pydantic import Field, model_validator

from methods.core.errors import UsageError
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch


@dataclass(frozen=True)
class SparsityPattern:
    """What to zero: `ratio` of each comparison group (unstructured), or N of every M (N:M)."""

    ratio: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, sparsity_type: str, ratio: Optional[float]) -> "SparsityPattern":
        """From `sparsity_type` and `sparsity_ratio` (the ratio is implied by N:M when omitted).

        The ratio's range is declared on `SparseOptions`; what is checked here depends on both values.
        """
        if sparsity_type == "unstructured":
            if ratio is None:
                raise UsageError("sparsity_ratio is required for unstructured sparsity")
            return cls(float(ratio))
        n, m = _parse_nm(sparsity_type)
        if ratio is not None and abs(ratio - n / m) > 1e-9:
            raise UsageError(f"sparsity ratio {ratio} contradicts {n}:{m} (which is {n / m:g})")
        return cls(n / m, n, m)

    def check_width(self, name: str, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise UsageError(f"{name} has {in_features} input features, not divisible by M={self.m} of {self.name}")


@method_options
class SparseOptions:
    """Options shared by the unstructured / N:M methods."""

    sparsity_ratio: Annotated[Optional[float], Field(
        ge=0, lt=1, description="fraction of weights zeroed (unstructured); N:M implies it")] = None
    sparsity_type: Annotated[str, Field(
        description="unstructured, or N:M: N zeros in every M consecutive input weights of a row, 0 < N < M")
    ] = "unstructured"

    @model_validator(mode="after")
    def _pattern_is_consistent(self) -> "SparseOptions":
        self.pattern()
        return self

    def pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.sparsity_type, self.sparsity_ratio)

    def checked_pattern(self, linears) -> SparsityPattern:
        """The pattern, after checking every Linear's input width against M."""
        pattern = self.pattern()
        for name, module in linears.items():
            pattern.check_width(name, module.in_features)
        return pattern


def _parse_nm(text: str) -> Tuple[int, int]:
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"sparsity type must be 'unstructured' or N:M such as 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise UsageError(f"N:M sparsity needs 0 < N < M, got {text}")
    return n, m


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the N lowest scores in each consecutive block of M columns of every row.

    One `topk(largest=False)` per [rows, M] slice, as the originals do column block by column block;
    the slices are batched here, which leaves topk's per-slice tie order unchanged (tested).
    """
    import torch

    from methods.core.numerics import widened

    rows, cols = scores.shape
    blocks = widened(scores).reshape(rows, cols // m, m)
    lowest = torch.topk(blocks, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, pattern: SparsityPattern, *, exact_count: bool = False) -> torch.Tensor:
    """Magnitude pruning: one threshold over the whole matrix (unstructured), or N:M per row.

    The original zeroes every |w| <= the value at sorted position int(ratio * numel): one entry more
    than the ratio asks, plus ties (and one entry at ratio 0). `exact_count=True` zeroes exactly
    int(ratio * numel) entries instead (stable order among ties).
    """
    import torch

    scores = weight.abs()
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    flat = scores.flatten()
    k = int(weight.numel() * pattern.ratio)
    if exact_count:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.sort(flat, stable=True)[1][:k]] = True
        return mask.reshape(weight.shape)
    return scores <= kth_smallest(flat, k)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """`sort(values)[k]` (0-based), the originals' threshold, by selection instead of a full sort."""
    import torch

    return torch.kthvalue(values, k + 1).values


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: the Wanda score, from the running mean of squared input norms."""
    import torch

    return weight.abs() * torch.sqrt(input_sq_norm.reshape(1, -1))


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Wanda: per output row, zero the int(in * ratio) lowest scores (stable sort), or N:M per row."""
    scores = wanda_scores(weight, input_sq_norm)
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return row_lowest_stable(scores, int(scores.shape[1] * pattern.ratio))


def row_lowest_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k lowest scores of each row, ties going to the lower column index.

    Exactly the first k of a stable ascending sort (what the original takes), found by selection:
    everything below the row's k-th smallest value, then the earliest entries equal to it.
    """
    import torch

    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < kth
    ties = scores == kth
    needed = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (torch.cumsum(ties, dim=1) <= needed))


class InputSquaredNorm:
    """Running mean over samples of ||x_j||² per input feature j (Wanda's `scaler_row`).

    Updated as the original does it (rescale, count, add), so the float rounding matches too.
    """

    def __init__(self, in_features: int, device: torch.device):
        import torch

        self.value = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.nsamples = 0

    def add(self, inp: torch.Tensor) -> None:
        import torch

        from methods.core.numerics import running_zeros, widened

        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = widened(inp.reshape(-1, inp.shape[-1]).t())
        self.value = running_zeros(self.value, x)
        self.value *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.value += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


class Hessian:
    """SparseGPT's H = (2/N) Σ x xᵀ, kept as a running average over samples in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, in_features: int, device: torch.device):
        import torch

        self.value = torch.zeros((in_features, in_features), device=device, dtype=torch.float32)
        self.nsamples = 0

    def add(self, inp: torch.Tensor) -> None:
        from methods.core.numerics import running_zeros, widened

        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t()
        self.value = running_zeros(self.value, x)
        self.value *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * widened(x)
        self.value += x.matmul(x.t())


@dataclass(frozen=True)
class HessianFactor:
    """What SparseGPT needs of one Hessian: the upper Cholesky factor of its damped inverse, and the
    input columns that never saw a non-zero input (their weights are zeroed)."""

    hinv: torch.Tensor
    dead: torch.Tensor


def hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> HessianFactor:
    """Dead columns get H_jj = 1, the diagonal is damped by `percdamp` of its mean, then
    U = chol(H⁻¹)ᵀ: the original's sequence of operations, so the factor is bit for bit the same."""
    import torch

    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return HessianFactor(torch.linalg.cholesky(H, upper=True), dead)


def sparsegpt_prune(weight: torch.Tensor, hessian: Union[torch.Tensor, HessianFactor], pattern: SparsityPattern,
                    *, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one matrix: returns the pruned and OBS-updated weight (fp32, same shape).

    `hessian` is the layer input's Hessian, or its `hessian_factor` (then `percdamp` was applied
    there): Linears fed the same input share one factor. Columns are swept in blocks of `blocksize`.
    Unstructured masks are chosen once per block over all rows from w²/U_jj² of the block's current
    weights (U: upper Cholesky factor of H⁻¹); N:M masks are chosen every M columns from the partially
    updated weights. Each pruned column's error is propagated inside the block at once and to later
    blocks in one lazy batch update.
    """
    import torch

    from methods.core.numerics import widened

    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, percdamp)
    W = widened(weight.detach().clone())
    columns = W.shape[1]
    W[:, factor.dead] = 0
    Hinv = factor.hinv

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d2 = torch.diag(Hinv1).reshape(1, -1) ** 2
        if pattern.is_nm:
            mask1 = torch.zeros((W.shape[0], i2 - i1), dtype=torch.bool, device=W.device)
        else:
            scores = W[:, i1:i2] ** 2 / d2
            mask1 = scores <= kth_smallest(scores.flatten(), int(scores.numel() * pattern.ratio))
        # The sweep runs on the block transposed, so that each column is a contiguous row: the
        # per-column rank-1 updates are the same products and differences, ~5x faster on a CPU.
        W1t = W[:, i1:i2].t().contiguous()
        Q1t = torch.zeros_like(W1t)
        Err1t = torch.zeros_like(W1t)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                scores = W1t[i:i + pattern.m].t().contiguous() ** 2 / d2[:, i:i + pattern.m]
                mask1.scatter_(1, i + torch.topk(scores, pattern.n, dim=1, largest=False)[1], True)
            w = W1t[i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1t[i] = q
            err = (w - q) / Hinv1[i, i]
            W1t[i:] -= Hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            Err1t[i] = err
        W[:, i1:i2] = Q1t.t()
        W[:, i2:] -= Err1t.t().contiguous().matmul(Hinv[i1:i2, i2:])
    return W
