"""Every declared architecture (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Phi-3) through the surgery and its
checkpoints, on tiny random models built here: each removal against masking the dense model, the
per-layer formats' reload to identical logits (in the kit, without it, and through lm-eval's loader),
cached generation, which results stay stock checkpoints, Gemma 2's embedding scale, the sliding
masks the calibration engine replays, Phi-3's fused projections against their unfused equivalent, and
the refusal of an undeclared architecture before any compute.

Qwen3 exists from transformers 4.51: under 4.43 its cases skip. The masking references name the stock
modules themselves (o_proj, down_proj, the norms), independently of methods/architectures.py.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import methods
from methods import surgery
from methods.calibration import sequential_layers
from methods.core.errors import UsageError
from methods.core.models import load_model, save_checkpoint
from tests.conftest import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
HIDDEN_KEPT = list(range(0, 32, 3)) + list(range(1, 32, 6))      # 17 of 32, in a new order
# (layer, query heads kept): layer 0 keeps key/value group 1 (heads 2, 3).
HEADS_KEPT = {0: [2, 3]}
MLP_KEPT = {2: list(range(63, 20, -2))}                            # 22 of 64, reversed
LAYERS_REMOVED = [1]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- masking references

def _residual_norms(model):
    """Every norm on the residual stream (not Qwen3's per-head q_norm / k_norm)."""
    return [m for name, m in model.named_modules() if name.endswith("norm") and ".self_attn." not in name]


def _over_kept(kept):
    def hook(module, args, out):
        # The stock norm itself, over the kept channels only: what the pruned model's norm computes.
        sliced = copy.deepcopy(module)
        sliced._forward_hooks.clear()
        sliced.weight = torch.nn.Parameter(module.weight[kept])
        full = torch.zeros_like(out)
        full[..., kept] = sliced(args[0][..., kept])
        return full
    return hook


def _identity(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def masked(model, heads=None, mlp=None, hidden=None, layers=()):
    """The dense model with the removals done by masking: a removed head's o_proj columns and a removed
    MLP channel's down_proj column are zero; a removed hidden channel is zero in the embedding and in
    every o_proj / down_proj output row, and every residual norm normalises over the kept channels; a
    removed layer passes its input through."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for index, kept in (heads or {}).items():
            attn = dense.model.layers[index].self_attn
            dim = attn.head_dim
            for head in range(attn.o_proj.in_features // dim):
                if head not in kept:
                    attn.o_proj.weight[:, head * dim:(head + 1) * dim] = 0
        for index, kept in (mlp or {}).items():
            down = dense.model.layers[index].mlp.down_proj
            down.weight[:, [c for c in range(down.in_features) if c not in kept]] = 0
        if hidden is not None:
            drop = [c for c in range(dense.config.hidden_size) if c not in hidden]
            dense.get_input_embeddings().weight[:, drop] = 0
            for layer in dense.model.layers:
                for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    linear.weight[drop] = 0
            kept = torch.tensor(sorted(hidden))
            for norm in _residual_norms(dense):
                norm.register_forward_hook(_over_kept(kept))
    for index in layers:
        dense.model.layers[index].register_forward_hook(_identity, with_kwargs=True)
    return dense


def cut(model, heads=None, mlp=None, hidden=None, layers=()):
    for index, kept in (heads or {}).items():
        surgery.keep_heads(model.model.layers[index], kept)
    for index, kept in (mlp or {}).items():
        surgery.keep_mlp_channels(model.model.layers[index], kept)
    if hidden is not None:
        surgery.keep_hidden_channels(model, hidden)
    if layers:
        surgery.remove_layers(model, layers)


REMOVALS = {"heads": dict(heads=HEADS_KEPT), "mlp": dict(mlp=MLP_KEPT), "hidden": dict(hidden=HIDDEN_KEPT),
            "layers": dict(layers=LAYERS_REMOVED),
            "all": dict(heads=HEADS_KEPT, mlp=MLP_KEPT, hidden=HIDDEN_KEPT, layers=LAYERS_REMOVED)}


@pytest.mark.parametrize("removal", sorted(REMOVALS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_removal_equals_masking_the_dense_model(arch, removal):
    model = tiny_model(arch)
    want = logits(masked(model, **REMOVALS[removal]))
    assert not torch.allclose(want, logits(model), atol=1e-3)  # the removal matters
    cut(model, **REMOVALS[removal])
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    surgery.sync_config(model)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

# After each removal: the architecture's stock checkpoint, or its per-layer format. A head or MLP cut in
# one layer is non-uniform; removing hidden channels keeps a stock config only where every version
# reads an explicit head_dim (Qwen3, Mistral) and there is no embedding scale to keep (Gemma 2);
# removing layer 1 of Gemma 2's sliding/global/sliding leaves two sliding layers, which transformers
# 4.43 cannot state (it derives the type from the index).
STOCK_AFTER = {"heads": (), "mlp": (), "hidden": ("qwen3", "mistral"),
               "layers": ("llama", "qwen2", "qwen3", "mistral", "phi3"), "all": ()}


@pytest.mark.parametrize("removal", sorted(STOCK_AFTER))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_result_the_stock_config_states_stays_the_stock_checkpoint(arch, removal, tmp_path):
    model = tiny_model(arch)
    stock_type = model.config.model_type
    cut(model, **REMOVALS[removal])
    surgery.sync_config(model)
    stock = arch in STOCK_AFTER[removal]
    assert model.config.model_type == (stock_type if stock else f"lpc_{arch}")
    save_checkpoint(model, None, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_lpc.py").exists() != stock
    reloaded, _ = load_model(str(tmp_path / "ckpt"), load_tokenizer=False)
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded), logits(model))


def test_gemma2_depth_pruning_that_keeps_the_alternation_stays_stock():
    model = tiny_model("gemma2", num_hidden_layers=4)
    surgery.remove_layers(model, [2, 3])                 # sliding, full: still the stock pattern
    surgery.sync_config(model)
    assert model.config.model_type == "gemma2"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_layer_checkpoints_reload_to_identical_logits_and_generate_with_the_cache(arch, tmp_path):
    model = tiny_model(arch)
    cut(model, **REMOVALS["all"])
    surgery.sync_config(model)
    want = logits(model)
    save_checkpoint(model, None, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == f"lpc_{arch}" and config["layer_num_attention_heads"] == [2, 4]
    reloaded, _ = load_model(str(tmp_path / "ckpt"), load_tokenizer=False)
    assert torch.equal(logits(reloaded), want)
    prompt = IDS[:1, :8]   # longer than the sliding windows once generated
    runs = [reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              use_cache=cache, pad_token_id=0) for cache in (True, False)]
    assert torch.equal(*runs)


RELOAD = """
import json, sys, torch
sys.modules["methods"] = None            # the kit may not be imported: the checkpoint brings its code
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out[path] = [type(model).__module__.split(".")[0], model(input_ids=ids, use_cache=False).logits.tolist()]
print(json.dumps(out))
"""


def test_per_layer_checkpoints_load_as_remote_code_without_the_kit(tmp_path):
    import transformers

    want = {}
    for arch in ARCHITECTURES:
        if arch == "qwen3" and not hasattr(transformers, "Qwen3Config"):
            continue
        model = tiny_model(arch)
        cut(model, **REMOVALS["all"])
        surgery.sync_config(model)
        save_checkpoint(model, None, tmp_path / arch)
        want[str(tmp_path / arch)] = logits(model)
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(IDS.tolist()), *want], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, expected in want.items():
        module, values = got[path]
        assert module == "transformers_modules"
        assert torch.equal(torch.tensor(values), expected), path


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lm_eval_loads_a_reloaded_per_layer_checkpoint(arch, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from methods.scoring import SMOKE_TASK, TaskSpec, run_tasks
    from methods.core.models import tokenizer_for
    from methods.core.smoke_model import smoke_model_dir

    tokenizer = tokenizer_for(str(smoke_model_dir()))
    model = tiny_model(arch, vocab_size=len(tokenizer))
    cut(model, heads=HEADS_KEPT, mlp=MLP_KEPT)
    surgery.sync_config(model)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    lm = HFLM(pretrained=str(tmp_path / "ckpt"), trust_remote_code=True, batch_size=4, device="cpu")
    assert type(lm.model).__name__ == type(model).__name__ == f"Lpc{type(model).__name__[3:]}"
    task = [TaskSpec(SMOKE_TASK, 0, "acc")]
    loaded = run_tasks(lm.model, tokenizer, task, batch_size=4, limit=3, per_request=True)
    in_memory = run_tasks(model, tokenizer, task, batch_size=4, limit=3, per_request=True)
    assert loaded[SMOKE_TASK]["loglikelihoods"] == in_memory[SMOKE_TASK]["loglikelihoods"]


# ----------------------------------------------------------------------------- what sets them apart

def test_gemma2_keeps_its_embedding_scale_after_hidden_channels_are_removed(tmp_path):
    model = tiny_model("gemma2")
    token = torch.tensor([[5]])
    row = model.get_input_embeddings().weight[5].detach().clone()

    def first_layer_input(m):
        seen = []
        handle = m.model.layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            m(input_ids=token, use_cache=False)
        handle.remove()
        return seen[0].reshape(-1)

    torch.testing.assert_close(first_layer_input(model), row * 32 ** 0.5)
    methods.prune(model, "minitron-width", torch.randint(3, 128, (2, 8)), device="cpu", hidden_size=20,
                  ffn_hidden_size=64)
    kept = model.get_input_embeddings().weight.shape[1]
    assert kept == 20 and model.config.embed_scale == pytest.approx(32 ** 0.5)
    save_checkpoint(model, None, tmp_path / "ckpt")
    reloaded, _ = load_model(str(tmp_path / "ckpt"), load_tokenizer=False)
    for m in (model, reloaded):
        scale = first_layer_input(m) / m.get_input_embeddings().weight[5]
        torch.testing.assert_close(scale, torch.full((20,), 32 ** 0.5), rtol=1e-6, atol=0)  # not sqrt(20)


def _replayed_and_own(model, calib):
    """Each layer's inputs as the calibration engine replays them, and as the model's own forward makes them."""
    replayed = []
    sequential_layers(model, calib, torch.device("cpu"), lambda i, layer, inputs: replayed.append(inputs.hidden.clone()))
    with torch.no_grad():
        own = [model(calib[i:i + 1], output_hidden_states=True, use_cache=False).hidden_states
               for i in range(calib.shape[0])]
    return replayed, [torch.cat([states[layer] for states in own]) for layer in range(len(replayed))]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_calibration_replays_the_sliding_window_masks_the_model_builds(arch):
    calib = torch.randint(3, 128, (3, 14), generator=torch.Generator().manual_seed(0))
    model = tiny_model(arch, num_hidden_layers=4)       # Gemma 2: sliding, full, sliding, full
    replayed, own = _replayed_and_own(model, calib)
    for layer, (a, b) in enumerate(zip(replayed, own)):
        assert torch.equal(a, b), f"layer {layer}"
    # The window matters at this length: without it every later layer's inputs differ.
    wide = tiny_model(arch, num_hidden_layers=4, sliding_window=64)
    assert not torch.allclose(_replayed_and_own(wide, calib)[0][1], replayed[1], atol=1e-3)


def unfused_llama(phi3):
    """The Llama that computes what a Phi-3 computes: qkv_proj and gate_up_proj split by rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = phi3.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    llama = LlamaForCausalLM(LlamaConfig(**{k: getattr(config, k) for k in keys}, tie_word_embeddings=False)).eval()
    q = config.num_attention_heads * 8
    kv = config.num_key_value_heads * 8
    state = {}
    for key, value in phi3.state_dict().items():
        if "qkv_proj" in key:
            for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, None))):
                state[key.replace("qkv_proj", f"{name}_proj")] = value[rows]
        elif "gate_up_proj" in key:
            for name, rows in (("gate", slice(0, config.intermediate_size)), ("up", slice(config.intermediate_size, None))):
                state[key.replace("gate_up_proj", f"{name}_proj")] = value[rows]
        else:
            state[key] = value
    llama.load_state_dict(state, strict=True)
    return llama


def test_phi3_fused_cuts_equal_the_cuts_of_its_unfused_equivalent():
    phi3 = tiny_model("phi3")
    llama = unfused_llama(phi3)
    torch.testing.assert_close(logits(llama), logits(phi3), rtol=1e-5, atol=1e-5)
    for model in (phi3, llama):
        cut(model, **REMOVALS["all"])
        surgery.sync_config(model)
    torch.testing.assert_close(logits(phi3), logits(llama), rtol=1e-5, atol=1e-5)
    layer = phi3.model.layers[0]
    assert layer.self_attn.qkv_proj.out_features == (2 + 2 * 1) * 8 and layer.mlp.gate_up_proj.out_features == 128


@pytest.mark.parametrize("name,options", [
    ("llm-pruner", {"pruning_ratio": 0.5, "layers": "0:3"}),
    ("llm-pruner", {"pruning_ratio": 0.25, "mode": "channel"}),
    ("wanda-sp", {"pruning_ratio": 0.5}),
    ("flap", {"pruning_ratio": 0.3}),
    ("minitron-width", {"hidden_size": 24, "ffn_hidden_size": 40, "num_heads": 2}),
])
def test_phi3_width_methods_choose_what_they_choose_on_the_unfused_equivalent(name, options):
    phi3 = tiny_model("phi3")
    llama = unfused_llama(phi3)
    calib = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    fused = methods.prune(phi3, name, calib, device="cpu", **options)
    unfused = methods.prune(llama, name, calib, device="cpu", **options)
    assert fused["layers"] == unfused["layers"] and fused.get("hidden_kept") == unfused.get("hidden_kept")
    torch.testing.assert_close(logits(phi3), logits(llama), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- refusals

def test_an_undeclared_architecture_is_refused_before_any_compute(tmp_path, capsys):
    from transformers import StableLmConfig, StableLmForCausalLM

    from repro.cli import main

    model = StableLmForCausalLM(StableLmConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UsageError, match="StableLmForCausalLM is not a supported decoder architecture "
                                         r"\(supported: llama, qwen2, qwen3, mistral, gemma2, phi3\)"):
        methods.prune(model, "wanda", torch.randint(0, 128, (2, 8)), sparsity_ratio=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.save_pretrained(tmp_path / "stablelm")
    capsys.readouterr()
    code = main(["prune", "--model", str(tmp_path / "stablelm"), "--method", "magnitude", "--sparsity-ratio", "0.5",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a supported decoder architecture" in err, err
    assert not (tmp_path / "out").exists()
