"""ShortGPT and Minitron-depth beyond the golden fixtures: GQA models, the version-proof layer hooks,
temporary layer skipping, saved checkpoints, KV-cache generation after layer removal, bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import methods
from methods import depth
from methods.scoring import perplexity
from repro.cli import main
from tests.conftest import tiny_llama

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(rows=4, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, length), generator=generator)


def _gqa(layers=5, seed=0):
    return tiny_llama(num_kv_heads=2, seed=seed, num_hidden_layers=layers)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- hooks and skipping

def test_layer_hooks_see_the_hidden_states_of_every_layer():
    """Inputs/outputs seen by the kwargs-aware hooks are output_hidden_states' entries, for a batch
    of two (indexing [0] on a bare tensor would have dropped the second row)."""
    model = _gqa(layers=3)
    ids = _calib(rows=2)
    seen = {}
    with depth.watch_layers(model, lambda i, x, y: seen.__setitem__(i, (x.clone(), y.clone()))):
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    assert sorted(seen) == [0, 1, 2]
    for index, (hidden_in, hidden_out) in seen.items():
        assert hidden_in.shape == (2, ids.shape[1], 32)
        assert torch.equal(hidden_in, states[index])
        if index + 1 < 3:  # the last entry is the final-normed output
            assert torch.equal(hidden_out, states[index + 1])
    # Ours are gone on exit (transformers 5 adds capture hooks of its own on first use).
    hooks = [h for layer in model.model.layers for h in layer._forward_hooks.values()]
    assert not [h for h in hooks if "watch_layers" in getattr(h, "__qualname__", "")]


def test_skipping_layers_equals_removing_them_and_restores_the_model():
    model = _gqa(layers=5)
    ids = _calib(rows=1)
    dense = _logits(model, ids)
    layers = list(model.model.layers)
    with depth.layers_skipped(model, [1, 2]):
        assert model.config.num_hidden_layers == 3
        skipped = _logits(model, ids)
        # The KV cache of a scoring harness needs contiguous layer indices.
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
        with torch.no_grad():
            cached = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, use_cache=True)
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))
    assert torch.equal(_logits(model, ids), dense)
    removed = _gqa(layers=5)
    methods.surgery.remove_layers(removed, [1, 2])
    assert torch.equal(_logits(removed, ids), skipped)
    with torch.no_grad():
        assert torch.equal(removed.generate(ids[:, :5], max_new_tokens=4, do_sample=False, use_cache=True), cached)


def test_skipping_layers_of_a_per_layer_model_restores_its_config():
    model = _gqa(layers=4)
    methods.surgery.keep_mlp_channels(model.model.layers[2], range(16))
    methods.surgery.sync_config(model)
    ids = _calib(rows=1)
    removed = copy.deepcopy(model)
    methods.surgery.remove_layers(removed, [0, 3])
    with depth.layers_skipped(model, [3, 0]):
        assert model.config.layer_intermediate_size == removed.config.layer_intermediate_size == [64, 16]
        assert torch.equal(_logits(model, ids), _logits(removed, ids))
    assert model.config.layer_intermediate_size == [64, 64, 16, 64] and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(4))


def test_minitron_scorer_is_the_windowed_token_mean():
    model = _gqa(layers=2)
    calib = _calib(rows=3, length=12)
    nll = []
    for row in calib:
        logits = _logits(model, row[None])[0, :-1]
        nll.append(torch.nn.functional.cross_entropy(logits, row[1:]).item())
    assert perplexity(model, calib, "minitron") == pytest.approx(torch.tensor(nll).mean().exp().item(), rel=1e-6)


# ----------------------------------------------------------------------------- the methods on GQA

@pytest.mark.parametrize("variant,metric", [("collection", "bi"), ("unofficial", "bi"), ("unofficial", "angular")])
def test_shortgpt_on_gqa(variant, metric):
    model = _gqa(layers=5)
    calib = _calib()
    report = methods.prune(model, "shortgpt", calib, device="cpu", remove_layers=2, variant=variant, metric=metric)
    scores = report["scores"]["angular" if metric == "angular" else "block_influence"]
    assert len(scores) == 5 and len(report["layers_removed"]) == 2
    assert report["layers_removed_sorted"] == sorted(report["layers_removed"])
    if metric == "bi":  # the two lowest scores went
        assert sorted(scores)[:2] == sorted(scores[i] for i in report["layers_removed"])
    else:  # a contiguous block, its start the lowest of the candidates 0..L-n
        start = report["layers_removed"][0]
        assert report["layers_removed"] == [start, start + 1]
        assert scores[start] == min(scores[:4]) and scores[4] == 0
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert report["parameters"]["pruned"] < report["parameters"]["dense"]
    assert _logits(model, calib[:1]).shape == (1, calib.shape[1], VOCAB)


def test_random_control_is_seeded_and_ignores_the_calibration():
    import random

    reports = []
    for calib_seed in (0, 1):
        model = _gqa(layers=6)
        reports.append(methods.prune(model, "shortgpt", _calib(seed=calib_seed), device="cpu", remove_layers=3,
                                     variant="random", seed=11))
        assert len(model.model.layers) == 3
    assert reports[0]["layers_removed"] == reports[1]["layers_removed"] == random.Random(11).sample(range(6), 3)
    assert reports[0]["scores"] == {}
    other = methods.prune(_gqa(layers=6), "shortgpt", _calib(), device="cpu", remove_layers=3, variant="random", seed=12)
    assert other["layers_removed"] == random.Random(12).sample(range(6), 3)


def test_angular_removes_a_single_layer_where_upstream_crashed():
    model = _gqa(layers=4)
    report = methods.prune(model, "shortgpt", _calib(), device="cpu", remove_layers=1,
                           variant="unofficial", metric="angular")
    scores = report["scores"]["angular"]
    assert report["layers_removed"] == [min(range(4), key=scores.__getitem__)]


@pytest.mark.parametrize("select", ["closest", "best"])
def test_minitron_depth_on_gqa(select):
    model = _gqa(layers=5)
    calib = _calib()
    reference = _gqa(layers=5)
    report = methods.prune(model, "minitron-depth", calib, device="cpu", remove_layers=2, select=select)
    scores = report["scores"]
    assert scores["metric"] == "ppl" and len(scores["candidates"]) == 4
    assert scores["baseline"] == pytest.approx(perplexity(reference, calib, "minitron"), rel=1e-6)
    for start, value in enumerate(scores["candidates"]):  # each candidate is the skipped model's ppl
        with depth.layers_skipped(reference, [start, start + 1]):
            assert value == perplexity(reference, calib, "minitron")
    if select == "closest":
        want = min(range(4), key=lambda i: abs(scores["candidates"][i] - scores["baseline"]))
    else:
        want = min(range(4), key=scores["candidates"].__getitem__)
    assert report["layers_removed"] == [want, want + 1] and report["block_start"] == want
    assert perplexity(model, calib, "minitron") == scores["candidates"][want]


def test_choose_first_on_ties_and_accuracy_direction():
    from methods.minitron_depth import choose

    assert choose([6.0, 3.0, 7.0, 5.0], 4.0, "closest", higher_is_better=False) == 1
    assert choose([0.5, 0.7, 0.7], 0.8, "best", higher_is_better=True) == 1
    assert choose([0.5, 0.7, 0.9], 0.75, "closest", higher_is_better=True) == 1
    assert choose([9.0, 8.0, 8.0], 1.0, "best", higher_is_better=False) == 1


@pytest.mark.slow
def test_minitron_depth_scores_with_an_lm_eval_task():
    """The accuracy scorer on the kit's smoke task: a tiny model with the smoke tokenizer's vocabulary."""
    pytest.importorskip("lm_eval")
    from methods.core.models import load_model

    _, tokenizer = load_model("smoke", load_tokenizer=True)
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=3, vocab_size=len(tokenizer), hidden_size=16,
                       intermediate_size=32, max_position_embeddings=512)
    report = methods.prune(model, "minitron-depth", _calib(), device="cpu", tokenizer=tokenizer,
                           remove_layers=1, score="lpc_smoke_mc", limit=8, select="best", batch_size=8)
    scores = report["scores"]
    assert scores["metric"] == "lpc_smoke_mc" and len(scores["candidates"]) == 3
    assert all(0.0 <= s <= 1.0 for s in [scores["baseline"], *scores["candidates"]])
    assert report["layers_removed"] == [max(range(3), key=scores["candidates"].__getitem__)]


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture()
def saved_gqa(tmp_path):
    model = _gqa(layers=5, seed=3)
    model.save_pretrained(tmp_path / "dense", safe_serialization=True)
    torch.save(_calib(rows=4, length=16, seed=1), tmp_path / "calib.pt")
    return tmp_path


@pytest.mark.parametrize("method,options", [
    ("shortgpt", ["--remove-layers", "2"]),
    ("minitron-depth", ["--remove-layers", "2", "--select", "best"]),
])
def test_prune_save_reload_and_generate_with_a_cache(saved_gqa, method, options, capsys):
    from transformers import AutoModelForCausalLM

    from methods.core.models import load_model

    out = saved_gqa / "pruned"
    code = main(["prune", "--model", str(saved_gqa / "dense"), "--method", method, *options,
                 "--calib", str(saved_gqa / "calib.pt"), "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    in_memory = _gqa(layers=5, seed=3)
    report = methods.prune(in_memory, method, torch.load(saved_gqa / "calib.pt"), device="cpu",
                           remove_layers=2, **({"select": "best"} if method == "minitron-depth" else {}))
    ids = _calib(rows=1, length=12, seed=7)
    want = _logits(in_memory, ids)
    reloaded, _ = load_model(str(out))
    remote = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    for model in (reloaded, remote):
        assert model.config.num_hidden_layers == 3
        assert torch.equal(_logits(model, ids), want)

    assert json.loads((out / "prune.json").read_text())["layers_removed"] == report["layers_removed"]
    for model in (in_memory, reloaded):
        with torch.no_grad():
            cached = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, use_cache=True)
            uncached = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- bad input

def _usage_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("method", ["shortgpt", "minitron-depth"])
@pytest.mark.parametrize("count", ["5", "6"])
def test_removing_every_layer_or_more_is_one_line(saved_gqa, capsys, method, count):
    err = _usage_error(capsys, ["prune", "--model", str(saved_gqa / "dense"), "--method", method,
                                "--remove-layers", count, "--calib", str(saved_gqa / "calib.pt"),
                                "--out", str(saved_gqa / "out")])
    assert f"cannot remove {count} of the model's 5 layers" in err
    assert not (saved_gqa / "out").exists()


def test_an_unknown_scan_task_is_one_line_before_any_loading(tmp_path, capsys):
    err = _usage_error(capsys, ["prune", "--model", str(tmp_path / "never-loaded"), "--method", "minitron-depth",
                                "--remove-layers", "1", "--score", "no_such_task_xyz", "--calib", "c4",
                                "--out", str(tmp_path / "out")])
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert "needs lm-eval" in err
    else:
        assert "unknown scoring task 'no_such_task_xyz'" in err


@pytest.mark.parametrize("options,message", [
    ({"remove_layers": 0}, "method 'shortgpt': option remove_layers must be >= 1, got 0"),
    ({"remove_layers": True}, "method 'shortgpt': option remove_layers must be an integer, got True"),
    ({"remove_layers": 1, "variant": "official"},
     "method 'shortgpt': option variant must be 'collection', 'unofficial' or 'random', got 'official'"),
    ({"remove_layers": 1, "seed": "0"}, "option seed must be an integer, got '0'"),
    ({"remove_layers": 1, "metric": "angular"}, "method 'shortgpt': metric 'angular' exists only in the unofficial"),
])
def test_shortgpt_options(options, message):
    from methods.core.errors import UsageError

    with pytest.raises(UsageError, match=message):
        methods.make_options(methods.get("shortgpt"), options)


def test_minitron_depth_options():
    from methods.core.errors import UsageError

    make = lambda **o: methods.make_options(methods.get("minitron-depth"), o)  # noqa: E731
    with pytest.raises(UsageError, match="option select must be 'closest' or 'best', got 'worst'"):
        make(remove_layers=1, select="worst")
    with pytest.raises(UsageError, match="num_fewshot and limit apply to a task scorer"):
        make(remove_layers=1, num_fewshot=5)
    with pytest.raises(UsageError, match="option num_fewshot must be >= 0, got -1"):
        make(remove_layers=1, num_fewshot=-1)
    with pytest.raises(UsageError, match="option limit must be >= 1, got 0"):
        make(remove_layers=1, limit=0)
    with pytest.raises(UsageError, match="option batch_size must be an integer, got 2.0"):
        make(remove_layers=1, batch_size=2.0)
    with pytest.raises(UsageError, match="option score must not be empty, got ''"):
        make(remove_layers=1, score="")
    with pytest.raises(UsageError, match="^method 'minitron-depth': option remove_layers is required"):
        make(score="ppl")


def test_a_task_scorer_needs_the_tokenizer():
    pytest.importorskip("lm_eval")
    from methods.core.errors import UsageError

    with pytest.raises(UsageError, match="needs the model's tokenizer"):
        methods.prune(_gqa(layers=3), "minitron-depth", _calib(), device="cpu", remove_layers=1,
                      score="lpc_smoke_mc")
