"""Sheared LLaMA on tiny models: target shapes and their refusals, the masked model against its folded
and pruned checkpoint (GQA included), dynamic batch loading's stream, the `sheared` train kind
(2 processes = 1, kill -9 and resume = an uninterrupted run, the pruned output), and bad input as
one line before any compute. The original's own numbers: tests/test_golden_sheared.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import methods
from methods import sheared, sheared_model
from methods.core.errors import UsageError
from repro.cli import main
from tests.conftest import kill_lpc_at, lpc, tiny_llama
from training import data as train_data
from training.engine import lr_at
from training.options import TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

SEQLEN = 16
# The tiny GQA Llama (hidden 32, 4 heads of 8 in 2 key/value groups, 4 layers, MLP 64) to half of each.
TARGET = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3,
          "intermediate_size": 32}


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                       intermediate_size=11008, vocab_size=32000)


# ----------------------------------------------------------------------------- shapes

def test_the_papers_targets_and_their_sparsities():
    config = llama2_7b_config()
    source = sheared.shape_of(config)
    assert sheared.prunable_size(source, 128) == 6_476_005_376
    expected = {"2.7b": (2_537_553_920, 0.6082, {"hidden": 0.375, "head": 0.375, "intermediate": 0.3721, "layer": 0}),
                "1.3b": (1_214_251_008, 0.8125, {"hidden": 0.5, "head": 0.5, "intermediate": 0.5, "layer": 0.25}),
                "370m": (308_281_344, 0.9524, {"hidden": 0.75, "head": 0.75, "intermediate": 0.7442, "layer": 0.25})}
    for name, (size, overall, per_set) in expected.items():
        target = sheared.target_for(config, name)
        assert sheared.prunable_size(target, 128) == size
        gates = sheared_model.Gates(source, 128, target, warmup_steps=10)
        assert gates.full_target_sparsity() == pytest.approx(overall, abs=5e-5)
        for m, value in per_set.items():
            assert gates.full_target_sparsity(m) == pytest.approx(value, abs=5e-5), (name, m)
            assert gates.target_sparsity_at(5, m) == pytest.approx(gates.full_target_sparsity(m) / 2)


@pytest.mark.parametrize("target, message", [
    ({**TARGET, "hidden_size": 64}, "target hidden_size 64 is more than the source's 32"),
    ({**TARGET, "num_hidden_layers": 5}, "target num_hidden_layers 5 is more than the source's 4"),
    ({**TARGET, "hidden_size": 15}, "hidden_size 15 is not divisible by its 2 attention heads"),
    ({**TARGET, "num_attention_heads": 4, "num_key_value_heads": 4}, "target key/value heads 4 is more than the source's 2"),
    ({**TARGET, "num_attention_heads": 1}, "num_attention_heads 2, not 1"),
    ({"hidden_size": 16}, "lacks num_attention_heads"),
    ({**TARGET, "layers": 3}, "unknown key layers"),
    ("2.7b", "more than the source's"),
    ("tiny", "not one of 2.7b, 1.3b, 370m"),
])
def test_unreachable_targets_are_one_line(target, message):
    with pytest.raises(UsageError, match=message) as refused:
        sheared.target_for(tiny_llama(num_hidden_layers=4).config, target)
    assert "\n" not in str(refused.value)


def test_a_gqa_source_takes_a_preset_only_with_its_own_groups(tmp_path):
    from transformers import LlamaConfig

    llama3 = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                         intermediate_size=14336)
    with pytest.raises(UsageError, match="key/value heads 20 is more than the source's 8"):
        sheared.target_for(llama3, "2.7b")
    (tmp_path / "t.json").write_text(json.dumps({"hidden_size": 2560, "num_attention_heads": 20,
                                                 "num_key_value_heads": 5, "num_hidden_layers": 32,
                                                 "intermediate_size": 6912, "vocab_size": 128256}))
    target = sheared.target_for(llama3, str(tmp_path / "t.json"))
    assert (target.num_attention_heads, target.num_key_value_heads) == (20, 5)


# ----------------------------------------------------------------------------- the masked model and the fold

def _spread_gates(model, target=TARGET, seed=0):
    """Gates whose log-alphas are spread over their range, as after some shearing."""
    gates = sheared_model.Gates(sheared.shape_of(model.config), sheared.head_dim_of(model.config),
                          sheared.target_for(model.config, target), warmup_steps=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=generator) * 3)
    return gates


def _ids(seed=1):
    return torch.randint(0, 128, (3, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_the_corrected_fold_prunes_to_exactly_the_masked_model(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4, tie_word_embeddings=tied)
    gates = _spread_gates(model)
    masking = sheared_model.Masking(model, mask_embedding=True)
    with torch.no_grad(), masking.using(gates.deterministic(target=True)):
        masked = model(input_ids=_ids()).logits
    masking.remove()
    report = methods.prune(model, "sheared", state=gates, target_shape=TARGET, fold_hidden_into_lm_head=False)
    for name, value in TARGET.items():
        assert getattr(model.config, name) == value
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert len(report["layers_removed"]) == 1 and len(report["hidden_kept"]) == 16
    with torch.no_grad():
        pruned = model(input_ids=_ids()).logits
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=_ids()).logits, pruned)


def test_the_originals_fold_scales_the_head_by_the_hidden_gates_twice():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    gates = _spread_gates(model)
    masking = sheared_model.Masking(model, mask_embedding=True)
    with torch.no_grad(), masking.using(gates.deterministic(target=True)):
        masked = model(input_ids=_ids()).logits
    masking.remove()
    zs = gates.deterministic(target=True)
    head = model.lm_head.weight.detach().clone()
    methods.prune(model, "sheared", state=gates, target_shape=TARGET)
    kept = torch.nonzero(zs.hidden).reshape(-1)
    torch.testing.assert_close(model.lm_head.weight, head[:, kept] * zs.hidden[kept])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=_ids()).logits, masked, atol=1e-3)


def test_key_value_groups_are_gated_and_removed_whole():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    gates = _spread_gates(model, seed=3)
    zs = gates.deterministic(target=True)
    assert zs.head.shape == (4, 2)
    report = methods.prune(model, "sheared", state=gates, target_shape=TARGET)
    for index, layer in enumerate(report["layers"]):
        if index in report["layers_removed"]:
            assert layer["heads_kept"] == []
            continue
        (group,) = layer["kv_heads_kept"]
        assert group == int(torch.nonzero(zs.head[index]).reshape(-1))
        assert layer["heads_kept"] == [2 * group, 2 * group + 1]   # both query heads of the group


def test_a_target_whose_heads_do_not_fill_the_hidden_size_saves_per_layer(tmp_path):
    from transformers import AutoModelForCausalLM

    from methods.modeling_lpc import register

    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    target = {**TARGET, "hidden_size": 24}     # 2 heads of 8 = 16 != 24: transformers < 4.45 cannot say so
    gates = _spread_gates(model, target)
    methods.prune(model, "sheared", state=gates, target_shape=target)
    assert model.config.model_type == "lpc_llama"
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    model.save_pretrained(tmp_path / "pruned")
    register()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=_ids()).logits, before)


def test_gates_trained_for_another_target_are_refused():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    gates = _spread_gates(model)
    with pytest.raises(UsageError, match="another source or target"):
        methods.prune(model, "sheared", state=gates, target_shape={**TARGET, "intermediate_size": 16})


def test_the_random_control_keeps_unscaled_units_at_the_target_shape_without_training(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    dense.save_pretrained(tmp_path / "dense")
    reports = []
    for seed in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
        reports.append(methods.prune(model, "sheared", target_shape=TARGET, random_units=seed))
        for name, value in TARGET.items():
            assert getattr(model.config, name) == value
    first = reports[0]
    kept_layer = next(i for i in range(4) if i not in first["layers_removed"])
    # Unscaled: a kept weight is the dense one (no gate values folded in).
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    methods.prune(model, "sheared", target_shape=TARGET, random_units=0)
    rows = first["layers"][kept_layer]["mlp_channels_kept"]
    new_index = [i for i in range(4) if i not in first["layers_removed"]].index(kept_layer)
    torch.testing.assert_close(model.model.layers[new_index].mlp.up_proj.weight,
                               dense.model.layers[kept_layer].mlp.up_proj.weight[rows][:, first["hidden_kept"]])
    assert first["hidden_kept"] != reports[1]["hidden_kept"]
    assert main(["prune", "--model", str(tmp_path / "dense"), "--method", "sheared", "--target-shape",
                 json.dumps(TARGET), "--random-units", "0", "--out", str(tmp_path / "random")]) == 0
    assert not (tmp_path / "random" / "train.json").exists()


def test_the_embedding_is_unmasked_while_shearing_unless_asked():
    model = tiny_llama(num_kv_heads=2, num_hidden_layers=4)
    zs = _spread_gates(model).deterministic(target=True)
    outputs = {}
    for flag in (False, True):
        masking = sheared_model.Masking(model, mask_embedding=flag)
        seen = []
        handle = model.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad(), masking.using(zs):
            outputs[flag] = model(input_ids=_ids()).logits
        handle.remove()
        masking.remove()
        embedded = model.model.embed_tokens(_ids())
        torch.testing.assert_close(seen[0], embedded * zs.hidden if flag else embedded)
    assert not torch.allclose(outputs[False], outputs[True])


# ----------------------------------------------------------------------------- schedule and data

def test_composers_schedule_is_linear_warm_up_then_cosine():
    options = TrainOptions(model="m", kind="cpt", data="d", steps=3200, global_batch=32, micro_batch=2, seqlen=16,
                           lr=1e-4, out="o", warmup_fraction=0.1, schedule="composer")
    assert lr_at(0, options) == 0 and lr_at(160, options) == pytest.approx(5e-5)
    assert lr_at(320, options) == pytest.approx(1e-4)
    assert lr_at(1760, options) == pytest.approx(1e-4 * (0.1 + 0.9 * 0.5))
    assert lr_at(3200, options) == pytest.approx(1e-5)


def _domains(counts=(30, 20, 10)):
    return [train_data.Windows(torch.arange(n * 4).reshape(n, 4) + 1000 * d, 4, origin=f"d{d}")
            for d, n in enumerate(counts)]


def _dynamic(**extra):
    return train_data.Dynamic({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 1.0, "b": 1.0, "c": 1.0}, 2, **extra)


def test_domain_batches_do_not_depend_on_the_world_size_and_resume_exactly():
    windows = _domains()

    def run(world, micro, steps, state=None):
        streams = [train_data.DomainStream(windows, windows, train_data.Layout(8, micro, world), rank=r, seed=5,
                                           dynamic=_dynamic()) for r in range(world)]
        if state:
            for s in streams:
                s.restore(state)
        out = []
        for step in range(*steps):
            rows = [row[0].item() for s in streams for batch in s.micro_batches(step) for row in batch]
            out.append(rows)
            if step == 3:
                for s in streams:
                    s.update([2.0, 1.0, 1.0])
        return out, streams[0].state(steps[1])

    one, state = run(1, 8, (0, 6))
    two, _ = run(2, 2, (0, 6))
    assert one == two
    first, middle = run(1, 8, (0, 3))
    rest, _ = run(1, 8, (3, 6), state=middle)
    assert first + rest == one
    drawn = [x // 1000 for step in one for x in step]
    assert sorted(set(drawn)) == [0, 1, 2]
    assert state["proportions"][0] > 0.5       # domain a was furthest above its reference
    seen = [x for step in one for x in step if x < 1000]
    assert len(seen) == len(set(seen))          # within a domain: without replacement (30 windows)


def test_domain_stream_serves_steps_in_order():
    stream = train_data.DomainStream(_domains(), _domains(), train_data.Layout(4, 4, 1), rank=0, seed=0,
                                     dynamic=_dynamic())
    stream.micro_batches(0)
    with pytest.raises(RuntimeError, match="in order"):
        stream.micro_batches(2)


# ----------------------------------------------------------------------------- the train kind

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny GQA checkpoint, a learnable token file, and three domains of token files."""
    root = tmp_path_factory.mktemp("shear")
    tiny_llama(num_kv_heads=2, vocab_size=128, max_position_embeddings=64, num_hidden_layers=4).save_pretrained(
        root / "tiny")
    base = np.random.default_rng(0).integers(0, 128, size=64)
    stream = np.concatenate([np.roll(base, k) for k in range(40)])
    windows = stream[: len(stream) // SEQLEN * SEQLEN].reshape(-1, SEQLEN)
    np.save(root / "tokens.npy", windows)
    (root / "domains").mkdir()
    np.save(root / "domains" / "easy.npy", windows[:40])
    np.save(root / "domains" / "noise.npy", np.random.default_rng(1).integers(0, 128, size=(40, SEQLEN)))
    np.save(root / "domains" / "mixed.npy", np.concatenate([windows[40:60], np.random.default_rng(2).integers(
        0, 128, size=(20, SEQLEN))]))
    return root


def prune_args(workspace: Path, out: Path, *extra: str, steps: int = 6):
    return ["prune", "--model", str(workspace / "tiny"), "--method", "sheared", "--target-shape", json.dumps(TARGET),
            "--data", str(workspace / "tokens.npy"), "--steps", str(steps), "--global-batch", "4",
            "--micro-batch", "2", "--seqlen", str(SEQLEN), "--lr", "1e-2", "--warmup-fraction", "0.34",
            "--lagrangian-warmup-fraction", "0.5", "--out", str(out), *extra]


DOMAINS = ["--data", "{data}", "--domains", "{{easy: 0.5, noise: 0.25, mixed: 0.25}}",
           "--reference-loss", "{{easy: 4.0, noise: 4.0, mixed: 4.0}}", "--update-interval", "2",
           "--eval-windows", "4"]


def with_domains(args, workspace):
    args = list(args)
    at = args.index("--data")
    del args[at:at + 2]
    return args + [a.format(data=workspace / "domains") for a in DOMAINS]


def manifest(out: Path, name="pruning-run.json"):
    """A prune stage's records: its training run's manifest (default) or prune.json."""
    return json.loads((out / name).read_text())


def test_lpc_prune_sheared_trains_folds_and_saves_the_target_shape(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert main(prune_args(workspace, out)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, value in TARGET.items():
        assert getattr(model.config, name) == value
    report = manifest(out, "prune.json")
    assert report["method"] == "sheared" and report["stage"] == "prune" and report["pruning_run"]["steps"] == 6
    assert report["parameters"]["pruned"] == sum(p.numel() for p in model.parameters())
    assert not (out / "train.json").exists()   # the folder is a prune stage's: later stages read it as one
    log = manifest(out)["log"]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["lagrangian"]) for r in log)
    assert log[0]["lagrangian"] == 0                     # the multipliers start at 0
    assert log[-1]["expected_sparsity"]["hidden"] > log[0]["expected_sparsity"]["hidden"]
    assert log[-1]["target_sparsity"]["layer"] == pytest.approx(0.25)   # ramped over half of the 6 steps
    assert min(r["lambdas"]["lambda_1_hidden"] for r in log) < 0        # ascent on a sparsity below target
    # Done means done: the same command finds prune.json and trains nothing.
    stamp = report["fingerprint"]
    assert main(prune_args(workspace, out)) == 0
    assert manifest(out, "prune.json")["fingerprint"] == stamp and manifest(out, "prune.json") == report
    # Other settings for the same folder are refused without --overwrite.
    assert main(prune_args(workspace, out, "--lr", "2e-2")) == 2


def test_two_processes_shear_like_one(workspace, tmp_path):
    args = with_domains(prune_args(workspace, tmp_path / "one", steps=4), workspace)
    assert main(args) == 0
    two = lpc(*with_domains(prune_args(workspace, tmp_path / "two", "--nproc", "2", steps=4), workspace))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    np.testing.assert_allclose([r["loss"] for r in b["log"]], [r["loss"] for r in a["log"]], rtol=1e-4)
    np.testing.assert_allclose([r["lagrangian"] for r in b["log"]], [r["lagrangian"] for r in a["log"]],
                               rtol=1e-4, atol=1e-7)
    assert b["proportions"] == pytest.approx(a["proportions"], rel=1e-4)
    assert b["world"] == 2
    assert manifest(tmp_path / "two", "prune.json")["hidden_kept"] == manifest(tmp_path / "one", "prune.json")[
        "hidden_kept"]


def test_kill_minus_nine_and_rerun_shears_like_an_uninterrupted_run(workspace, tmp_path):
    steps = 6
    whole = with_domains(prune_args(workspace, tmp_path / "whole", "--save-every", "2", steps=steps), workspace)
    assert main(whole) == 0
    cut = with_domains(prune_args(workspace, tmp_path / "cut", "--save-every", "2", steps=steps), workspace)
    kill_lpc_at(cut, f"step 4/{steps}")    # after the step-2 checkpoint (gates, proportions, data state)
    proc = lpc(*cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step" in proc.stdout
    a, b = manifest(tmp_path / "whole"), manifest(tmp_path / "cut")
    assert b["resumed_from"] in (2, 4)
    for key in ("loss", "lagrangian"):
        np.testing.assert_allclose([r[key] for r in b["log"]], [r[key] for r in a["log"]], rtol=1e-5, atol=1e-8)
    assert [r.get("proportions") for r in b["log"]] == [r.get("proportions") for r in a["log"]]
    assert manifest(tmp_path / "cut", "prune.json")["layers"] == manifest(tmp_path / "whole", "prune.json")["layers"]
    from safetensors.torch import load_file

    x, y = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


def test_dynamic_loading_in_continued_pretraining_weights_up_the_domain_furthest_above_its_reference(
        workspace, tmp_path):
    args = ["train", "--model", str(workspace / "tiny"), "--kind", "cpt", "--data", str(workspace / "tokens.npy"),
            "--steps", "4", "--global-batch", "4", "--micro-batch", "2", "--seqlen", str(SEQLEN), "--lr", "1e-2",
            "--out", str(tmp_path / "cpt")]
    assert main(with_domains(args, workspace)) == 0
    log = manifest(tmp_path / "cpt", "train.json")["log"]
    update = next(r for r in log if "proportions" in r)
    excess = {d: update["domain_losses"][d] - 4.0 for d in update["domain_losses"]}
    furthest = max(excess, key=excess.get)
    start = {"easy": 0.5, "noise": 0.25, "mixed": 0.25}
    assert update["proportions"][furthest] > start[furthest]
    assert sum(update["proportions"].values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("change, message", [
    ({"--target-shape": json.dumps({**TARGET, "hidden_size": 48})}, "target hidden_size 48 is more than the source's 32"),
    ({"--target-shape": json.dumps({**TARGET, "hidden_size": 15})}, "not divisible by its 2 attention heads"),
    ({"--target-shape": json.dumps({**TARGET, "num_attention_heads": 4, "num_key_value_heads": 4})},
     "key/value heads 4 is more than the source's 2"),
    ({"--domains": "{easy: 0.5, hard: 0.5}", "--reference-loss": "{easy: 4.0, hard: 4.0}"},
     "unknown domain 'hard': --data"),
    ({"--domains": "{easy: 0.5, noise: 0.4}"}, "proportions sum to 0.9, not 1"),
    ({"--reference-loss": "{easy: 4.0, noise: 4.0, other: 1.0}"}, "unknown domain 'other'"),
    ({"--lagrangian-warmup-fraction": "2"}, "lagrangian_warmup_fraction must be <= 1"),
    ({"--steps": None}, "steps"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_compute(workspace, tmp_path, capsys, change, message):
    args = with_domains(prune_args(workspace, tmp_path / "out"), workspace)
    args[args.index("--reference-loss") + 1] = "{easy: 4.0, noise: 4.0}"
    args[args.index("--domains") + 1] = "{easy: 0.5, noise: 0.5}"
    for flag, value in change.items():
        at = args.index(flag) if flag in args else None
        if value is None:
            del args[at:at + 2]
        elif at is None:
            args += [flag, value]
        else:
            args[at + 1] = value
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lpc: error:") and message in lines[0], captured.err
    assert "step" not in captured.out and not (tmp_path / "out").exists()


def test_training_flags_are_refused_for_methods_that_do_not_train(capsys):
    assert main(["prune", "--model", "smoke", "--method", "magnitude", "--sparsity-ratio", "0.5", "--steps", "3",
                 "--out", "/nonexistent/out"]) == 2
    assert "--steps is a training setting; method 'magnitude' does not train" in capsys.readouterr().err


# ----------------------------------------------------------------------------- recipe rows as pipelines

GOLDEN_TARGET = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 6,
                 "intermediate_size": 88}


def write_pipeline(tmp_path: Path, workspace: Path) -> Path:
    """Sheared on the golden tiny model (MHA, 8 layers): shear, shear + continued pre-training, the
    random control; perplexity on the golden evaluation rows and the pruned shape."""
    from tests.conftest import golden_path

    base = {"data": str(workspace / "domains"), "domains": {"easy": 0.5, "noise": 0.25, "mixed": 0.25},
            "reference_loss": {"easy": 5.0, "noise": 6.5, "mixed": 5.5}, "update_interval": 2, "eval_windows": 4,
            "global_batch": 4, "micro_batch": 2, "seqlen": SEQLEN, "lr": 1.0e-3, "schedule": "composer",
            "weight_decay": 0.0, "save_every": 2}
    recipe = {"method": "sheared", "table": "golden", "profiles": {"golden": {
        "model": str(golden_path("tiny-llama-mha")), "dtype": "float32", "device": "cpu",
        "training": {"shear": {"kind": "sheared", "steps": 6, **base}, "cpt": {"kind": "cpt", "steps": 4, **base}},
        "rows": {"dense": {}, "shear": {"target_shape": GOLDEN_TARGET, "pruning_run": "shear"},
                 "shear-cpt": {"target_shape": GOLDEN_TARGET, "pruning_run": "shear", "train": "cpt"},
                 "random": {"target_shape": GOLDEN_TARGET, "random_units": 0}}}}}
    shape = {"hidden": {"paper": 32}, "layers": {"paper": 6}}
    table = {"method": "sheared", "profiles": {"golden": {
        "model": "tiny-llama-mha", "reference": "paper", "ppl_rel": 1e-3,
        "sources": {"paper": "the target shape"},
        "metrics": {"ppl": {"kind": "perplexity", "data": str(golden_path("eval.npy")), "protocol": "rows",
                            "seqlen": 64},
                    "hidden": {"kind": "structure", "field": "hidden_size"},
                    "layers": {"kind": "structure", "field": "num_hidden_layers"}},
        "rows": {"dense": {}, "shear": shape, "shear-cpt": shape, "random": shape}}}}
    for folder in ("tables", "recipes"):
        (tmp_path / folder).mkdir(exist_ok=True)
    import yaml

    (tmp_path / "tables" / "golden.yaml").write_text(yaml.safe_dump(table))
    path = tmp_path / "recipes" / "sheared.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))   # the domains keep their order
    return path


def test_recipe_rows_shear_then_continue_pretraining_then_evaluate(workspace, tmp_path, capsys):
    from repro.chain import check_chain
    from repro.recipe import load_recipe

    recipe_path = write_pipeline(tmp_path, workspace)
    results = tmp_path / "results"
    args = ["repro", "sheared", "--profile", "golden", "--recipe", str(recipe_path), "--results-dir", str(results)]
    assert main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "FAIL" not in out and "MISSING" not in out
    assert out.count("(sheared, 6 steps)") == 1 and out.count("(cpt, 4 steps)") == 1   # shear once, shared
    assert "the same prune as" in out
    read = {row: json.loads((results / "golden" / "sheared" / f"{row}.json").read_text())
            for row in ("shear", "shear-cpt", "random")}
    for row in read.values():
        assert row["metrics"]["hidden"] == 32 and row["metrics"]["layers"] == 6
    assert read["shear"]["prune"]["pruning_run"]["steps"] == 6
    assert read["shear-cpt"]["prune"]["gates"] == read["shear"]["prune"]["gates"]      # the same shear, shared
    assert read["shear-cpt"]["training"]["options"]["kind"] == "cpt"
    assert read["shear-cpt"]["metrics"]["ppl"] != read["shear"]["metrics"]["ppl"]
    assert "pruning_run" not in read["random"]["prune"]
    first = read["shear"]["prune"]["pruning_run"]["first_update"]
    assert first["domains"] == ["easy", "noise", "mixed"] and first["step"] == 2
    assert first["weight_change"][first["furthest_above_reference"]] > 1
    # lpc eval's chain check reads the shear folder as the row's prune stage (prune.json, no train.json).
    recipe = load_recipe("sheared", "golden", recipe_path)
    trained = results / "golden" / "sheared" / "stages" / "shear-cpt" / "trained"
    chain = check_chain(recipe, "shear-cpt", str(trained))
    assert chain["prune"]["method"] == "sheared" and chain["train"]["options"]["kind"] == "cpt"


def test_a_pruning_run_names_a_spec_of_the_methods_kind(workspace, tmp_path):
    import yaml

    from repro.recipe import load_recipe

    path = write_pipeline(tmp_path, workspace)
    recipe = yaml.safe_load(path.read_text())
    profile = recipe["profiles"]["golden"]
    profile["rows"]["shear"]["pruning_run"] = "cpt"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(UsageError, match="rows.shear.pruning_run: spec 'cpt' has kind 'cpt'; a pruning run is of a "
                                         "method that prunes by training \\(sheared\\)"):
        load_recipe("sheared", "golden", path)
    del profile["rows"]["shear"]["pruning_run"]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(UsageError, match="prunes by a training run; name its train spec with `pruning_run:`"):
        load_recipe("sheared", "golden", path)


def test_a_submitted_prune_job_asks_for_the_rows_own_shearing_run(workspace, tmp_path, monkeypatch):
    """`lpc repro --submit` runs a row's prune stage as an `lpc prune --request FILE` job: the file must
    hold the very request (same fingerprint, same training run) the pipeline and `lpc eval` expect."""
    from repro import prune_stage
    from repro.recipe import load_recipe
    from repro.requests import write_request

    recipe = load_recipe("sheared", "golden", write_pipeline(tmp_path, workspace))
    request = recipe.prune_request("shear-cpt", out=tmp_path / "pruned")
    asked = []
    monkeypatch.setattr(prune_stage, "prune", lambda r, **_: asked.append(r))
    assert main(["prune", "--request", str(write_request(request, tmp_path / "prune.request.json"))]) == 0
    assert asked == [request]
    assert prune_stage.prune_fingerprint(asked[0]) == prune_stage.prune_fingerprint(request)
    assert asked[0].pruning_run() == request.pruning_run()


def test_activation_checkpointing_recomputes_the_same_masked_forward(workspace, tmp_path):
    """The gates' hooks run again in the recomputed forward with the micro-batch's own draw."""
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert main(prune_args(workspace, plain, steps=3)) == 0
    assert main(prune_args(workspace, recomputed, "--activation-checkpointing", steps=3)) == 0
    a, b = manifest(plain)["log"], manifest(recomputed)["log"]
    for key in ("loss", "lagrangian", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, atol=1e-7)
