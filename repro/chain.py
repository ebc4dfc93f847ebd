"""The chain check: a result file names its row, so it must come from that row's stages.

`check_chain(recipe, row, model)` reads the manifests behind a checkpoint (its train.json and the
prune.json of the model it trained) and refuses, in one line, a checkpoint that is not the output of
the prune (and train) stages the recipe prescribes for the row: another method, other options or
calibration, another train spec, or a trained checkpoint for an untrained row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from methods.core.errors import UsageError
from methods.core.identity import manifest_chain
from repro.prune_stage import prune_fingerprint
from repro.requests import DENSE
from training.options import TrainOptions


def check_chain(recipe, row: str, model: str) -> Dict[str, dict]:
    """The manifests behind `model`, refused unless they are the stages the recipe prescribes for
    `row`: a result file names its row, so it must come from that row's prune (and train) stages."""
    chain = manifest_chain(model)
    where = f"{recipe.method}/{recipe.profile}/{row}"
    if row == DENSE:
        if chain:
            raise UsageError(f"{model} is the output of a {' and '.join(chain)} stage; row dense evaluates the "
                             "unpruned model itself")
        return chain
    if "prune" not in chain:
        raise UsageError(f"{model} holds no prune.json (nor a train.json of a pruned model): row {where} "
                         "evaluates the checkpoint its prune stage wrote")
    expected = prune_fingerprint(recipe.prune_request(row, out=Path(model)))
    if chain["prune"].get("fingerprint") != expected:
        raise UsageError(f"{model} was not pruned as row {where} prescribes (model, method, options or "
                         "calibration differ); rerun the row's prune stage")
    wanted = recipe.train_options(row, model=chain.get("train", {}).get("options", {}).get("model", model),
                                  out=model)
    if wanted is None and "train" in chain:
        raise UsageError(f"{model} is a trained checkpoint, but row {where} has no train stage")
    if wanted is not None:
        if "train" not in chain:
            raise UsageError(f"{model} holds no train.json: row {where} trains with spec "
                             f"{recipe.rows[row]['train']!r} before it is evaluated")
        done = chain["train"]
        ours = {k: v for k, v in wanted.fingerprint_fields().items() if k != "model"}
        try:  # both read as lpc train reads them: a field at its default counts whether written or not
            theirs = {k: v for k, v in TrainOptions(**done["options"]).fingerprint_fields().items() if k != "model"}
        except ValueError:
            theirs = None
        if ours != theirs or done["inputs"]["model"].get("fingerprint") != expected:
            raise UsageError(f"{model} was not trained as row {where} prescribes (its train.json options or "
                             "input model differ); rerun the row's train stage")
    return chain
