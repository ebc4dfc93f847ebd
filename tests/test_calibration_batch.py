"""The calibration engine's batched path (`--calib-batch`): the same layer inputs in chunks, refused
where a method's statistics are not sums over samples, and part of a pruned checkpoint's identity.
Runs under both transformers versions (make test-tf443): the batch-1 arguments the engine records
must broadcast over a chunk in each."""
from __future__ import annotations

import pytest
import torch

import methods
from methods.calibration import calibration_batch, sequential_layers
from methods.core.errors import UsageError
from tests.conftest import lpc, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_inputs(model, calib, batch):
    seen = []

    def record(index, layer, inputs):
        seen.append(inputs.hidden.clone())

    with calibration_batch(batch) as batching:
        sequential_layers(model, calib, torch.device("cpu"), record)
    return seen, batching.used


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_chunks_feed_every_layer_the_inputs_one_sample_at_a_time_gives(kv_heads):
    model = tiny_llama(num_kv_heads=kv_heads)
    calib = torch.randint(0, 128, (7, 16), generator=torch.Generator().manual_seed(0))
    alone, used_alone = _layer_inputs(model, calib, 1)
    chunked, used = _layer_inputs(model, calib, 3)  # 3 + 3 + 1: the last chunk is short
    assert (used_alone, used) == (1, 3)
    assert len(alone) == len(chunked) == 3
    for one, many in zip(alone, chunked):
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_auto_uses_every_sample_when_memory_allows_and_the_report_says_so():
    model = tiny_llama()
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    report = methods.prune(model, "wanda", calib, device="cpu", calib_batch="auto", sparsity_ratio=0.5)
    assert report["calib_batch"] == {"requested": "auto", "used": 6}
    assert report["overall_sparsity"] == pytest.approx(0.5)


def test_default_and_batched_wanda_agree_on_a_tiny_model():
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    masks = []
    for batch in (1, 8):
        model = tiny_llama(seed=3)
        methods.prune(model, "wanda", calib, device="cpu", calib_batch=batch, sparsity_ratio=0.5)
        masks.append(torch.cat([(m.weight == 0).flatten() for n, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear) and ".layers." in n]))
    assert (masks[0] == masks[1]).float().mean() >= 0.99


def test_flap_refuses_a_calibration_batch():
    calib = torch.randint(0, 128, (4, 16))
    with pytest.raises(UsageError, match="one sample at a time; a calibration batch applies to wanda, sparsegpt, wanda-sp"):
        methods.prune(tiny_llama(), "flap", calib, device="cpu", calib_batch=2, pruning_ratio=0.2)


@pytest.mark.parametrize("value", [0, -1, "x", True, 2.5, "3.0"])
def test_bad_calibration_batches_are_one_usage_error(value):
    with pytest.raises(UsageError, match="calibration batch must be a positive integer or 'auto'"):
        methods.prune(tiny_llama(), "wanda", torch.randint(0, 128, (2, 8)), device="cpu", calib_batch=value,
                      sparsity_ratio=0.5)


def test_a_batched_prune_is_another_checkpoint_but_batch_1_keeps_old_fingerprints(tmp_path):
    from repro.prune_stage import prune_fingerprint
    from repro.requests import PruneRequest

    tiny_llama().save_pretrained(tmp_path / "tiny")
    base = dict(model=str(tmp_path / "tiny"), method="wanda", out=tmp_path / "out",
                options={"sparsity_ratio": 0.5}, calib="smoke", nsamples=4, seqlen=16)
    plain = PruneRequest(**base)
    assert "batch" not in plain.identity(True)["calibration"]
    assert prune_fingerprint(PruneRequest(**base, calib_batch=1)) == prune_fingerprint(plain)
    assert prune_fingerprint(PruneRequest(**base, calib_batch=4)) != prune_fingerprint(plain)
    assert prune_fingerprint(PruneRequest(**base, calib_batch="auto")) != prune_fingerprint(plain)


def test_cli_refuses_a_bad_calibration_batch_in_one_line(tmp_path):
    proc = lpc("prune", "--model", "smoke", "--method", "wanda", "--calib", "smoke", "--calib-batch", "0",
               "--option", "sparsity_ratio=0.5",
               "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["lpc: error: calibration batch must be a positive integer or 'auto', got '0'"]


def test_linears_fed_one_input_share_one_statistic_with_the_same_numbers():
    from methods.anatomy import linear_layers
    from methods.calibration import SharedInputStatistics, gather_inputs
    from methods.sparsity import Hessian

    model = tiny_llama()
    calib = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(4))
    found = {}

    def handle(index, layer, inputs):
        if index:
            return
        linears = linear_layers(layer)
        shared = SharedInputStatistics(linears, lambda m: Hessian(m.in_features, torch.device("cpu")))
        own = {name: Hessian(m.in_features, torch.device("cpu")) for name, m in linears.items()}
        gather_inputs(layer, inputs, {name: (lambda x, a=shared.collectors()[name], b=h.add: (a(x), b(x)))
                                      for name, h in own.items()})
        found.update(owner=shared.owner, same={n: torch.equal(shared[n].value, own[n].value) for n in linears})

    with calibration_batch(2):
        sequential_layers(model, calib, torch.device("cpu"), handle)
    q, gate = "self_attn.q_proj", "mlp.gate_proj"
    assert found["owner"] == {q: q, "self_attn.k_proj": q, "self_attn.v_proj": q, "self_attn.o_proj": "self_attn.o_proj",
                              gate: gate, "mlp.up_proj": gate, "mlp.down_proj": "mlp.down_proj"}
    assert all(found["same"].values()), found["same"]
