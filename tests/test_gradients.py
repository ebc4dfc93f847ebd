"""methods.gradients: the one gradient pass LLM-Pruner and Shortened LLaMA share."""
from __future__ import annotations

import pytest
import torch

import methods
from methods import gradients, llm_pruner, shortened
from methods.core.errors import UsageError
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(rows=2, length=12):
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_dtype,grad_dtype,inside", [
    (torch.float32, "float16", torch.float16),
    (torch.float32, "bfloat16", torch.bfloat16),
    (torch.bfloat16, "float32", torch.float32),
    (torch.bfloat16, "model", torch.bfloat16),
])
def test_the_pass_runs_in_the_grad_dtype_and_the_model_gets_its_own_tensors_back(model_dtype, grad_dtype, inside):
    model = tiny_llama(num_hidden_layers=2).to(model_dtype)
    model.model.norm.weight.requires_grad_(False)
    own = {n: (p.data_ptr(), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (b, b.clone()) for n, b in model.named_buffers()}
    chosen = [model.model.layers[1].mlp.down_proj.weight, model.model.layers[0].input_layernorm.weight]
    with gradients.on_device(model, torch.device("cpu"), grad_dtype, trainable=chosen):
        assert {p.dtype for p in model.parameters()} == {inside}
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in chosen}
        gradients.backward(model, _ids())
        assert all(p.grad is not None and p.grad.dtype == inside for p in chosen)
        assert all(p.grad is None for p in model.parameters() if all(p is not c for c in chosen))
        for name, buffer in model.named_buffers():  # device only: never cast
            assert buffer.dtype == buffers[name][1].dtype, name
    for name, p in model.named_parameters():
        data, value, flag = own[name]
        assert p.data_ptr() == data and torch.equal(p, value) and p.dtype == model_dtype, name
        assert p.requires_grad == flag and p.grad is None, name
    for name, buffer in model.named_buffers():
        assert buffer is buffers[name][0] and torch.equal(buffer, buffers[name][1]), name


def test_the_model_is_restored_when_the_pass_fails():
    model = tiny_llama(num_hidden_layers=2)
    own = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    with pytest.raises(UsageError, match="the calibration loss is nan.*grad_dtype float32"):
        with gradients.on_device(model, torch.device("cpu"), "float16", trainable=[model.lm_head.weight]):
            gradients.backward(model, torch.zeros(1, 8, dtype=torch.long))
    assert all(p.data_ptr() == own[n] and p.grad is None for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_both_methods_take_the_same_grad_dtype_values_with_float32_default():
    assert list(gradients.GRAD_DTYPES) == ["model", "float32", "float16", "bfloat16"]
    required = {"llm-pruner": {"pruning_ratio": 0.5}, "shortened": {"criterion": "taylor", "remove_layers": 1}}
    for name, values in required.items():
        method = methods.get(name)
        assert methods.make_options(method, values).grad_dtype == "float32"
        for value in gradients.GRAD_DTYPES:
            assert methods.make_options(method, {**values, "grad_dtype": value}).grad_dtype == value
        with pytest.raises(UsageError, match="option grad_dtype must be 'model', 'float32', 'float16' or 'bfloat16', got 'fp16'"):
            methods.make_options(method, {**values, "grad_dtype": "fp16"})


def test_shortened_taylor_in_float16_scores_as_on_fp16_weights_and_leaves_the_fp32_model_alone():
    model = tiny_llama(num_hidden_layers=6, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids(rows=3)
    options = shortened.Options(criterion="taylor", remove_layers=1, grad_dtype="float16")
    got = shortened.taylor_scores(model, ids, options)
    half = tiny_llama(num_hidden_layers=6, seed=2)
    for p in half.parameters():  # parameters only: the rotary table keeps its float32
        p.data = p.data.half()
    want = shortened.taylor_scores(half, ids, shortened.Options(criterion="taylor", remove_layers=1, grad_dtype="model"))
    assert got == want
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())
