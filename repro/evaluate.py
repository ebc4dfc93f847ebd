"""Evaluate a model on every metric of a method's table: perplexities, lm-eval accuracies, structure.

The scoring itself (the perplexity protocols, the lm-eval wrapper) lives in methods/scoring.py,
because methods score candidates with the same code; this module reads a table's metric specs,
fetches the evaluation tokens and turns the scores into the numbers a result file holds.
"""
from __future__ import annotations

from typing import Dict

from methods import scoring, surgery
from repro import data
from repro.tables import Profile

# The collection caps the Wanda window at 8192 so Llama-3.x's 131072 context stays usable.
MAX_MODEL_SEQLEN = 8192


def model_seqlen(model) -> int:
    """The Wanda-protocol window: the model's context length, capped at 8192 as in the collection."""
    return min(int(model.config.max_position_embeddings), MAX_MODEL_SEQLEN)


def evaluate_metrics(model, tokenizer, table: Profile, config: dict, cache: Dict[object, object]):
    """Every metric the table declares: perplexities directly, accuracies through lm-eval.

    `cache` keeps evaluation token streams across the rows of one run.
    """
    metrics: Dict[str, float] = {}
    tasks = []
    batch_size = config.get("batch_size", 1)
    for key, metric in table.metrics.items():
        spec = metric.spec
        if metric.kind == "structure":
            metrics[key] = structure_value(model, spec["field"])
        elif metric.kind == "perplexity":
            # bos: every_window = Shortened LLaMA's ppl_bos (stream without BOS, one before each window).
            every_window = spec.get("bos") == "every_window"
            cache_key = ("eval", spec["data"], every_window)
            if cache_key not in cache:
                cache[cache_key] = data.eval_tokens(spec["data"], tokenizer=tokenizer,
                                                    add_special_tokens=not every_window)
            tokens = cache[cache_key]
            seqlen = int(spec["seqlen"])
            if "max_windows" in spec:  # smoke: a fixed prefix of the stream keeps CPU runs short
                tokens = tokens[:, : int(spec["max_windows"]) * seqlen]
            if spec["protocol"] == "rows":
                metrics[key] = scoring.perplexity(model, tokens.reshape(-1, seqlen), "rows")
            else:
                bos = tokenizer.bos_token_id if every_window else None
                metrics[key] = scoring.perplexity(model, tokens, "windows", seqlen=seqlen, bos_per_window=bos,
                                                  batch_size=batch_size)
        else:
            tasks.append((key, scoring.TaskSpec(name=spec["task"], num_fewshot=int(spec["shots"]),
                                                metric=spec["metric"])))
    harness = None
    if tasks:
        scores = scoring.run_tasks(model, tokenizer, [t for _, t in tasks],
                                   batch_size=batch_size,
                                   limit=config.get("limit"))
        harness = scores.pop("harness")
        for key, task in tasks:
            metrics[key] = 100.0 * scoring.cell_value(scores, task)
        harness["tasks"] = {k: {f: v for f, v in e.items() if f != "metrics"} for k, e in scores.items()}
    return metrics, harness


def structure_value(model, field: str) -> float:
    """A shape or parameter count of the (pruned) model, as a table's `structure` metric reads it."""
    if field.startswith("nm_"):
        zeros, group = (int(x) for x in field[3:].split("of"))
        return nm_fraction(model, zeros, group)
    if field == "parameters":
        return float(surgery.count_parameters(model))
    if field == "non_embedding_parameters":
        embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None for p in m.parameters()}
        return float(sum(p.numel() for p in model.parameters() if id(p) not in embeddings))
    widths = surgery.layer_widths(model)
    per_layer = {"intermediate_size": "intermediate", "num_attention_heads": "heads",
                 "num_key_value_heads": "kv_heads"}
    if field in per_layer:  # the mean over layers: equal to the config value when widths are uniform
        return sum(w[per_layer[field]] for w in widths) / len(widths)
    if field == "num_hidden_layers":
        return float(len(widths))
    return float(model.get_input_embeddings().weight.shape[1])  # hidden_size


def nm_fraction(model, zeros: int, group: int) -> float:
    """The fraction of groups of `group` consecutive input weights, over every row of every decoder
    projection, that hold at least `zeros` zeros (1.0: the N:M pattern is intact everywhere)."""
    import torch

    kept = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and name.endswith("_proj"):
            weight = module.weight.detach()
            if weight.shape[1] % group:
                raise ValueError(f"{name}: input width {weight.shape[1]} is not a multiple of {group}")
            counts = (weight.reshape(weight.shape[0], -1, group) == 0).sum(-1)
            kept += int((counts >= zeros).sum())
            total += counts.numel()
    return kept / total
