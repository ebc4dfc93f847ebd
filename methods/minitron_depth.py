"""Minitron depth pruning as the LLM Pruning Collection runs it: drop one contiguous block of layers.

Contiguous-block scan: with n = remove_layers and L the depth, every candidate
i = 0..L-n is scored with layers [i, i+n) left out (the same modules, nothing copied), after the
unpruned baseline. ``select="closest"`` picks the candidate whose score is closest to the baseline,
first on ties: the collection's rule, for perplexity and accuracy alike.
``select="best"`` picks the lowest perplexity / highest accuracy instead (first on ties), which is
what the Minitron paper's figures argue for.

Scorers:

``score="ppl"``
    Every calibration row is one window: exp of the seq_len-weighted mean of the windows' mean
    next-token cross-entropy (methods.scoring's ``minitron`` protocol). The collection cut its windows from
    one tokenized stream (repro.data's ``wikitext103-train``, ``pg19`` and ``windows:PATH`` specs do the same).
``score=<lm-eval task>``
    lm-eval on the in-memory model with the tokenizer (methods.scoring.run_tasks), metric ``acc``,
    ``num_fewshot`` shots, ``limit`` passed through (the collection passed its calib_size, i.e. the
    whole set). The kit's own task folder is searched too, so ``lpc_smoke_mc`` works on the smoke
    model. The calibration rows are not used by this scorer. Unlike the collection, the kit's
    harness adds no BOS (methods.scoring) and runs with ``batch_size`` (the collection: 1, with an
    automatic batch up to 64 for some request types).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable, List, Literal, Optional

from pydantic import Field, model_validator

from methods.core.errors import UsageError
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

PPL = "ppl"


@method_options
class Options:
    remove_layers: Annotated[int, Field(ge=1, description="how many contiguous layers to remove")]
    score: Annotated[str, Field(
        min_length=1, description="ppl (calibration perplexity) or an lm-eval task scored by its acc")] = PPL
    num_fewshot: Annotated[int, Field(ge=0, description="shots of the scoring task")] = 0
    select: Annotated[Literal["closest", "best"], Field(
        description="the block whose score is closest to the unpruned one (the collection), or the best")
    ] = "closest"
    limit: Annotated[Optional[int], Field(ge=1, description="examples of the scoring task (default: all)")] = None
    batch_size: Annotated[int, Field(ge=1, description="lm-eval batch size of the scoring task")] = 1

    @model_validator(mode="after")
    def _check_scorer(self) -> "Options":
        from methods.scoring import known_tasks

        if self.score != PPL and self.score not in known_tasks():
            raise ValueError(f"unknown scoring task {self.score!r}: not 'ppl' and not an lm-eval task "
                             "(nor one of the kit's methods/core/assets/tasks)")
        if self.score == PPL and (self.num_fewshot or self.limit is not None):
            raise ValueError("num_fewshot and limit apply to a task scorer, not to score=ppl")
        return self


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device,
          tokenizer=None) -> dict:
    from methods import depth, surgery

    count = options.remove_layers
    total = surgery.check_removable(model, count)
    if options.score != PPL and tokenizer is None:
        raise UsageError(f"scoring with task {options.score!r} needs the model's tokenizer")
    scorer = _scorer(options, calib, tokenizer)
    with depth.on_device(model, device):
        baseline = scorer(model)
        candidates = []
        for start in range(total - count + 1):
            with depth.layers_skipped(model, range(start, start + count)):
                candidates.append(scorer(model))
    start = choose(candidates, baseline, options.select, higher_is_better=options.score != PPL)
    removed = list(range(start, start + count))
    surgery.remove_layers(model, removed)
    return {"scores": {"baseline": baseline, "candidates": candidates,
                       "metric": PPL if options.score == PPL else options.score},
            "layers_removed": removed, "block_start": start}


def choose(candidates: List[float], baseline: float, select: str, *, higher_is_better: bool) -> int:
    """The chosen candidate's index; the first one wins ties (the collection's strict `<`)."""
    if select == "closest":
        key = [abs(score - baseline) for score in candidates]
    elif higher_is_better:
        key = [-score for score in candidates]
    else:
        key = list(candidates)
    return min(range(len(candidates)), key=key.__getitem__)


def _scorer(options: Options, calib: torch.Tensor, tokenizer) -> Callable[[nn.Module], float]:
    from torch import nn

    from methods.scoring import TaskSpec, cell_value, perplexity, run_tasks

    if options.score == PPL:
        return lambda model: perplexity(model, calib, "minitron")
    spec = TaskSpec(options.score, num_fewshot=options.num_fewshot, metric="acc")

    def accuracy(model: nn.Module) -> float:
        return cell_value(run_tasks(model, tokenizer, [spec], batch_size=options.batch_size,
                                    limit=options.limit), spec)

    return accuracy


