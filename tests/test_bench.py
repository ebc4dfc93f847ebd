"""The training-throughput bench (repro/bench.py) on a tiny Llama: well-formed numbers, no timing claims."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from repro import bench_training
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_throughput_reports_consistent_positive_numbers(tmp_path):
    tiny_llama(vocab_size=128, max_position_embeddings=64).save_pretrained(tmp_path / "tiny")
    result = bench_training.training_throughput(str(tmp_path / "tiny"), steps=3, global_batch=2, seqlen=16, device="cpu")
    assert result["tokens"] == 3 * 2 * 16
    assert (result["device"], result["precision"]) == ("cpu", "fp32")
    assert len(result["bare_seconds"]) == 2
    for key in ("engine_tokens_per_second", "engine_step_tokens_per_second", "bare_tokens_per_second",
                "overhead", "overhead_with_checkpoint"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["engine_checkpoint_seconds"] > 0  # the final checkpoint was written and timed
    # The step loop excludes the checkpoint write, so it is never slower than the whole loop.
    assert result["engine_step_tokens_per_second"] >= result["engine_tokens_per_second"]
    assert result["bare_tokens_per_second"] == pytest.approx(result["tokens"] / statistics.mean(result["bare_seconds"]))
    assert result["overhead"] == pytest.approx(result["bare_tokens_per_second"] / result["engine_step_tokens_per_second"])
    assert result["meets_target"] == (result["overhead"] <= result["target_overhead"])


def test_flops_per_token_counts_every_matmul_and_the_attention_square():
    model = tiny_llama(num_kv_heads=2, vocab_size=128)  # hidden 32, mlp 64, 3 layers, 4 heads of 8
    head, kv = 8, 2 * 8
    per_layer = 32 * 4 * head + 2 * 32 * kv + 4 * head * 32 + 3 * 32 * 64
    expected = 6 * (3 * per_layer + 128 * 32) + 12 * 3 * 4 * head * 16
    assert bench_training.matmul_flops_per_token(model, 16) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the MFU bench really runs")
def test_mfu_is_reported_unmeasured_without_cuda():
    result = bench_training.training_mfu()
    assert result["measured"] is False and result["bench"] == "train_mfu"
