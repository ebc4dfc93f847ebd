"""The methods on whole (tiny, GQA) models: engine fidelity, determinism, validation."""
from __future__ import annotations

import pytest
import torch

import methods
from methods.calibration import capture_layer_inputs, sequential_layers
from methods.core.errors import UsageError
from tests.conftest import tiny_llama


def calib_ids(n=4, length=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_replayed_layers_reproduce_the_model_forward():
    model = tiny_llama()
    ids = calib_ids()
    seen = []
    sequential_layers(model, ids, torch.device("cpu"), lambda i, layer, inputs: seen.append(i))
    assert seen == [0, 1, 2]
    # Re-capture and push through all layers by hand: must equal the model's own last hidden state.
    inputs = capture_layer_inputs(model, ids, torch.device("cpu"))
    for layer in model.model.layers:
        inputs.advance(layer)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(inputs.hidden), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
def test_methods_hit_the_pattern_and_leave_the_rest_alone(name, kind):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = methods.prune(model, name, calib_ids(), device="cpu",
                           sparsity_ratio=0.5 if kind == "unstructured" else None, sparsity_type=kind)
    for key, value in model.state_dict().items():
        if ".layers." in key and key.endswith("proj.weight"):
            if name != "sparsegpt":  # no weight update: survivors are untouched
                kept = value != 0
                assert torch.equal(value[kept], before[key][kept])
        else:
            assert torch.equal(value, before[key]), f"{key} must not change"
    assert set(report["sparsity"]) == {n for n, _ in model.named_modules() if n.endswith("_proj")}
    for module_sparsity in report["sparsity"].values():
        assert module_sparsity == pytest.approx(0.5, abs=0.02)
    if kind == "2:4":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features != 128:
                zeros = (module.weight == 0).reshape(module.out_features, -1, 4).sum(-1)
                assert (zeros >= 2).all()


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_same_inputs_give_bit_identical_masks(name):
    masks = []
    for _ in range(2):
        model = tiny_llama(seed=3)
        methods.prune(model, name, calib_ids(seed=5), device="cpu", sparsity_ratio=0.5)
        masks.append(torch.cat([(p == 0).flatten() for n, p in model.named_parameters() if "proj" in n]))
    assert torch.equal(masks[0], masks[1])


def test_wanda_uses_activations_so_its_masks_differ_from_magnitude():
    a, b = tiny_llama(), tiny_llama()
    methods.prune(a, "magnitude", None, sparsity_ratio=0.5, device="cpu")
    methods.prune(b, "wanda", calib_ids(), sparsity_ratio=0.5, device="cpu")
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight == 0, b.model.layers[0].mlp.down_proj.weight == 0)


@pytest.mark.parametrize("call,message", [
    (lambda m: methods.prune(m, "nope", None, sparsity_ratio=0.5), "unknown method"),
    (lambda m: methods.prune(m, "sheared", None, target_shape={"hidden_size": 16, "num_attention_heads": 2,
                                                               "num_key_value_heads": 1, "num_hidden_layers": 2,
                                                               "intermediate_size": 32}),
     "prunes what its training run learned"),
    (lambda m: methods.prune(m, "wanda", None, sparsity_ratio=0.5), "needs calibration"),
    (lambda m: methods.prune(m, "wanda", torch.zeros(2, 3, 4, dtype=torch.long), sparsity_ratio=0.5), "2-D"),
    (lambda m: methods.prune(m, "wanda", torch.zeros(2, 8), sparsity_ratio=0.5), "integers"),
    (lambda m: methods.prune(m, "wanda", torch.full((2, 8), 999), sparsity_ratio=0.5), r"\[0, 128\)"),
    (lambda m: methods.prune(m, "magnitude", None, sparsity_ratio=0.5, blocksize=3), "takes no option"),
    (lambda m: methods.prune(m, "sparsegpt", calib_ids(), sparsity_type="4:8", blocksize=100), "multiple of M"),
    (lambda m: methods.prune(m, "magnitude", None, sparsity_type="3:5"), "not divisible by M=5"),
])
def test_bad_input_is_a_usage_error(call, message):
    with pytest.raises(UsageError, match=message):
        call(tiny_llama())


def test_non_llama_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UsageError, match="not a decoder-only Llama-like"):
        methods.prune(model, "magnitude", None, sparsity_ratio=0.5)


# ----------------------------------------------------------------------------- declared options

# The fewest options each method needs; everything else takes its declared default.
MINIMAL = {"magnitude": {"sparsity_ratio": 0.5}, "wanda": {"sparsity_ratio": 0.5}, "sparsegpt": {"sparsity_ratio": 0.5},
           "wanda-sp": {"pruning_ratio": 0.2}, "flap": {"pruning_ratio": 0.2}, "llm-pruner": {"pruning_ratio": 0.2},
           "minitron-width": {"hidden_size": 8, "ffn_hidden_size": 8}, "minitron-depth": {"remove_layers": 1},
           "shortgpt": {"remove_layers": 1}, "shortened": {"criterion": "ppl", "remove_layers": 1},
           "sheared": {"target_shape": "1.3b"}}


def _declared(name):
    from methods.options import declared

    return declared(methods.get(name).options_type)


def _wrong_type(field):
    """A value of the wrong kind for the field's declared type, and the words the refusal must use."""
    from typing import Union, get_args, get_origin

    from methods.options import choices

    kind = field.annotation
    if get_origin(kind) is Union:  # Optional[X]
        kind = next(a for a in get_args(kind) if a is not type(None))
    if choices(field):
        return "nope", f"must be {', '.join(map(repr, choices(field)[:-1]))}"
    return {bool: (1, "must be true or false"), int: (True, "must be an integer"), float: ("0.5", "must be a number"),
            str: (5, "must be a string")}[kind]


def test_minimal_options_cover_the_registry():
    assert set(MINIMAL) == set(methods.REGISTRY)


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_options_are_frozen_strict_pydantic_dataclasses_that_round_trip(name):
    import dataclasses
    import json

    from pydantic.dataclasses import is_pydantic_dataclass

    method = methods.get(name)
    options = methods.make_options(method, MINIMAL[name])
    assert is_pydantic_dataclass(method.options_type)
    assert method.options_type.__pydantic_config__.get("strict") is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.__setattr__(next(iter(_declared(name))), None)
    as_json = json.loads(json.dumps(dataclasses.asdict(options)))  # what prune.json stores
    assert list(as_json) == list(_declared(name))
    assert methods.make_options(method, as_json) == options
    assert all(field.description for field in _declared(name).values())


@pytest.mark.parametrize("name,option", [(n, o) for n in sorted(MINIMAL) for o in _declared(n)])
def test_a_value_of_the_wrong_type_is_one_line_naming_method_option_and_value(name, option):
    value, words = _wrong_type(_declared(name)[option])
    with pytest.raises(UsageError) as refused:
        methods.make_options(methods.get(name), {**MINIMAL[name], option: value})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"method {name!r}: option {option} {words}") and f"got {value!r}" in message, message


@pytest.mark.parametrize("name,option,bound", [(n, o, m) for n in sorted(MINIMAL) for o, f in _declared(n).items()
                                               for m in f.metadata if hasattr(m, "gt") or hasattr(m, "ge")
                                               or hasattr(m, "lt") or hasattr(m, "le")])
def test_a_value_out_of_its_declared_bounds_is_one_line(name, option, bound):
    key, limit = next((k, getattr(bound, k)) for k in ("gt", "ge", "lt", "le") if hasattr(bound, k))
    outside = {"gt": limit, "ge": limit - 1, "lt": limit, "le": limit + 1}[key]
    with pytest.raises(UsageError, match=f"^method '{name}': option {option} must be "
                                         f"{dict(gt='>', ge='>=', lt='<', le='<=')[key]} {limit:g}, "
                                         f"got {outside!r}$"):
        methods.make_options(methods.get(name), {**MINIMAL[name], option: outside})


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_missing_and_unknown_options_are_one_line(name):
    for required in MINIMAL[name]:
        if _declared(name)[required].is_required():
            given = {k: v for k, v in MINIMAL[name].items() if k != required}
            with pytest.raises(UsageError, match=f"^method '{name}': option {required} is required"):
                methods.make_options(methods.get(name), given)
    with pytest.raises(UsageError, match=f"^method '{name}' takes no option colour$"):
        methods.make_options(methods.get(name), {**MINIMAL[name], "colour": "blue"})
