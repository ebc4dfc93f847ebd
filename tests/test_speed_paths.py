"""The faster paths on the smoke model: batched calibration within the golden bands of the default
path, batched evaluation with the same per-request log-likelihoods and accuracy as batch 1, and a
task index that is never built for the kit's own task."""
from __future__ import annotations

import pytest
import torch

import methods
from methods import scoring
from methods.core.errors import UsageError
from repro import bench, data
from methods.core.models import load_model
from repro.recipe import load_recipe
from tests.conftest import tiny_llama


def _masks(model):
    return {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.fixture(scope="module")
def default_and_batched():
    """Per method, the smoke model pruned on the default path and on the batched one, and perplexities."""
    _, tokenizer = load_model("smoke")
    calib = data.calibration("smoke", tokenizer=tokenizer, nsamples=8, seqlen=128, seed=0)
    evaluation = data.eval_tokens("smoke", tokenizer=tokenizer)[:, : 4 * 256]
    cache = {}

    def run(method):
        if method not in cache:
            masks, ppl = {}, {}
            for batch in (1, "auto"):
                model, _ = load_model("smoke")
                report = methods.prune(model, method, calib, device="cpu", calib_batch=batch, sparsity_ratio=0.5)
                assert report["calib_batch"]["used"] == (1 if batch == 1 else 8)
                masks[batch], ppl[batch] = _masks(model), scoring.perplexity(model, evaluation, "windows", seqlen=256)
            agreement = {n: float((masks[1][n] == masks["auto"][n]).float().mean()) for n in masks[1]}
            cache[method] = agreement, ppl
        return cache[method]
    return run


# The golden tests' bands (tests/test_golden_sparse.py): Wanda >= 99% of every Linear's mask and
# perplexity within 1%; SparseGPT >= 99.9% of the first layer's masks, >= 95% overall, perplexity
# within 2%.
def test_batched_wanda_stays_within_the_golden_bands_on_the_smoke_model(default_and_batched):
    agreement, ppl = default_and_batched("wanda")
    assert min(agreement.values()) >= 0.99, agreement
    assert ppl["auto"] == pytest.approx(ppl[1], rel=0.01)


def test_batched_sparsegpt_keeps_the_first_layer_within_the_golden_band(default_and_batched):
    agreement, _ = default_and_batched("sparsegpt")
    assert min(a for n, a in agreement.items() if ".layers.0." in n) >= 0.999, agreement


# Measured (8 x 128 calibration tokens, 2 CPU cores): layer 0 >= 99.95% equal, then SparseGPT's OBS
# updates amplify the rounding differences layer by layer over the smoke model's 30 layers, to a mean
# of 94.15% (91.5% in the worst Linear; 96.1% at 8 x 256), and perplexity on 4 windows of 256 moves
# from 95.46 to 93.16 (-2.4%). The fixtures' bands were set on a 2-layer model. Kept as the measured
# expected failure, not loosened until it passes.
@pytest.mark.xfail(strict=True, reason="SparseGPT batched vs default on the 30-layer smoke model: 94.15% mean mask "
                                       "agreement (< 95%) and perplexity 93.16 vs 95.46 (-2.4%, band 2%)")
def test_batched_sparsegpt_stays_within_the_golden_bands_on_the_smoke_model(default_and_batched):
    agreement, ppl = default_and_batched("sparsegpt")
    assert sum(agreement.values()) / len(agreement) >= 0.95, agreement
    assert ppl["auto"] == pytest.approx(ppl[1], rel=0.02)


def test_evaluation_at_batch_8_scores_every_request_as_batch_1_does():
    result = bench.eval_parity("smoke", batch_size=8, limit=24, windows=4, seqlen=128)
    assert result["requests"] == 24 * 4  # four choices per question
    assert result["max_abs_loglikelihood_difference"] <= 1e-4
    assert result["accuracy"]["1"] == result["accuracy"]["8"]
    assert result["accuracy_norm"]["1"] == result["accuracy_norm"]["8"]
    assert result["perplexity_relative_difference"] <= 1e-5


def test_windowed_perplexity_auto_batch_equals_batch_1():
    model = tiny_llama()
    tokens = torch.randint(0, 128, (1, 10 * 16), generator=torch.Generator().manual_seed(0))
    one = scoring.perplexity(model, tokens, "windows", seqlen=16)
    assert scoring.perplexity(model, tokens, "windows", seqlen=16, batch_size="auto") == pytest.approx(one, rel=1e-6)
    with pytest.raises(UsageError, match="batch_size must be a positive integer or 'auto', got 0"):
        scoring.perplexity(model, tokens, "windows", seqlen=16, batch_size=0)


def test_the_smoke_task_needs_no_lm_eval_index_and_every_caller_gets_its_own_copy():
    include = (str(scoring.SMOKE_TASK_DIR),)
    first, second = scoring.task_index(include, {scoring.SMOKE_TASK}), scoring.task_index(include, {scoring.SMOKE_TASK})
    assert first.all_tasks == second.all_tasks == [scoring.SMOKE_TASK]
    assert first is not second


def test_eval_batch_size_overrides_the_recipe_and_so_the_rows_identity():
    plain = load_recipe("wanda", "paper")
    batched = load_recipe("wanda", "paper", eval_batch_size="auto")
    assert (plain.config["batch_size"], batched.config["batch_size"]) == (1, "auto")
    assert plain.fingerprint("dense", {}) != batched.fingerprint("dense", {})
    assert load_recipe("wanda", "paper", eval_batch_size="1").fingerprint("dense", {}) == plain.fingerprint("dense", {})
    with pytest.raises(UsageError, match="--eval-batch-size must be a positive integer or 'auto', got 'many'"):
        load_recipe("wanda", "paper", eval_batch_size="many")
