"""The training kinds (cpt, kd, sparse, lora) through `lpc train` on every declared architecture, on
tiny models built here: per-layer (pruned) checkpoints train, export and reload in their own format,
sparse retraining keeps every zero, LoRA adapts Phi-3's fused projections, and distillation runs
between two architectures that share a vocabulary and refuses, in one line before any step, a
teacher whose tokens differ. Sheared LLaMA's shearing run (`lpc prune --method sheared`) reaches its
target shape on each.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import methods
from repro.cli import main
from methods.core.models import load_model, save_checkpoint
from tests.conftest import ARCHITECTURES, char_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQLEN = 16
CALIB = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Per architecture a dense, a FLAP-pruned (per-layer format) and a magnitude-pruned checkpoint, all
    with one character tokenizer; a token file and an instruction file to train on."""
    import transformers

    root = tmp_path_factory.mktemp("arch-train")
    tokenizer = char_tokenizer()
    base = np.random.default_rng(0).integers(4, 100, size=64)
    stream = np.concatenate([np.roll(base, k) for k in range(8)])
    np.save(root / "tokens.npy", stream.reshape(-1, SEQLEN))
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    (root / "echo.jsonl").write_text("".join(
        json.dumps({"instruction": "Echo", "input": words[i % 5], "output": words[(i + 1) % 5]}) + "\n"
        for i in range(12)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the one_thread fixture
    for arch in ARCHITECTURES:
        if arch == "qwen3" and not hasattr(transformers, "Qwen3Config"):
            continue
        save_checkpoint(tiny_model(arch), tokenizer, root / f"{arch}-dense")
        pruned = tiny_model(arch)
        methods.prune(pruned, "flap", CALIB, device="cpu", pruning_ratio=0.3)
        save_checkpoint(pruned, tokenizer, root / f"{arch}-pruned")
        sparse = tiny_model(arch)
        methods.prune(sparse, "magnitude", None, sparsity_ratio=0.5)
        save_checkpoint(sparse, tokenizer, root / f"{arch}-sparse")
    torch.set_num_threads(threads)
    return root


def train(workspace, out, model, kind, *extra):
    data = ["--data", str(workspace / ("echo.jsonl" if kind == "lora" else "tokens.npy"))]
    return main(["train", "--model", str(workspace / model), "--kind", kind, *data, "--steps", "2",
                 "--global-batch", "4", "--micro-batch", "2", "--seqlen", str(SEQLEN), "--lr", "1e-3",
                 "--warmup-fraction", "0", "--out", str(out), *extra])


def trained(workspace, tmp_path, model, kind, *extra):
    """(the checkpoint before, the one `lpc train` wrote), both reloaded."""
    assert train(workspace, tmp_path / kind, model, kind, *extra) == 0
    return (load_model(str(workspace / model), load_tokenizer=False)[0],
            load_model(str(tmp_path / kind), load_tokenizer=False)[0])


def _present(workspace, arch):
    if not (workspace / f"{arch}-dense").exists():
        pytest.skip("transformers has no Qwen3 before 4.51")


def _the_next(arch):
    """Another architecture with the same vocabulary, present in every supported transformers."""
    order = [a for a in ARCHITECTURES if a != "qwen3"]
    return order[(order.index(arch) + 1) % len(order)] if arch in order else "llama"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_pruned_checkpoint_continues_pretraining_and_reloads_in_its_format(workspace, tmp_path, arch):
    _present(workspace, arch)
    before, after = trained(workspace, tmp_path, f"{arch}-pruned", "cpt")
    assert after.config.model_type == f"lpc_{arch}"
    assert after.config.layer_intermediate_size == before.config.layer_intermediate_size
    ids = CALIB[:1]
    with torch.no_grad():
        moved = after(input_ids=ids).logits - before(input_ids=ids).logits
    assert torch.isfinite(moved).all() and moved.abs().max() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_pruned_student_distils_from_another_architecture_with_the_same_vocabulary(workspace, tmp_path, arch):
    _present(workspace, arch)
    teacher = workspace / f"{_the_next(arch)}-dense"
    assert train(workspace, tmp_path / "kd", f"{arch}-pruned", "kd", "--teacher", str(teacher)) == 0
    report = json.loads((tmp_path / "kd" / "train.json").read_text())
    assert report["inputs"]["teacher"] and all(np.isfinite(r["loss"]) for r in report["log"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sparse_retraining_keeps_every_zero(workspace, tmp_path, arch):
    _present(workspace, arch)
    before, after = trained(workspace, tmp_path, f"{arch}-sparse", "sparse")
    changed = 0
    for (name, old), new in zip(before.named_parameters(), after.parameters()):
        if name.endswith("_proj.weight"):   # Phi-3's qkv_proj and gate_up_proj included
            assert torch.equal(new[old == 0], torch.zeros_like(new[old == 0])), name
            changed += int((new != old).sum())
    assert changed > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_recovers_a_pruned_checkpoint(workspace, tmp_path, arch):
    pytest.importorskip("peft")
    _present(workspace, arch)
    code = train(workspace, tmp_path / "lora", f"{arch}-pruned", "lora", "--option", "val_set_size=2",
                 "--option", "warmup_steps=1")
    assert code == 0
    report = json.loads((tmp_path / "lora" / "train.json").read_text())
    fused = arch == "phi3"
    stored = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if fused else list(report["recipe"]["targets"])
    assert report["trainable_parameters"] > 0 and sorted(report["adapted_modules"]) == sorted(stored)
    reloaded, _ = load_model(str(tmp_path / "lora"), load_tokenizer=False)
    assert reloaded.config.model_type == f"lpc_{arch}"
    names = {n.rsplit(".", 1)[-1] for n, _ in reloaded.named_modules()}
    assert ("qkv_proj" in names) == fused and not any("lora" in n for n in names)


SHEARED_TARGET = {"hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                  "intermediate_size": 40}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_shearing_run_prunes_to_the_target_shape(workspace, tmp_path, arch):
    _present(workspace, arch)
    out = tmp_path / "sheared"
    code = main(["prune", "--model", str(workspace / f"{arch}-dense"), "--method", "sheared",
                 "--target-shape", json.dumps(SHEARED_TARGET), "--data", str(workspace / "tokens.npy"),
                 "--steps", "2", "--global-batch", "4", "--micro-batch", "2", "--seqlen", str(SEQLEN),
                 "--lr", "1e-3", "--lagrangian-warmup-fraction", "0.5", "--out", str(out)])
    assert code == 0
    model, _ = load_model(str(out), load_tokenizer=False)
    for name, value in SHEARED_TARGET.items():
        assert getattr(model.config, name) == value, name
    log = json.loads((out / "pruning-run.json").read_text())["log"]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["lagrangian"]) for r in log)


def test_a_teacher_with_other_tokens_is_refused_in_one_line_before_any_step(workspace, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    save_checkpoint(tiny_model("mistral"), char_tokenizer(swap=("a", "b")), teacher)
    capsys.readouterr()
    code = train(workspace, tmp_path / "out", "llama-pruned", "kd", "--teacher", str(teacher))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "teacher's tokenizer maps 2 of its 100 tokens to other ids than the student's" in err
    assert not (tmp_path / "out").exists()
