"""Shortened LLaMA (methods/shortened.py) against the original's rules, restated by brute force.

There are no golden outputs of the original for this method, so every score is recomputed here the
slow, obvious way: the PPL criterion by deleting the block from a deep copy (surgery.remove_layers)
and measuring perplexity with methods.scoring; the Taylor criterion with torch.autograd.grad on a copy
and an explicit sum over the block's weights. The "+" filter is checked on the block orders the
original committed (output_block_sensitivity/*/block_order.csv).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import methods
from methods import shortened, surgery
from methods.scoring import perplexity
from repro.cli import main
from methods.core.compat import dtype_kwarg
from methods.core.models import load_model
from tests.conftest import golden_path, tiny_llama

# Nota-NetsPresso/shortened-llm @ 4031a92, output_block_sensitivity/<model>/<criterion>_n10/block_order.csv
# (complete orders, least important first), with the blocks removed at k=6 after "+" (the same repository's block_prune.py filter).
COMMITTED = {
    ("llama-1-7b", "ppl"): ([24, 26, 25, 10, 27, 13, 22, 14, 9, 29, 12, 15, 8, 21, 7, 28, 6, 16, 18, 23, 5, 20, 11,
                             19, 17, 3, 4, 30, 1, 31, 2, 0], {24, 26, 25, 10, 27, 13}),
    ("llama-1-7b", "taylor"): ([0, 27, 24, 26, 25, 29, 28, 23, 22, 21, 30, 20, 19, 18, 17, 15, 14, 13, 16, 31, 1,
                                12, 11, 10, 9, 8, 7, 6, 5, 3, 2, 4], {27, 24, 26, 25, 29, 28}),
    ("Llama-2-7b-hf", "ppl"): ([11, 8, 24, 21, 12, 7, 9, 10, 18, 27, 14, 23, 25, 15, 20, 26, 17, 6, 13, 28, 22, 19,
                                5, 29, 4, 16, 30, 3, 2, 31, 1, 0], {11, 8, 24, 21, 12, 7}),
    ("Llama-2-7b-hf", "taylor"): ([0, 28, 27, 25, 29, 26, 24, 23, 21, 22, 30, 20, 19, 18, 17, 14, 16, 13, 12, 15,
                                   31, 11, 10, 1, 9, 8, 7, 6, 5, 2, 4, 3], {28, 27, 25, 29, 26, 24}),
    ("Meta-Llama-3-8B", "ppl"): ([8, 23, 9, 11, 10, 25, 26, 12, 22, 19, 24, 14, 7, 21, 3, 15, 18, 4, 28, 13, 16, 20,
                                  17, 27, 6, 5, 29, 2, 30, 31, 1, 0], {8, 23, 9, 11, 10, 25}),
    ("Meta-Llama-3-8B", "taylor"): ([24, 25, 26, 28, 29, 23, 27, 22, 20, 19, 21, 30, 18, 17, 16, 13, 14, 15, 12, 11,
                                     10, 9, 8, 7, 6, 5, 31, 4, 3, 0, 2, 1], {24, 25, 26, 28, 29, 23}),
    ("vicuna-7b-v1.3", "ppl"): ([25, 27, 10, 24, 11, 20, 8, 29, 6, 5, 26, 22, 9, 7, 15, 12, 16, 18, 21, 13, 28, 19,
                                 4, 23, 14, 30, 17, 3, 1, 31, 2, 0], {25, 27, 10, 24, 11, 20}),
    ("vicuna-7b-v1.3", "taylor"): ([0, 27, 26, 24, 25, 29, 28, 23, 30, 21, 22, 31, 20, 19, 18, 17, 1, 15, 14, 16,
                                    13, 12, 11, 10, 9, 8, 7, 6, 3, 2, 5, 4], {27, 26, 24, 25, 29, 28}),
}
VICUNA_13B_PPL = [35, 32, 24, 12, 34, 20, 26, 36, 9, 31, 13, 27, 21, 25, 14, 29, 37, 30, 18, 19, 28, 23, 38, 15, 33,
                  5, 16, 10, 4, 22, 8, 7, 11, 3, 17, 6, 39, 1, 2, 0]


@pytest.fixture(scope="module")
def golden_model():
    return LlamaForCausalLM.from_pretrained(str(golden_path("tiny-llama-mha")), **dtype_kwarg(torch.float32)).eval()


@pytest.fixture(scope="module")
def calib():
    return torch.load(golden_path("calib.pt"))[:4].long()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- the "+" filter

@pytest.mark.parametrize("key", sorted(COMMITTED), ids=lambda k: "-".join(k))
def test_plus_filter_on_the_committed_orders_gives_the_published_removed_sets(key):
    order, removed = COMMITTED[key]
    assert sorted(order) == list(range(32))
    chosen = shortened.blocks_to_remove(order, 6, 32, plus_heuristic=True)
    assert set(chosen) == removed and len(chosen) == 6
    assert not set(chosen) & {0, 1, 2, 3, 30, 31}
    # Removal order is the ranking order, not sorted.
    assert chosen == [b for b in order if b in removed]


def test_plus_changes_no_committed_ppl_selection_but_does_change_taylor():
    """Spec A 10.1: "+" happens not to matter for PPL orders; for Taylor it drops block 0 (LLaMA-1/2)."""
    orders = {k: v[0] for k, v in COMMITTED.items()}
    for (model, criterion), order in orders.items():
        plain = shortened.blocks_to_remove(order, 6, 32, plus_heuristic=False)
        plus = shortened.blocks_to_remove(order, 6, 32, plus_heuristic=True)
        if criterion == "ppl":
            assert plain == plus, model
    for k in (8, 11, 15):  # Vicuna-13B, 40 blocks (21% / 29% / 37%)
        assert (shortened.blocks_to_remove(VICUNA_13B_PPL, k, 40, True)
                == shortened.blocks_to_remove(VICUNA_13B_PPL, k, 40, False))
    assert 0 in shortened.blocks_to_remove(orders[("llama-1-7b", "taylor")], 6, 32, plus_heuristic=False)
    assert 0 in shortened.blocks_to_remove(orders[("Llama-2-7b-hf", "taylor")], 6, 32, plus_heuristic=False)


def test_collection_llama2_taylor_run_reused_llama1_order_and_still_hit_llama2_set():
    """Spec A 10.7: the collection's cached LLaMA-1 Taylor order selects Llama-2's own Taylor+ set."""
    llama1 = shortened.blocks_to_remove(COMMITTED[("llama-1-7b", "taylor")][0], 6, 32, True)
    assert set(llama1) == COMMITTED[("Llama-2-7b-hf", "taylor")][1] == set(range(24, 30))


def test_plus_candidates_of_an_8_layer_model_are_blocks_4_and_5():
    assert shortened.candidates(range(8), 8, True) == [4, 5]
    assert shortened.candidates([7, 5, 0, 4], 8, True) == [5, 4]
    assert shortened.candidates([7, 5, 0, 4], 8, False) == [7, 5, 0, 4]


def test_rank_is_ascending_and_stable():
    assert shortened.rank([3.0, 1.0, 2.0, 1.0]) == [1, 3, 2, 0]
    assert shortened.rank([1.0, float("nan"), 0.5]) == [2, 0, 1]


# ----------------------------------------------------------------------------- PPL criterion

def test_ppl_criterion_is_perplexity_with_the_block_deleted(golden_model, calib):
    calib = calib[:2, :32]
    model = copy.deepcopy(golden_model)
    before = _logits(model, calib[:1])
    scores = shortened.ppl_scores(model, calib)
    # Scoring leaves the model as it was.
    assert len(model.model.layers) == 8 and model.config.num_hidden_layers == 8
    assert torch.equal(_logits(model, calib[:1]), before)
    for block in range(8):
        brute = copy.deepcopy(golden_model)
        surgery.remove_layers(brute, [block])
        assert scores[block] == pytest.approx(perplexity(brute, calib, "rows"), rel=1e-6), block
    assert len(set(scores)) == 8  # every block matters differently to a trained model


def test_ppl_prune_removes_the_lowest_candidates_and_matches_deletion(golden_model, calib):
    model = copy.deepcopy(golden_model)
    report = methods.prune(model, "shortened", calib, device="cpu", criterion="ppl", remove_layers=2,
                           plus_heuristic=False)
    scores = report["scores"]["block"]
    assert report["scores"]["order"] == sorted(range(8), key=lambda b: scores[b])
    assert report["layers_removed"] == report["scores"]["order"][:2]
    assert report["layers_kept"] == [b for b in range(8) if b not in report["layers_removed"]]
    brute = copy.deepcopy(golden_model)
    surgery.remove_layers(brute, report["layers_removed"])
    assert torch.equal(_logits(model, calib), _logits(brute, calib))
    assert model.config.num_hidden_layers == 6
    assert report["parameters"]["pruned"] == surgery.count_parameters(brute)


def test_ppl_criterion_with_plus_only_removes_candidates(golden_model, calib):
    model = copy.deepcopy(golden_model)
    report = methods.prune(model, "shortened", calib, device="cpu", criterion="ppl", remove_layers=1)
    order = report["scores"]["order"]
    assert report["layers_removed"] == [next(b for b in order if b in (4, 5))]


# ----------------------------------------------------------------------------- Taylor criterion

def _brute_taylor(model, calib, power=1, weight_reduction="sum"):
    """sum over the block's "weight" parameters (norms included) of reduce(|w * g|^p) by direct autograd."""
    model = copy.deepcopy(model).float()
    named = [[(n, p) for n, p in layer.named_parameters() if "weight" in n] for layer in model.model.layers]
    flat = [p for block in named for _, p in block]
    loss = model(input_ids=calib, labels=calib, use_cache=False).loss
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat)))
    scores = []
    for block in named:
        total = 0.0
        for _, p in block:
            s = (p.detach() * grads[id(p)]).abs() ** power
            units = s.sum(dim=1) if s.dim() == 2 else s
            total += {"sum": units.sum, "max": units.max, "mean": units.mean}[weight_reduction]().item()
        scores.append(total)
    return scores, named


@pytest.mark.parametrize("power,reduction", [(1, "sum"), (2, "sum"), (1, "max"), (1, "mean")])
def test_taylor_scores_match_autograd_brute_force(golden_model, calib, power, reduction):
    options = shortened.Options(criterion="taylor", remove_layers=1, norm_power=power, weight_reduction=reduction)
    model = copy.deepcopy(golden_model)
    got = shortened.taylor_scores(model, calib, options)
    want, _ = _brute_taylor(golden_model, calib, power, reduction)
    assert got == pytest.approx(want, rel=1e-4)
    # No gradients or flags are left behind.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_taylor_counts_the_rmsnorm_weights_and_no_embedding(golden_model, calib):
    options = shortened.Options(criterion="taylor", remove_layers=1)
    got = shortened.taylor_scores(copy.deepcopy(golden_model), calib, options)
    _, named = _brute_taylor(golden_model, calib)
    names = [n for n, _ in named[0]]
    assert "input_layernorm.weight" in names and "post_attention_layernorm.weight" in names
    assert len(names) == 9 and not any("embed" in n for n in names)
    # Without the norms the sums would be strictly smaller.
    model = copy.deepcopy(golden_model)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.requires_grad_(False)
    loss = model(input_ids=calib, labels=calib, use_cache=False).loss
    loss.backward()
    without_norms = [sum((p.detach() * p.grad).abs().sum().item() for n, p in layer.named_parameters()
                         if "weight" in n and p.grad is not None) for layer in model.model.layers]
    assert all(g > w for g, w in zip(got, without_norms))


def test_taylor_in_fp32_on_a_bf16_model_restores_its_dtypes():
    dense = tiny_llama(num_hidden_layers=8, seed=3)
    low = copy.deepcopy(dense).to(torch.bfloat16)
    buffers = {n: b.clone() for n, b in low.named_buffers()}
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    got = shortened.taylor_scores(low, ids, shortened.Options(criterion="taylor", remove_layers=1))
    # fp32 gradients on the bf16 weights: the same as an fp32 model holding those (exactly widened) weights.
    want, _ = _brute_taylor(copy.deepcopy(low).float(), ids)
    assert got == pytest.approx(want, rel=1e-4)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    for name, buffer in low.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    in_model = shortened.taylor_scores(low, ids, shortened.Options(criterion="taylor", remove_layers=1,
                                                                    grad_dtype="model"))
    assert in_model != got  # bf16 backward is a different (the original's --use_bfloat) computation


def test_taylor_prune_on_a_gqa_model_removes_the_lowest_candidates():
    model = tiny_llama(num_hidden_layers=10, seed=1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    dense = copy.deepcopy(model)
    report = methods.prune(model, "shortened", ids, device="cpu", criterion="taylor", remove_layers=3)
    want, _ = _brute_taylor(dense, ids)
    assert report["scores"]["block"] == pytest.approx(want, rel=1e-4)
    candidates = [b for b in sorted(range(10), key=lambda b: want[b]) if b not in (0, 1, 2, 3, 8, 9)]
    assert report["layers_removed"] == candidates[:3]
    assert model.config.num_hidden_layers == 7 and report["widths"] == [report["widths"][0]] * 7


# ----------------------------------------------------------------------------- checkpoint round trip

def test_prune_cli_checkpoint_reloads_and_generates_with_cache(tmp_path, golden_model, calib):
    calib_file = tmp_path / "calib.pt"
    torch.save(calib, calib_file)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "shortened",
                 "--criterion", "taylor", "--remove-layers", "2", "--calib", str(calib_file),
                 "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["options"]["plus_heuristic"] is True and sorted(report["layers_removed"]) == [4, 5]
    assert report["parameters"]["pruned"] < report["parameters"]["dense"]

    fresh = copy.deepcopy(golden_model)
    methods.prune(fresh, "shortened", calib, device="cpu", criterion="taylor", remove_layers=2)
    ours, _ = load_model(str(out))
    auto = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, **dtype_kwarg(torch.float32))
    ids = torch.load(golden_path("eval.pt"))[:2].long()
    assert ours.config.num_hidden_layers == auto.config.num_hidden_layers == 6
    assert torch.equal(_logits(ours, ids), _logits(fresh, ids))
    assert torch.equal(_logits(auto, ids), _logits(fresh, ids))

    # Generation with the KV cache: the renumbered layers must index their own cache slots.
    prompt = ids[:1, :8]
    with torch.no_grad():
        cached = auto.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        plain = auto.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


# ----------------------------------------------------------------------------- bad input

BAD = [
    (["--criterion", "ppl", "--remove-layers", "8"], "cannot remove 8 of the model's 8 layers"),
    (["--criterion", "ppl", "--remove-layers", "3"], "exceeds the 2 candidate blocks"),
    (["--criterion", "magnitude", "--remove-layers", "1"],
     "method 'shortened': option criterion must be 'ppl' or 'taylor', got 'magnitude'"),
    (["--criterion", "ppl", "--remove-layers", "0"], "method 'shortened': option remove_layers must be >= 1, got 0"),
    (["--criterion", "ppl", "--remove-layers", "1.5"], "option remove_layers must be an integer, got 1.5"),
    (["--remove-layers", "1"], "method 'shortened': option criterion is required"),
    (["--criterion", "taylor", "--remove-layers", "1", "--grad-dtype", "float64"],
     "option grad_dtype must be 'model', 'float32', 'float16' or 'bfloat16', got 'float64'"),
    (["--criterion", "taylor", "--remove-layers", "1", "--option", "block_reduction=median"],
     "option block_reduction must be 'sum', 'mean', 'max' or 'prod', got 'median'"),
    (["--criterion", "taylor", "--remove-layers", "1", "--plus-heuristic", "--option", "norm_power=true"],
     "option norm_power must be an integer, got True"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, calib, extra, message):
    torch.save(calib, tmp_path / "calib.pt")
    argv = ["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "shortened", *extra,
            "--calib", str(tmp_path / "calib.pt"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lpc: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_plus_heuristic_off_allows_all_but_one_layer(tmp_path, calib):
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "out"
    assert main(["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "shortened",
                 "--criterion", "taylor", "--remove-layers", "7", "--option", "plus_heuristic=false",
                 "--calib", str(tmp_path / "calib.pt"), "--out", str(out), "--device", "cpu"]) == 0
    assert len(json.loads((out / "prune.json").read_text())["layers_kept"]) == 1


# ----------------------------------------------------------------------------- smoke profile end to end

@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    pytest.importorskip("lm_eval")  # the smoke table scores a task; .venv-tf443 has no lm-eval
    from methods.core.smoke_model import smoke_model_dir

    smoke_model_dir()
    return tmp_path_factory.mktemp("shortened-smoke")


def test_smoke_taylor_row_matches_its_reference(smoke_results, capsys):
    code = main(["repro", "shortened", "--profile", "smoke", "--rows", "dense,taylor-k6",
                 "--results-dir", str(smoke_results)])
    assert code == 0, capsys.readouterr().out
    result = json.loads((smoke_results / "smoke" / "shortened" / "taylor-k6.json").read_text())
    assert len(result["prune"]["layers_removed"]) == 6 and result["metrics"]["layers"] == 24


@pytest.mark.slow
def test_smoke_every_row_and_claim(smoke_results, capsys):
    code = main(["repro", "shortened", "--profile", "smoke", "--results-dir", str(smoke_results)])
    assert code == 0, capsys.readouterr().out
