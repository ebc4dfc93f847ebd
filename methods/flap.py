"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024).

1. Statistics, from the DENSE model for every layer (not sequential): the calibration inputs are
   captured at layer 0 and pushed through the unpruned layers; on the way, the inputs x of o_proj
   and down_proj give per input channel j, over the calibration sequences (batch size 1):
   * baseline_j: running mean of the per-sequence token means (= the token mean);
   * fluc_j: the original's Welford-like running fluctuation. The first sequence sets it to 0; each
     later one does fluc *= (n-1)/n, fluc += Σ_tokens (x - μ_new)(x - μ_old) / (n+1), n = sequences
     seen before. The original's μ_old is an alias of the mean it has just updated in place, so the
     sum is effectively Σ (x - μ_new)², which is what is computed by default
     (`exact_fluctuation=True` uses the mean from before the update instead);
   * WIFN only: s_j, Wanda's running mean over sequences of ||x_j||².
2. Metric per channel: IFV = fluc_j; WIFV = fluc_j * Σ_i W_ij²; WIFN = mean_i |W_ij| sqrt(s_j), for
   W = o_proj / down_proj (weights in the model dtype, as the original). The attention metric is
   squared once more before any further use; the MLP metric is not.
3. Structure:
   * AL-AM (default): each layer's attention and MLP metric vectors are standardised separately
     (minus the mean, over torch.std, unbiased). An attention unit scores the mean of its
     channels' standardised metric. All units of all layers are sorted descending; each MLP channel
     weighs 1 and each attention unit its parameter count in MLP channels; the threshold is the
     sorted score where the cumulative weight is closest to total * (1 - ratio) (first such
     position), and units scoring strictly more are kept.
   * UL-UM: per layer, unstandardised: an attention unit scores the sum of its channels' (squared)
     metric; the original's uniform rule (threshold at the int(ratio * n)-th smallest, keep >=).
4. Bias compensation (default on): o_proj / down_proj get the bias W[:, P] · baseline[P] of their
   removed input channels P (baseline cast to the model dtype, as the original keeps it in fp16),
   computed as (baseline * ~keep) @ Wᵀ like the original. Every layer gets the bias (zero where
   nothing was removed), so the checkpoint has biases everywhere or nowhere. Then the weights are
   sliced (methods/surgery.py).

Attention unit weight (`head_weight`): the original writes 512/3 (= 4·4096·128 / (3·4096), a head's
parameters over an MLP channel's, for head_dim 128) into an int64 tensor, so it is truncated to
170. `generalized` (default) uses the same ratio for this model: 4·head_dim/3 per MHA head, and in
general (2g+2)·head_dim/3 for a key/value group with g query heads (q, o: g heads; k, v: one each).
`literal` keeps 512/3 for every attention unit. Both are truncated to an integer like the original
(21 and 170 for head_dim 16; 85 for head_dim 64; 170 for g=3, head_dim 64) unless
`exact_head_weight=True`.

Grouped-query attention (the original is MHA only): the attention unit is a whole key/value group
(its key/value head with all of its query heads); see methods/width_stats.py. If AL-AM would
remove every attention unit (or every MLP channel) of a layer, the run is refused with a UsageError
naming the layer, before anything is cut.

Calibration in the original: WikiText-2 train joined with " ", 1024 random 128-token windows, seed
0 (data spec `wikitext2`, repro.data.sample_stream) -- in-domain for the WikiText-2 perplexity
the paper reports (Wanda-sp calibrates on C4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, List, Literal, Optional

from pydantic import Field

from methods.core.errors import UsageError
from methods.core.numerics import running_zeros, widened
from methods.options import method_options
from methods.sparsity import InputSquaredNorm

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

NAME = "flap"
LITERAL_HEAD_WEIGHT = 512.0 / 3


@method_options
class Options:
    pruning_ratio: Annotated[float, Field(
        gt=0, lt=1, description="fraction of the attention units and MLP channels removed, weighed by "
                                "parameters across layers (AL-AM) or in every layer (UL-UM)")]
    metrics: Annotated[Literal["WIFV", "IFV", "WIFN"], Field(description="channel metric")] = "WIFV"
    structure: Annotated[Literal["AL-AM", "UL-UM"], Field(
        description="AL-AM: one adaptive threshold across layers; UL-UM: the same ratio in every layer")] = "AL-AM"
    bias_compensation: Annotated[bool, Field(
        description="add the removed channels' mean contribution as a bias")] = True
    head_weight: Annotated[Literal["generalized", "literal"], Field(
        description="AL-AM cost of an attention unit: its parameters over an MLP channel's, or the original's 512/3")
    ] = "generalized"
    exact_head_weight: Annotated[bool, Field(
        description="keep the head weight's fraction (the original truncates it to an integer)")] = False
    exact_fluctuation: Annotated[bool, Field(
        description="textbook Welford update instead of the original's aliased running mean")] = False


class InputFluctuation:
    """Running input mean and fluctuation of one Linear, updated as the original's BiasGPT does."""

    def __init__(self, in_features: int, device: torch.device, *, fluctuation: bool, exact: bool = False):
        import torch

        self.baseline = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.fluc = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.track = fluctuation
        self.exact = exact
        self.nsamples = 0

    def add(self, inp: torch.Tensor) -> None:
        import torch

        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, inp.shape[-1]).t()   # [channels, tokens], model dtype
        seen = self.nsamples
        self.baseline, self.fluc = running_zeros(self.baseline, x), running_zeros(self.fluc, x)
        old = self.baseline.clone() if self.exact else None
        self.baseline *= seen / (seen + batch)
        # The token mean is taken in the model dtype before it joins the fp32 running mean, as upstream.
        self.baseline += torch.mean(x, dim=1) / (seen + batch)
        if self.track and seen > 0:
            self.fluc *= (seen - 1) / (seen + batch - 1)
            centred = x - self.baseline.unsqueeze(1)
            other = centred if old is None else x - old.unsqueeze(1)
            self.fluc += torch.sum(centred * other, dim=1) / (seen + batch)
        self.nsamples += batch


@dataclass
class LayerStatistics:
    attn_metric: torch.Tensor      # [heads * head_dim], float32, already squared
    mlp_metric: torch.Tensor       # [intermediate], float32
    attn_baseline: torch.Tensor    # [heads * head_dim], model dtype
    mlp_baseline: torch.Tensor     # [intermediate], model dtype


def channel_metric(kind: str, weight: torch.Tensor, stat: InputFluctuation,
                   norm: Optional[InputSquaredNorm]) -> torch.Tensor:
    import torch

    if kind == "IFV":
        return stat.fluc.clone()
    if kind == "WIFV":
        return stat.fluc * torch.sum(weight.pow(2), dim=0)
    return (weight.abs() * torch.sqrt(norm.value.reshape(1, -1))).mean(dim=0)


def collect_statistics(model: nn.Module, calib: torch.Tensor, options: Options,
                       device: torch.device) -> List[LayerStatistics]:
    """Every layer's metrics and input means, each layer fed the DENSE outputs of the one before."""
    import torch
    from torch import nn

    from methods import width_stats
    from methods.calibration import LayerInputs, gather_inputs, sequential_layers

    out: List[LayerStatistics] = []

    def handle_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        linears = width_stats.scored_linears(layer)
        attn, mlp = linears
        stats = {name: InputFluctuation(m.in_features, device, fluctuation=options.metrics != "WIFN",
                                        exact=options.exact_fluctuation) for name, m in linears.items()}
        norms = ({name: InputSquaredNorm(m.in_features, device) for name, m in linears.items()}
                 if options.metrics == "WIFN" else {})

        def collector(name: str):
            def collect(x: torch.Tensor) -> None:
                stats[name].add(x)
                if name in norms:
                    norms[name].add(x)
            return collect

        gather_inputs(layer, inputs, {name: collector(name) for name in linears})
        metrics = {}
        for name, linear in linears.items():
            metric = channel_metric(options.metrics, linear.weight.data, stats[name], norms.get(name))
            metrics[name] = widened(metric ** 2 if name == attn else metric).cpu()
            width_stats.publish(index, name, "baseline_inp", stats[name].baseline)
            if name in norms:
                width_stats.publish(index, name, "scaler_inp", norms[name].value)
            else:
                width_stats.publish(index, name, "fluc_inp", stats[name].fluc)
        dtype = linears[attn].weight.dtype
        out.append(LayerStatistics(metrics[attn], metrics[mlp], stats[attn].baseline.to(dtype).cpu(),
                                   stats[mlp].baseline.to(dtype).cpu()))

    # The handler prunes nothing, so the engine feeds every layer the dense outputs of the last.
    sequential_layers(model, calib, device, handle_layer)
    return out


def standardize(values: torch.Tensor) -> torch.Tensor:
    import torch

    return (values - torch.mean(values)) / torch.std(values)


def unit_weight(layer: nn.Module, options: Options) -> float:
    """An attention unit's cost in MLP channels for the AL-AM budget (see the module docstring)."""
    from methods import width_stats

    _, size, head_dim = width_stats.group_layout(layer)
    weight = LITERAL_HEAD_WEIGHT if options.head_weight == "literal" else (2 * size + 2) * head_dim / 3
    return weight if options.exact_head_weight else float(int(weight))


def select_adaptive(layers, stats: List[LayerStatistics], options: Options):
    """AL-AM: one threshold over the standardised scores of every unit of every layer."""
    import torch

    from methods import width_stats

    attn = [width_stats.per_group(standardize(s.attn_metric), layer).mean(dim=1) for layer, s in zip(layers, stats)]
    mlp = [standardize(s.mlp_metric) for s in stats]
    weights = [unit_weight(layer, options) for layer in layers]
    scores = torch.cat(attn + mlp)
    by_unit = torch.cat([torch.full((a.numel(),), w, dtype=torch.float64) for a, w in zip(attn, weights)]
                        + [torch.ones(sum(m.numel() for m in mlp), dtype=torch.float64)])
    # The original's integer tensor makes the budget arithmetic float32 (int64 sum * python float);
    # the exact weights stay in float64.
    by_unit = by_unit if options.exact_head_weight else by_unit.long()
    ordered, order = torch.sort(scores, descending=True)
    cost = by_unit[order]
    target = torch.sum(cost) * (1 - options.pruning_ratio)
    threshold = ordered[torch.argmin(torch.abs(torch.cumsum(cost, 0) - target))]
    keep_groups = [a > threshold for a in attn]
    keep_channels = [m > threshold for m in mlp]
    # Rounded like the reported scores, so `score > threshold` over the report gives the selection.
    extra = {"threshold": width_stats.floats(threshold)[0], "attention_unit_weights": weights}
    return keep_groups, keep_channels, attn, mlp, extra


def select_uniform(layers, stats: List[LayerStatistics], options: Options):
    """UL-UM: every layer loses int(ratio * n) attention units and MLP channels (ties kept)."""
    from methods import width_stats

    attn = [width_stats.per_group(s.attn_metric, layer).sum(dim=1) for layer, s in zip(layers, stats)]
    mlp = [s.mlp_metric for s in stats]
    keep_groups = [width_stats.uniform_keep(a, options.pruning_ratio) for a in attn]
    keep_channels = [width_stats.uniform_keep(m, options.pruning_ratio) for m in mlp]
    thresholds = {"heads": [width_stats.floats(a[k].min())[0] for a, k in zip(attn, keep_groups)],
                  "mlp_channels": [width_stats.floats(m[k].min())[0] for m, k in zip(mlp, keep_channels)]}
    return keep_groups, keep_channels, attn, mlp, {"threshold": thresholds}


def compensate(layer: nn.Module, keep_groups: torch.Tensor, keep_channels: torch.Tensor,
               stats: LayerStatistics, device: torch.device) -> None:
    """Add the removed input channels' mean contribution to o_proj's and down_proj's outputs."""
    from methods import surgery, width_stats

    _, size, head_dim = width_stats.group_layout(layer)
    keep_columns = keep_groups.repeat_interleave(size * head_dim)
    attn, mlp = width_stats.scored_linears(layer).values()
    for linear, baseline, keep in ((attn, stats.attn_baseline, keep_columns), (mlp, stats.mlp_baseline, keep_channels)):
        weight = linear.weight.data.to(device)
        bias = (baseline.to(device) * ~keep.to(device)) @ weight.T
        surgery.add_output_bias(linear, bias)


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    from methods import width_stats
    from methods.anatomy import decoder_layers

    if options.metrics != "WIFN" and calib.shape[0] < 2:
        raise UsageError(f"{NAME}: the {options.metrics} fluctuation needs at least 2 calibration samples, "
                         f"got {calib.shape[0]}")
    layers = decoder_layers(model)
    stats = collect_statistics(model, calib, options, device)
    select = select_adaptive if options.structure == "AL-AM" else select_uniform
    keep_groups, keep_channels, attn, mlp, extra = select(layers, stats, options)
    width_stats.check_not_emptied(NAME, keep_groups, keep_channels)
    report_layers = []
    for layer, groups, channels, layer_stats in zip(layers, keep_groups, keep_channels, stats):
        if options.bias_compensation:
            compensate(layer, groups, channels, layer_stats, device)
        report_layers.append(width_stats.apply_selection(layer, groups, channels))
    return {"layers": report_layers,
            "scores": {"heads": [width_stats.floats(a) for a in attn],
                       "mlp_channels": [width_stats.floats(m) for m in mlp]},
            **extra}
