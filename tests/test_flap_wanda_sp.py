"""Wanda-sp and FLAP beyond the golden fixtures: grouped-query attention, the budget, options, checkpoints,
bad input, and the smoke profile end to end."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import methods
from methods import surgery, width_stats
from methods.core.errors import UsageError
from repro.cli import main
from methods.core.compat import dtype_kwarg
from methods.core.models import load_model, save_checkpoint
from methods.core.results import read_json
from methods.core.smoke_model import smoke_model_dir
from tests.conftest import golden_path, tiny_llama


def golden_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(golden_path("tiny-llama-mha"), **dtype_kwarg(torch.float32)).eval()


def golden_calib():
    return torch.load(golden_path("calib.pt"), weights_only=True)


def random_calib(vocab: int = 128, nsamples: int = 8, seqlen: int = 16):
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def prunable_parameters(config) -> dict:
    """Per layer: the attention+MLP parameters the methods may remove, one key/value group's, one channel's."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    group = (2 * heads // kv + 2) * head_dim * hidden       # q, o: heads/kv heads; k, v: one head
    channel = 3 * hidden
    return {"layer": kv * group + config.intermediate_size * channel, "group": group, "channel": channel,
            "layers": config.num_hidden_layers, "hidden": hidden}


def assert_budget(parameters: dict, config, ratio: float, added_biases: bool) -> None:
    """Removed parameters are the requested fraction of the prunable ones, up to one group and one
    channel per layer (uniform selection floors int(ratio * n); AL-AM lands on the closest unit)."""
    sizes = prunable_parameters(config)
    removed = parameters["dense"] - parameters["pruned"]
    if added_biases:
        removed += 2 * sizes["hidden"] * sizes["layers"]
    target = ratio * sizes["layer"] * sizes["layers"]
    assert abs(removed - target) <= sizes["layers"] * (sizes["group"] + sizes["channel"]), (removed, target)


# ----------------------------------------------------------------------------- grouped-query attention

@pytest.mark.parametrize("method,options", [
    ("wanda-sp", {}),
    ("wanda-sp", {"score": "magnitude"}),
    ("flap", {"structure": "UL-UM"}),
    ("flap", {"structure": "UL-UM", "metrics": "IFV"}),
    ("flap", {"structure": "UL-UM", "metrics": "WIFN"}),
])
def test_uniform_selection_removes_whole_kv_groups(method, options):
    model = tiny_llama(num_kv_heads=2)
    config = copy.deepcopy(model.config)  # pruning re-syncs model.config
    dense = [surgery.attention_shape(layer) for layer in model.model.layers]
    report = methods.prune(model, method, random_calib(), device="cpu", pruning_ratio=0.5, **options)
    for layer, kept, width in zip(model.model.layers, report["layers"], report["widths"]):
        # int(0.5 * 2) = 1 group of 2 query heads and int(0.5 * 64) = 32 channels per layer (ties aside).
        assert len(kept["kv_heads_kept"]) == 1 and width["kv_heads"] == 1 and width["heads"] == 2
        assert kept["heads_kept"] == [2 * kept["kv_heads_kept"][0], 2 * kept["kv_heads_kept"][0] + 1]
        assert len(kept["mlp_channels_kept"]) == 32 == layer.mlp.gate_proj.out_features
        assert surgery.kv_group_of(layer) == [0, 0]
    assert dense[0] == (4, 2, 8)
    assert len(report["scores"]["heads"][0]) == 2 and len(report["scores"]["mlp_channels"][0]) == 64
    flap = method == "flap"
    assert all((layer.self_attn.o_proj.bias is not None) == flap for layer in model.model.layers)
    assert_budget(report["parameters"], config, 0.5, added_biases=flap)
    logits(model, random_calib()[:2])  # the pruned model still runs


def test_uniform_rule_keeps_ties_at_the_threshold():
    # int(0.5 * 4) = 2: the threshold is the third smallest score and everything >= it stays.
    assert width_stats.uniform_keep(torch.tensor([3.0, 0.5, 1.0, 2.0]), 0.5).tolist() == [True, False, False, True]
    # The second smallest ties with the threshold, so only one unit goes, as in the original.
    assert width_stats.uniform_keep(torch.tensor([3.0, 1.0, 2.0, 2.0]), 0.5).tolist() == [True, False, True, True]


def test_flap_group_score_is_the_mean_of_its_channels_and_weight_follows_group_size():
    model = tiny_llama(num_kv_heads=2)
    options = methods.make_options(methods.get("flap"), {"pruning_ratio": 0.2})
    layer = model.model.layers[0]
    # 2 query heads + 1 key + 1 value head of 8 dims over an MLP channel's 3 * 32: (2*2+2)*8/3 = 16.
    assert flap_module().unit_weight(layer, options) == 16.0
    metric = torch.arange(32, dtype=torch.float32)
    assert width_stats.per_group(metric, layer).mean(dim=1).tolist() == [7.5, 23.5]
    mha = tiny_llama(num_kv_heads=4).model.layers[0]   # 4*8/3 = 10.67, truncated as the original's int64
    assert flap_module().unit_weight(mha, options) == 10.0
    exact = methods.make_options(methods.get("flap"), {"pruning_ratio": 0.2, "exact_head_weight": True})
    assert flap_module().unit_weight(mha, exact) == pytest.approx(32 / 3)
    literal = methods.make_options(methods.get("flap"), {"pruning_ratio": 0.2, "head_weight": "literal"})
    assert flap_module().unit_weight(mha, literal) == 170.0


def flap_module():
    from methods import flap

    return flap


# ----------------------------------------------------------------------------- FLAP's global selection

def brute_force_threshold(report, ratio: float) -> float:
    """AL-AM restated in plain Python: sort every unit's score descending with its cost and return the
    score where the running cost is closest to total * (1 - ratio) (first such position)."""
    units = []
    for scores, weight in zip(report["scores"]["heads"], report["attention_unit_weights"]):
        units += [(s, weight) for s in scores]
    for scores in report["scores"]["mlp_channels"]:
        units += [(s, 1.0) for s in scores]
    units.sort(key=lambda u: -u[0])
    total = sum(w for _, w in units)
    running, best, best_gap = 0.0, None, None
    for score, weight in units:
        running += weight
        gap = abs(running - total * (1 - ratio))
        if best_gap is None or gap < best_gap - 1e-9:
            best, best_gap = score, gap
    return best


@pytest.mark.parametrize("options", [
    {"metrics": "WIFV"},
    {"metrics": "IFV", "exact_head_weight": True},
    {"metrics": "WIFN", "exact_fluctuation": True},
])
def test_al_am_keeps_exactly_the_units_above_the_budget_threshold(options):
    model = golden_model()
    config = copy.deepcopy(model.config)
    report = methods.prune(model, "flap", golden_calib(), device="cpu", pruning_ratio=0.3, **options)
    weight = 64 / 3 if options.get("exact_head_weight") else 21.0
    assert report["attention_unit_weights"] == [pytest.approx(weight)] * 8
    threshold = report["threshold"]
    assert threshold == pytest.approx(brute_force_threshold(report, 0.3), rel=1e-6)
    for kept, heads, channels in zip(report["layers"], report["scores"]["heads"], report["scores"]["mlp_channels"]):
        assert kept["heads_kept"] == [h for h, s in enumerate(heads) if s > threshold]
        assert kept["mlp_channels_kept"] == [c for c, s in enumerate(channels) if s > threshold]
        # Standardised per layer: mean 0 over the channels (heads average equal-sized blocks of them).
        assert abs(sum(channels) / len(channels)) < 1e-4 and abs(sum(heads) / len(heads)) < 1e-4
    assert len({len(k["mlp_channels_kept"]) for k in report["layers"]}) > 1  # adaptive widths
    assert_budget(report["parameters"], config, 0.3, added_biases=True)


def test_fluctuation_reproduces_the_aliased_running_mean():
    """The original's "old" mean is the updated one: each later sequence adds Σ (x - μ_new)² / (n+1)
    after scaling by (n-1)/n; the first sequence adds nothing. exact_fluctuation uses μ_old."""
    from methods.flap import InputFluctuation

    sequences = [torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    aliased = InputFluctuation(3, torch.device("cpu"), fluctuation=True)
    exact = InputFluctuation(3, torch.device("cpu"), fluctuation=True, exact=True)
    fluc = [0.0] * 3
    total = [0.0] * 3
    for n, seq in enumerate(sequences):
        aliased.add(seq)
        exact.add(seq)
        rows = seq[0].double().tolist()
        for j in range(3):
            total[j] += sum(r[j] for r in rows) / len(rows)
            mean = total[j] / (n + 1)
            if n > 0:
                fluc[j] = fluc[j] * (n - 1) / n + sum((r[j] - mean) ** 2 for r in rows) / (n + 1)
    assert aliased.fluc.tolist() == pytest.approx(fluc, rel=1e-5)
    assert aliased.baseline.tolist() == pytest.approx([t / 4 for t in total], rel=1e-5, abs=1e-7)
    assert torch.equal(aliased.baseline, exact.baseline)
    assert not torch.allclose(aliased.fluc, exact.fluc)


def test_al_am_refuses_to_empty_a_layer_and_names_it():
    model = golden_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=r"every attention head of layer \d+"):
        methods.prune(model, "flap", golden_calib(), device="cpu", pruning_ratio=0.8, head_weight="literal")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any cut


def test_no_bias_compensation_adds_no_biases(tmp_path):
    out = tmp_path / "flap"
    code = main(["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "flap", "--pruning-ratio", "0.2",
                 "--no-bias-compensation", "--calib", str(golden_path("calib.pt")), "--out", str(out)])
    assert code == 0
    assert read_json(out / "prune.json")["options"]["bias_compensation"] is False
    model, _ = load_model(str(out), load_tokenizer=False)
    assert all(layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None
               for layer in model.model.layers)
    assert len({w["intermediate"] for w in read_json(out / "prune.json")["widths"]}) > 1


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("method,options", [("flap", {}), ("wanda-sp", {})])
def test_pruned_checkpoint_reloads_with_identical_logits(tmp_path, method, options):
    ids = torch.load(golden_path("eval.pt"), weights_only=True)[:2]
    model = golden_model()
    methods.prune(model, method, golden_calib(), device="cpu", pruning_ratio=0.5, **options)
    expected = logits(model, ids)
    save_checkpoint(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    if method == "flap":  # adaptive widths and compensation biases need the per-layer format
        assert config["model_type"] == "lpc_llama" and config["o_proj_bias"] and config["down_proj_bias"]
        assert len(set(config["layer_intermediate_size"])) > 1
    ours, _ = load_model(str(tmp_path / "ckpt"), load_tokenizer=False)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    assert torch.equal(logits(ours, ids), expected)
    assert torch.equal(logits(remote, ids), expected)

    if method != "flap":
        return
    # The CLI prunes the same way: its checkpoint gives the same logits too.
    out = tmp_path / "cli"
    argv = ["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", method, "--pruning-ratio", "0.5",
            "--calib", str(golden_path("calib.pt")), "--out", str(out)]
    assert main(argv) == 0
    cli_model, _ = load_model(str(out), load_tokenizer=False)
    assert torch.equal(logits(cli_model, ids), expected)
    assert read_json(out / "prune.json")["layers"][0].keys() >= {"heads_kept", "kv_heads_kept", "mlp_channels_kept"}


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,message", [
    (["--method", "flap", "--pruning-ratio", "0"], "method 'flap': option pruning_ratio must be > 0, got 0"),
    (["--method", "flap", "--pruning-ratio", "1"], "method 'flap': option pruning_ratio must be < 1, got 1"),
    (["--method", "wanda-sp", "--pruning-ratio", "1.5"], "method 'wanda-sp': option pruning_ratio must be < 1, got 1.5"),
    (["--method", "wanda-sp", "--pruning-ratio", "true"], "option pruning_ratio must be a number, got True"),
    (["--method", "wanda-sp"], "method 'wanda-sp': option pruning_ratio is required"),
    (["--method", "flap", "--pruning-ratio", "0.2", "--metrics", "WANDA"],
     "option metrics must be 'WIFV', 'IFV' or 'WIFN', got 'WANDA'"),
    (["--method", "flap", "--pruning-ratio", "0.2", "--structure", "AL-MM"], "option structure must be"),
    (["--method", "wanda-sp", "--pruning-ratio", "0.2", "--score", "taylor"],
     "option score must be 'wanda' or 'magnitude', got 'taylor'"),
    (["--method", "flap", "--pruning-ratio", "0.2", "--option", "head_weight=huge"], "option head_weight must be"),
    (["--method", "flap", "--pruning-ratio", "0.2", "--option", "exact_fluctuation=1"],
     "option exact_fluctuation must be true or false, got 1"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code = main(["prune", "--model", "smoke", *extra, "--calib", "smoke", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lpc: error: ") and message in err, err


def test_flap_fluctuation_needs_two_samples():
    with pytest.raises(UsageError, match="at least 2 calibration samples"):
        methods.prune(golden_model(), "flap", golden_calib()[:1], device="cpu", pruning_ratio=0.2)


# ----------------------------------------------------------------------------- smoke profile

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("lm_eval")  # the smoke metrics need lm-eval (absent from the transformers 4.43 venv)
    smoke_model_dir()  # converts on first use; raises if `make setup` did not install the package
    return tmp_path_factory.mktemp("smoke-results")


def _smoke_row(results, method, row, capsys):
    code = main(["repro", method, "--profile", "smoke", "--rows", f"dense,{row}", "--results-dir", str(results)])
    assert code == 0, capsys.readouterr().out
    result = read_json(results / "smoke" / method / f"{row}.json")
    config = AutoConfig.from_pretrained(smoke_model_dir())
    ratio = result["options"]["pruning_ratio"]
    assert_budget(result["prune"]["parameters"], config, ratio, added_biases=method == "flap")
    return result


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_smoke_r05_matches_its_reference(results, method, capsys):
    result = _smoke_row(results, method, "r0.5", capsys)
    widths = result["prune"]["widths"]
    if method == "wanda-sp":  # int(0.5 * 3) = 1 of 3 groups, int(0.5 * 1536) = 768 channels, every layer
        assert all(w["kv_heads"] == 2 and w["heads"] == 6 and w["intermediate"] == 768 for w in widths)
    else:
        assert len({w["intermediate"] for w in widths}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_smoke_r02_matches_its_reference(results, method, capsys):
    _smoke_row(results, method, "r0.2", capsys)


@pytest.mark.slow
def test_smoke_claims(results, capsys):
    for method in ("wanda-sp", "flap"):
        assert main(["repro", method, "--profile", "smoke", "--results-dir", str(results)]) == 0
    capsys.readouterr()
    assert main(["diff", "flap", "--results-dir", str(results)]) == 0
    assert "PENDING" not in capsys.readouterr().out
