"""The lm-eval backend over MaxText parameters against the kit's HF path (the MaxText venv).

Per-request loglikelihoods within 1e-3 and the same greedy flags as lm-eval's HFLM on the same
Hugging Face checkpoint, rolling perplexity within 1e-4 relative, and one compiled shape per length
bucket rather than one per request.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("maxtext", reason="MaxText runs in .venv-maxtext (make test-maxtext)")

sys.path.insert(0, str(Path(__file__).parent))
from test_maxtext_convert import _save, _smoke_dir, _tiny  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import torch  # noqa: E402

from methods import scoring  # noqa: E402
from repro import eval_stage  # noqa: E402
from methods.core.models import load_model  # noqa: E402
from training.maxtext import convert  # noqa: E402
from training.maxtext.lm import MaxTextLM, bucket  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("Water boils at", " one hundred degrees"),
         ("A cat sat on the", " mat"), ("", "Hello there"), ("Once upon a time, in a land far away, a",
                                                            " king ruled over many quiet villages"),
         ("1, 2, 3,", " 4"), ("The quick brown fox jumps over the lazy", " dog."),
         ("She opened the door and", " saw nothing at all")]
TEXTS = ["It was the best of times, it was the worst of times. " * 6, "Short text."]


def _requests(kind):
    if kind == "loglikelihood":
        return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    return [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(TEXTS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    vocab = 49152  # the smoke tokenizer's
    hf = _save(_tiny(num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True), root / "tiny")
    convert.to_maxtext(hf, root / "mt")
    return hf, root / "mt"


@pytest.fixture(scope="module")
def pair(tiny):
    hf, mt = tiny
    model, tokenizer = load_model(str(hf))
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, add_bos_token=False, max_length=64)
    return reference, MaxTextLM(str(mt), batch_size=4, max_length=64)


def test_loglikelihoods_match_hflm(pair):
    reference, ours = pair
    expected = reference.loglikelihood(_requests("loglikelihood"))
    got = ours.loglikelihood(_requests("loglikelihood"))
    for (ref_lp, ref_greedy), (lp, greedy) in zip(expected, got):
        assert abs(lp - ref_lp) <= 1e-3 and greedy == ref_greedy
    # 8 requests, batch 4: two batches, each padded to its own bucket (16 and 32 tokens)
    assert ours.compiled_shapes == {(4, 16), (4, 32)}


def test_rolling_perplexity_matches_hflm(pair):
    reference, ours = pair
    expected = reference.loglikelihood_rolling(_requests("rolling"))
    got = ours.loglikelihood_rolling(_requests("rolling"))
    for ref, value in zip(expected, got):
        assert abs(value - ref) <= 1e-4 * abs(ref)


def test_buckets_are_powers_of_two_within_the_limit():
    assert [bucket(n, 64) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 64]


def test_eval_backend_scores_as_the_hf_path(tiny):
    """lpc eval --backend maxtext: the kit's perplexity and lm-eval runs on the MaxText model agree with
    the same calls on the Hugging Face model."""
    hf, mt = tiny
    model, tokenizer = load_model(str(hf))
    ours, our_tokenizer = eval_stage.EVAL_BACKENDS["maxtext"](str(mt), dtype="float32")
    stream = torch.as_tensor([tokenizer.encode(TEXTS[0] * 2)])
    expected = scoring.perplexity(model, stream, "windows", seqlen=32)
    assert abs(scoring.perplexity(ours, stream, "windows", seqlen=32) - expected) <= 1e-4 * expected
    reference = scoring.run_tasks(model, tokenizer, ["lpc_smoke_mc"], batch_size=4, limit=8)
    got = scoring.run_tasks(ours, our_tokenizer, ["lpc_smoke_mc"], batch_size=4, limit=8)
    assert got["lpc_smoke_mc"]["metrics"] == reference["lpc_smoke_mc"]["metrics"]


def test_bench_compares_the_two_paths_on_the_same_requests(tiny, capsys):
    """`make bench`'s MaxText part: both paths score the same requests alike, and the batched one
    compiles fewer shapes; its seconds are what the bench reports, not asserted here."""
    from repro import bench_training

    _, mt = tiny
    result = bench_training.maxtext_eval(str(mt), requests=12, batch_size=4, max_length=128)
    assert result["max_loglikelihood_difference"] <= 1e-3
    one, batched = result["one_at_a_time"], result["batched_buckets"]
    assert batched["compiled_shapes"] < one["compiled_shapes"]
    assert result["speedup"] == pytest.approx(one["seconds"] / batched["seconds"])
    bench_training.print_maxtext_eval(result)
    assert "speed-up" in capsys.readouterr().out
