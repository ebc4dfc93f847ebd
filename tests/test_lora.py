"""LoRA recovery (training/lora.py): the original's data handling, a few real steps on a tiny model,
and the merge back into the caller's model object."""
from __future__ import annotations

import json

import pytest
import torch

from methods.core.errors import UsageError
from tests.conftest import char_tokenizer, tiny_llama
from training import lora
from training.kinds.lora import LoraRecipe

pytest.importorskip("peft")


def _records(n=40):
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    return [{"instruction": "Echo", "input": words[i % 5], "output": words[(i + 1) % 5]} for i in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_is_the_alpaca_template():
    with_input = lora.prompt("Add.", "2 and 3", "5")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5")
    assert lora.prompt("Say hi.") .endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input" not in lora.prompt("Say hi.", "")


def test_labels_mask_the_prompt_and_eos_is_appended_unless_truncated():
    tok, recipe = char_tokenizer(), LoraRecipe(cutoff_len=256)
    record = {"instruction": "Echo", "input": "abc", "output": "xyz"}
    example = lora.tokenize_example(tok, record, recipe)
    user = tok(lora.prompt("Echo", "abc"))["input_ids"]
    ids, labels = example["input_ids"], example["labels"]
    assert ids[:len(user)] == user and ids[-1] == tok.eos_token_id
    assert labels[:len(user)] == [-100] * len(user)
    assert labels[len(user):] == ids[len(user):]           # the response and its EOS are learned
    assert ids[len(user):-1] == tok.convert_tokens_to_ids(list("xyz"))
    # Cut off at cutoff_len: no EOS, and a prompt longer than the cutoff leaves nothing to learn.
    short = lora.tokenize_example(tok, record, LoraRecipe(cutoff_len=20))
    assert len(short["input_ids"]) == 20 and short["input_ids"][-1] != tok.eos_token_id
    assert short["labels"] == [-100] * 20
    # train_on_inputs: every token is a label.
    full = lora.tokenize_example(tok, record, LoraRecipe(train_on_inputs=True))
    assert full["labels"] == full["input_ids"]


def test_collator_pads_left_to_a_multiple_of_eight_without_touching_the_tokenizer():
    tok = char_tokenizer()
    batch = lora.collator(tok, pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                          {"input_ids": [8] * 10, "labels": [8] * 10}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [0] * 13 + [5, 6, 7]
    assert batch["attention_mask"][0].tolist() == [0] * 13 + [1] * 3
    assert batch["labels"][0].tolist() == [-100] * 13 + [-100, 6, 7]
    assert batch["labels"][1].tolist() == [-100] * 6 + [8] * 10
    assert tok.padding_side == "right"  # the caller's tokenizer is saved with the checkpoint


def test_validation_split_is_the_datasets_train_test_split():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"i": list(range(500))})
    split = rows.train_test_split(test_size=37, shuffle=True, seed=42)
    train, val = lora.split_validation(500, 37, seed=42)
    assert val == split["test"]["i"] and train == split["train"]["i"]
    assert lora.split_validation(5, 0) == ([0, 1, 2, 3, 4], [])


def test_recipe_refuses_bad_values():
    with pytest.raises(UsageError, match="no option"):
        LoraRecipe.from_spec({"learning_rate": 1e-4})
    with pytest.raises(UsageError, match="global batch 10 is not divisible by micro batch 4"):
        LoraRecipe.from_spec({"batch_size": 10, "micro_batch_size": 4})
    with pytest.raises(UsageError, match="precision"):
        LoraRecipe.from_spec({"precision": "fp8"})
    with pytest.raises(UsageError, match="mixed-precision"):
        lora.recover(tiny_llama(), char_tokenizer(), LoraRecipe(precision="fp16"), device="cpu")


def test_local_data_is_validated(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        lora.load_instructions(str(bad))
    with pytest.raises(UsageError, match="not found"):
        lora.load_instructions(str(tmp_path / "missing.jsonl"))
    records, info = lora.load_instructions("smoke")  # the shipped offline set
    assert len(records) > 100 and info["sha256"]


def test_a_few_steps_learn_and_merge_into_the_same_model(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama(num_kv_heads=2, vocab_size=128)
    tok = char_tokenizer()
    data = _write_jsonl(tmp_path / "echo.jsonl", _records())
    spec = {"data": str(data), "max_steps": 6, "micro_batch_size": 4, "batch_size": 8, "lr": 1e-2,
            "warmup_steps": 1, "val_set_size": 8, "eval_steps": 3, "cutoff_len": 256, "select_best": False}
    recipe = LoraRecipe.from_spec(spec)
    records, _ = lora.load_instructions(str(data))
    _, val_idx = lora.split_validation(len(records), recipe.val_set_size, recipe.split_seed)
    val = [lora.tokenize_example(tok, records[i], recipe) for i in val_idx]
    collate = lora.collator(tok, recipe.pad_token_id)
    before_loss = lora.evaluate_loss(model, val, collate, recipe.micro_batch_size, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    expected = {}
    train = lora._train

    def spy(peft_model, params, *args, **kwargs):
        log = train(peft_model, params, *args, **kwargs)
        for name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                merged = module.base_layer.weight + (b @ a) * module.scaling["default"]
                expected[name.split("base_model.model.", 1)[1]] = merged.detach().clone()
        return log

    monkeypatch.setattr(lora, "_train", spy)
    report = lora.recover(model, tok, LoraRecipe.from_spec(spec), device="cpu", seed=0)

    assert report["steps"] == 6 and report["micro_batches"] == 12
    assert report["examples"] == {"train": 32, "val": 8}
    assert report["tokens"] > report["label_tokens"] > 0
    assert [h["step"] for h in report["history"]] == [3, 6]
    after_loss = lora.evaluate_loss(model, val, collate, recipe.micro_batch_size, torch.device("cpu"))
    assert after_loss == pytest.approx(report["val_loss"], rel=1e-5)
    assert after_loss < before_loss
    # Merged: plain Linears, no peft left, the seven projections moved by exactly B @ A * scale.
    assert not [n for n, m in model.named_modules() if "lora" in type(m).__name__.lower() or "lora" in n]
    assert not hasattr(model, "peft_config")
    targets = [n for n in expected]
    assert len(targets) == 7 * 3
    for name in targets:
        weight = model.get_submodule(name).weight
        assert torch.allclose(weight, expected[name], atol=1e-6), name
        assert not torch.equal(weight, before[name + ".weight"]), name
    untouched = [n for n in before if not any(n.startswith(t) for t in targets)]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in untouched)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_select_best_restores_the_best_validation_adapter(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(num_kv_heads=2, vocab_size=128)
    data = _write_jsonl(tmp_path / "echo.jsonl", _records())
    spec = {"data": str(data), "max_steps": 4, "micro_batch_size": 4, "batch_size": 4, "lr": 5e-2,
            "warmup_steps": 0, "val_set_size": 8, "eval_steps": 1, "cutoff_len": 256, "select_best": True}
    tok = char_tokenizer()
    report = lora.recover(model, tok, LoraRecipe.from_spec(spec), device="cpu", seed=1)
    losses = [h["val_loss"] for h in report["history"]]
    assert report["best_val_loss"] == min(losses)
    assert report["selected_step"] == report["best_step"] == report["history"][losses.index(min(losses))]["step"]
    # The merged model is the selected adapter's, whichever step that was.
    recipe = LoraRecipe.from_spec(spec)
    records, _ = lora.load_instructions(str(data))
    _, val_idx = lora.split_validation(len(records), 8)
    val = [lora.tokenize_example(tok, records[i], recipe) for i in val_idx]
    loss = lora.evaluate_loss(model, val, lora.collator(tok, 0), recipe.micro_batch_size, torch.device("cpu"))
    assert loss == pytest.approx(min(losses), rel=1e-5)
