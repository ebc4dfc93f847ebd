"""LLM-Pruner in the kit: options, GQA groups, channel mode, parameter arithmetic, checkpoints, CLI."""
from __future__ import annotations

import re

import pytest
import torch

import methods
from methods import surgery
from methods.core.errors import UsageError
from methods.llm_pruner import IMPORTANCE, Options
from repro.cli import main
from tests.conftest import tiny_llama


def _calib(vocab=128, rows=4, seqlen=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seqlen), generator=generator)


def _removed(n: int, ratio: float) -> int:
    return n - int(n * (1 - ratio))   # the original's per-group count (MetaPruner.prune_local)


# ----------------------------------------------------------------------------- options

def test_options_validate_without_a_model():
    make = lambda **o: methods.make_options(methods.get("llm-pruner"), o)  # noqa: E731
    assert make(pruning_ratio=0.25).layer_range() == (4, 30)
    assert make(pruning_ratio=0.25, layers=" 2 : 6 ").layer_range() == (2, 6)
    for bad, match in [({"pruning_ratio": 1.0}, "option pruning_ratio must be < 1, got 1.0"),
                       ({"pruning_ratio": True}, "option pruning_ratio must be a number, got True"),
                       ({"pruning_ratio": 0.2, "importance": "taylor"},
                        "option importance must be 'element1', .* or 'random', got 'taylor'"),
                       ({"pruning_ratio": 0.2, "mode": "width"}, "option mode must be 'block' or 'channel', got 'width'"),
                       ({"pruning_ratio": 0.2, "grad_dtype": "fp16"}, "option grad_dtype must be .*, got 'fp16'"),
                       ({"pruning_ratio": 0.2, "gqa_importance": "mean"}, "option gqa_importance must be"),
                       ({"pruning_ratio": 0.2, "layers": "5:5"}, "layers '5:5' is an empty range"),
                       # YAML's reading of an unquoted 4:28
                       ({"pruning_ratio": 0.2, "layers": 268}, "option layers must be a string, got 268 .START:END"),
                       ({"pruning_ratio": 0.2, "layers": "4-28"}, "layers must be 'START:END'"),
                       ({"pruning_ratio": 0.2, "mode": "channel", "layers": "0:2"}, "layers applies to block mode only")]:
        with pytest.raises(UsageError, match="^method 'llm-pruner': " + match):
            make(**bad)


def test_importance_choices_are_the_implemented_criteria():
    from methods.options import choices, declared

    assert choices(declared(Options)["importance"]) == list(IMPORTANCE)


# ----------------------------------------------------------------------------- block mode

@pytest.mark.parametrize("kv_heads", [4, 2])
def test_parameter_count_is_the_arithmetic_of_the_groups(kv_heads):
    model = tiny_llama(num_kv_heads=kv_heads, num_hidden_layers=4, intermediate_size=64)
    dense = surgery.count_parameters(model)
    ratio, hidden, dim = 0.5, 32, 8
    report = methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=ratio,
                           importance="element1", layers="1:3")
    groups = 4 // kv_heads
    kv_removed = _removed(kv_heads * dim, ratio) // dim          # whole key/value groups
    q_removed = kv_removed * groups                               # with their query heads
    mlp_removed = _removed(64, ratio)
    per_layer = (q_removed * dim * hidden * 2 + kv_removed * dim * hidden * 2 + mlp_removed * hidden * 3)
    assert dense - report["parameters"]["pruned"] == 2 * per_layer
    widths = [(len(l["heads_kept"]), len(l["kv_heads_kept"]), len(l["mlp_channels_kept"])) for l in report["layers"]]
    assert widths == [(4, kv_heads, 64)] + [(4 - q_removed, kv_heads - kv_removed, 64 - mlp_removed)] * 2 + \
        [(4, kv_heads, 64)]
    assert sorted(report["scores"]["heads"]) == ["1", "2"] and len(report["scores"]["mlp_channels"]["1"]) == 64


def test_gqa_removes_whole_key_value_groups_with_their_query_heads():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=3)   # 4 query heads over 2 groups of 8 channels
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=0.5,
                           importance="element1", layers="0:3")
    assert report["head_unit"] == "key/value group"
    for index, entry in enumerate(report["layers"]):
        (kv,) = entry["kv_heads_kept"]
        assert entry["heads_kept"] == [2 * kv, 2 * kv + 1]          # repeat_kv: kv head h <-> query heads 2h, 2h+1
        scores = report["scores"]["heads"][str(index)]
        assert kv == max(range(2), key=lambda h: scores[h])        # the higher-scoring group survives
        q = model.model.layers[index].self_attn.q_proj.weight
        want = dense[f"model.layers.{index}.self_attn.q_proj.weight"][16 * kv:16 * kv + 16]
        assert torch.equal(q, want)
    model(_calib())  # still a working model


def test_gqa_query_scores_fold_as_the_original_or_by_group():
    """l2 needs no data: make query head 1 dominate. Grouped association credits it to kv group 0
    (heads 0, 1); the original's strided fold credits kv group 1 (heads 1, 3)."""
    def model_with_loud_query_head():
        model = tiny_llama(num_kv_heads=2, num_hidden_layers=1)
        attn = model.model.layers[0].self_attn
        with torch.no_grad():
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                linear.weight.fill_(0.01)
            attn.q_proj.weight[8:16] = 10.0
        return model

    kept = {}
    for how in ("strided", "grouped"):
        report = methods.prune(model_with_loud_query_head(), "llm-pruner", _calib(), device="cpu",
                               pruning_ratio=0.5, importance="l2", layers="0:1", gqa_importance=how)
        kept[how] = report["layers"][0]["kv_heads_kept"]
    assert kept == {"strided": [1], "grouped": [0]}


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16", "model"])
def test_grad_dtype_leaves_the_model_as_it_was(grad_dtype):
    model = tiny_llama(num_kv_heads=4, num_hidden_layers=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # Only the layers outside the pruned range keep their shapes: they must also keep every bit.
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.1." in n or "layers" not in n}
    methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=0.5, importance="element2",
                  layers="0:1", grad_dtype=grad_dtype)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in untouched.items())


def test_random_importance_follows_the_torch_seed():
    def kept(seed):
        model = tiny_llama(num_kv_heads=4, num_hidden_layers=3, intermediate_size=64)
        torch.manual_seed(seed)
        return methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=0.5,
                             importance="random", layers="0:3")["layers"]

    assert kept(42) == kept(42)
    assert kept(42) != kept(7)


# ----------------------------------------------------------------------------- channel mode

def test_channel_mode_prunes_the_hidden_size_everywhere():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=2, intermediate_size=64)
    dense_embed = model.model.embed_tokens.weight.detach().clone()
    ratio = 0.25
    report = methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=ratio,
                           importance="element1", mode="channel")
    kept = report["hidden_kept"]
    assert len(kept) == 32 - _removed(32, ratio) == 24 and kept == sorted(kept)
    scores = report["scores"]["hidden_channels"]
    dropped = sorted(set(range(32)) - set(kept))
    assert max(scores[c] for c in dropped) <= min(scores[c] for c in kept)
    assert model.config.hidden_size == 24
    assert torch.equal(model.model.embed_tokens.weight, dense_embed[:, kept])
    assert all(len(l["heads_kept"]) == 4 and len(l["mlp_channels_kept"]) == 64 for l in report["layers"])
    assert model(_calib()).logits.shape == (4, 16, 128)


def test_channel_mode_l2_is_the_mean_of_the_members_without_the_embedding():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=2)
    members = []
    for layer in model.model.layers:
        members += [layer.input_layernorm.weight ** 2, layer.post_attention_layernorm.weight ** 2]
        members += [getattr(layer.self_attn, n).weight.pow(2).sum(0) for n in ("q_proj", "k_proj", "v_proj")]
        members += [layer.mlp.gate_proj.weight.pow(2).sum(0), layer.mlp.up_proj.weight.pow(2).sum(0)]
        members += [layer.self_attn.o_proj.weight.pow(2).sum(1), layer.mlp.down_proj.weight.pow(2).sum(1)]
    members += [model.model.norm.weight ** 2, model.lm_head.weight.pow(2).sum(0)]
    want = torch.stack(members).mean(0).detach()
    report = methods.prune(model, "llm-pruner", _calib(), device="cpu", pruning_ratio=0.25, importance="l2",
                           mode="channel")
    assert torch.allclose(torch.tensor(report["scores"]["hidden_channels"]), want, rtol=1e-6)


# ----------------------------------------------------------------------------- checkpoints and CLI

def test_save_and_reload_give_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from methods.core.models import load_model, save_checkpoint

    base = tmp_path / "base"
    tiny_llama(num_kv_heads=2, num_hidden_layers=4).save_pretrained(base)
    calib = _calib()
    torch.save(calib, tmp_path / "calib.pt")
    model, _ = load_model(str(base))
    methods.prune(model, "llm-pruner", calib, device="cpu", pruning_ratio=0.5, importance="element1", layers="1:3")
    widths = surgery.layer_widths(model)
    assert widths[0]["heads"] == 4 and widths[1]["heads"] == 2   # pruned and unpruned layers side by side
    probe = _calib(seed=1)
    with torch.no_grad():
        want = model(probe).logits
    save_checkpoint(model, None, tmp_path / "saved")
    out = tmp_path / "cli"
    assert main(["prune", "--model", str(base), "--method", "llm-pruner", "--pruning-ratio", "0.5",
                 "--importance", "element1", "--layers", "1:3", "--calib", str(tmp_path / "calib.pt"),
                 "--device", "cpu", "--out", str(out)]) == 0
    for directory in (tmp_path / "saved", out):
        reloaded, _ = load_model(str(directory))
        remote = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True)
        with torch.no_grad():
            assert torch.equal(reloaded(probe).logits, want), directory
            assert torch.equal(remote.eval()(probe).logits, want), directory


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmpruner-cli")
    tiny_llama(num_kv_heads=2, num_hidden_layers=30).save_pretrained(root / "gqa30")
    torch.save(_calib(), root / "calib.pt")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--importance", "taylor_first"], "method 'llm-pruner': option importance must be .*, got 'taylor_first'"),
    (["--layers", "4:40"], "layers 4:40 is out of bounds: the model has 30 decoder layers"),
    (["--layers", "5:5"], "empty range"),
    (["--pruning-ratio", "0.2"], "fewer than one head"),   # 16 KV channels: 0.2 removes 4 < head_dim 8
])
def test_bad_input_is_one_line_and_exit_2(tiny_dirs, tmp_path, capsys, extra, message):
    argv = ["prune", "--model", str(tiny_dirs / "gqa30"), "--method", "llm-pruner", "--pruning-ratio", "0.5",
            "--calib", str(tiny_dirs / "calib.pt"), "--device", "cpu", "--out", str(tmp_path / "out")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


# ----------------------------------------------------------------------------- smoke

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from methods.core.smoke_model import smoke_model_dir

    smoke_model_dir()
    return tmp_path_factory.mktemp("smoke-results")


def test_smoke_row_matches_its_reference(results, capsys):
    code = main(["repro", "llm-pruner", "--profile", "smoke", "--rows", "dense,element1-0.5",
                 "--results-dir", str(results)])
    assert code == 0, capsys.readouterr().out


@pytest.mark.slow
def test_every_smoke_row_and_claim(results, capsys):
    code = main(["repro", "llm-pruner", "--profile", "smoke", "--results-dir", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PENDING" not in out
