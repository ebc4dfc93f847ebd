"""Structural surgery: every kind of removal keeps the model, its config and its checkpoint in agreement.

Checked on the trained golden fixture (attention that matters, so a wrong head_dim, scaling or
grouping shows in the logits) and on tiny GQA models, under whichever transformers the venv has.
"""
from __future__ import annotations

import torch
import pytest
from transformers import AutoModelForCausalLM

from methods import surgery
from methods.core.errors import UsageError
from methods.modeling_lpc import LpcLlamaForCausalLM
from methods.core.compat import dtype_kwarg
from methods.core.models import load_model, save_checkpoint
from tests.conftest import golden_path, tiny_llama


def golden_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(golden_path("tiny-llama-mha"), **dtype_kwarg(torch.float32)).eval()


def eval_rows():
    return torch.load(golden_path("eval.pt"), weights_only=True)[:2]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def reference_logits(model, ids, drop_heads=(), drop_layers=()):
    """The same removals done by masking the dense model: zeroed o_proj columns, skipped layers."""
    import copy

    dense = copy.deepcopy(model)
    for index, heads in drop_heads:
        attn = dense.model.layers[index].self_attn
        for h in heads:
            attn.o_proj.weight.data[:, h * attn.head_dim:(h + 1) * attn.head_dim] = 0
    dense.model.layers = torch.nn.ModuleList(l for i, l in enumerate(dense.model.layers) if i not in drop_layers)
    dense.config.num_hidden_layers = len(dense.model.layers)
    return logits(dense, ids)


def roundtrip(model, tmp_path):
    save_checkpoint(model, None, tmp_path / "ckpt")
    ours, _ = load_model(str(tmp_path / "ckpt"), load_tokenizer=False)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    return ours, remote


def test_removing_heads_equals_masking_their_output(tmp_path):
    model, ids = golden_model(), eval_rows()
    expected = reference_logits(model, ids, drop_heads=[(0, [1, 3]), (2, [0])])
    surgery.keep_heads(model.model.layers[0], [0, 2])
    surgery.keep_heads(model.model.layers[2], [1, 2, 3])
    surgery.sync_config(model)
    assert isinstance(model, LpcLlamaForCausalLM)
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    for reloaded in roundtrip(model, tmp_path):
        assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_every_removal_together_round_trips_with_identical_logits_and_cached_generation(tmp_path):
    model, ids = golden_model(), eval_rows()
    layers = model.model.layers
    surgery.keep_heads(layers[1], [0, 3])
    surgery.keep_mlp_channels(layers[1], list(range(0, 176, 2)))
    surgery.keep_mlp_channels(layers[4], list(range(100))[::-1])
    for layer in layers:
        surgery.add_output_bias(layer.self_attn.o_proj, torch.linspace(-0.1, 0.1, 64))
        surgery.add_output_bias(layer.mlp.down_proj, torch.linspace(0.05, -0.05, 64))
    surgery.keep_hidden_channels(model, list(range(0, 64, 4)) + list(range(1, 64, 2)))
    surgery.remove_layers(model, [3, 6])
    surgery.sync_config(model)
    assert model.config.num_hidden_layers == 6
    assert model.config.layer_num_attention_heads == [4, 2, 4, 4, 4, 4]
    before = logits(model, ids)
    for reloaded in roundtrip(model, tmp_path):
        assert torch.equal(logits(reloaded, ids), before)
        prompt = ids[:1, :8]
        cached = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                     do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)


def test_uniform_mlp_pruning_stays_a_plain_llama_checkpoint(tmp_path):
    model = tiny_llama(num_kv_heads=2)
    for layer in model.model.layers:
        surgery.keep_mlp_channels(layer, range(48))
    surgery.sync_config(model)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.intermediate_size == 48
    ids = torch.randint(0, 128, (2, 12))
    save_checkpoint(model, None, tmp_path / "plain")
    assert not (tmp_path / "plain" / "modeling_lpc_llama.py").exists()
    reloaded, _ = load_model(str(tmp_path / "plain"), load_tokenizer=False)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_fewer_heads_than_hidden_over_head_dim_needs_the_per_layer_format():
    """Transformers before 4.45 derive head_dim as hidden_size / heads, so a plain config would load wrong."""
    model = tiny_llama(num_kv_heads=2)
    for layer in model.model.layers:
        surgery.keep_heads(layer, [2, 3])
    surgery.sync_config(model)
    assert isinstance(model, LpcLlamaForCausalLM)
    assert model.config.layer_num_key_value_heads == [1, 1, 1]


def test_gqa_keeps_query_heads_inside_groups_evenly():
    model = tiny_llama(num_kv_heads=2)          # query heads 0,1 read kv 0; 2,3 read kv 1
    layer = model.model.layers[0]
    kept = surgery.keep_heads(layer, [1, 3])
    assert kept == {"heads_kept": [1, 3], "kv_heads_kept": [0, 1]}
    assert surgery.attention_shape(layer)[:2] == (2, 2)


@pytest.mark.parametrize("q,kv,message", [
    ([], None, "every attention head"),
    ([0, 1, 2], None, "key/value grouping"),     # two heads in group 0, one in group 1
    ([0], [0, 1], "key/value grouping"),         # group 1 kept without a query head
    ([5], None, "out of range"),
])
def test_invalid_head_sets_are_usage_errors(q, kv, message):
    with pytest.raises(UsageError, match=message):
        surgery.keep_heads(tiny_llama(num_kv_heads=2).model.layers[0], q, kv)


def test_removing_every_layer_is_refused():
    model = tiny_llama()
    with pytest.raises(UsageError, match="at least one must remain"):
        surgery.remove_layers(model, range(3))


def test_removed_layers_renumber_and_config_follows():
    model = tiny_llama()
    surgery.remove_layers(model, [0])
    assert model.config.num_hidden_layers == 2
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]


def test_check_removable_returns_the_depth_or_refuses_all_of_it():
    model = tiny_llama(num_hidden_layers=4)
    assert surgery.check_removable(model, 3) == 4
    with pytest.raises(UsageError, match="cannot remove 4 of the model's 4 layers: at least one must remain"):
        surgery.check_removable(model, 4)


def test_removed_layers_take_their_per_layer_config_with_them():
    model = tiny_llama(num_hidden_layers=4)
    surgery.keep_mlp_channels(model.model.layers[1], range(16))
    surgery.sync_config(model)  # non-uniform: the per-layer format
    assert model.config.layer_intermediate_size == [64, 16, 64, 64]
    kept = [model.model.layers[i] for i in (1, 3)]
    assert surgery.remove_layers(model, [2, 0, 2]) == [0, 2]
    assert list(model.model.layers) == kept
    assert model.config.layer_intermediate_size == [16, 64] and model.config.num_hidden_layers == 2
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]


def test_lm_eval_evaluates_a_reloaded_non_uniform_smoke_checkpoint(tmp_path):
    """lm-eval's own HF loader (trust_remote_code) on a checkpoint with per-layer widths."""
    lm_eval = pytest.importorskip("lm_eval")
    from methods.scoring import SMOKE_TASK, TaskSpec, run_tasks

    model, tokenizer = load_model("smoke")
    layers = model.model.layers
    surgery.keep_heads(layers[3], [0, 1, 2, 6, 7, 8])          # drop key/value group 1 of layer 3
    surgery.keep_mlp_channels(layers[5], range(1024))
    surgery.remove_layers(model, [20])
    surgery.sync_config(model)
    save_checkpoint(model, tokenizer, tmp_path / "pruned")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tmp_path / "pruned"), trust_remote_code=True, batch_size=8, device="cpu")
    assert type(lm.model).__name__ == "LpcLlamaForCausalLM"
    scores = run_tasks(lm.model, tokenizer, [TaskSpec(SMOKE_TASK, 0, "acc")], batch_size=8, limit=8)
    in_memory = run_tasks(model, tokenizer, [TaskSpec(SMOKE_TASK, 0, "acc")], batch_size=8, limit=8)
    assert scores[SMOKE_TASK]["metrics"] == in_memory[SMOKE_TASK]["metrics"]
