"""Golden equivalence with princeton-nlp/LLM-Shearing (golden/sheared/README.md).

Every `sheared/sheared_manifest__*.json` is replayed: it names its base model folder (relative to
the golden root), the target shape, the seeds' outputs (z_loga, eps), the lambdas and the steps, so
fixtures of other shapes in the same format replay the same way. Compared: the gate maths (Q(0),
expected scores and sparsities, expected size, the target ramp, the Lagrangian, sampled and
deterministic gates, the untargeted variant), the masked forward of a Hugging Face Llama (the
original's explicit path and its integrated path, which leaves the embedding unmasked), the
gradients of CE + Lagrangian, the fold and removal (kept units exact, weights, logits), and the
proportion update of dynamic batch loading. Numbers within 1e-5 relative, index sets exactly.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import methods
from methods import sheared, sheared_model
from methods.core.compat import dtype_kwarg
from tests.conftest import GOLDEN, golden_manifests, golden_params, golden_path
from training.data import update_proportions

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-5
# Composer's parameter names in the fixtures -> the Hugging Face Llama's.
COMPOSER_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "output": "lm_head", "ln_1": "input_layernorm",
                  "ln_2": "post_attention_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
                  "attn.wv": "self_attn.v_proj", "attn.out_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj",
                  "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}
ZS_KEYS = {"head": "head_z", "intermediate": "intermediate_z", "layer": "mlp_z", "hidden": "hidden_z"}


PATTERN = "sheared_manifest__*.json"


def _manifests():
    return [json.loads(p.read_text()) for p in golden_manifests(PATTERN, "sheared")]


MANIFESTS = _manifests()
CASES = golden_params(MANIFESTS, PATTERN, "sheared")


def test_manifests_are_found():
    golden_path("sheared")
    assert MANIFESTS, f"no sheared_manifest__*.json under {GOLDEN / 'sheared'}"


def _ids(manifest):
    return f"{manifest['split']}-{manifest['tag']}"


def _npz(manifest, prefix):
    names = [n for n in manifest["files"] if n.startswith(prefix) and n.endswith(".npz")]
    assert len(names) == 1, (prefix, names)
    return np.load(golden_path("sheared", names[0]))


def _close(got, want, rel=REL, scale=False):
    got = np.asarray(got.detach() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.size == want.size, (got.shape, want.shape)
    got, want = got.reshape(want.shape), want
    # Arrays that mix large and near-zero entries (logits, gradients) are compared at their own scale.
    atol = rel * float(np.abs(want).max()) if scale and want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rel, atol=atol)


def _target(manifest) -> dict:
    t = manifest["config"]["target"]
    return {"hidden_size": t["d_model"], "num_attention_heads": t["n_heads"], "num_key_value_heads": t["n_heads"],
            "num_hidden_layers": t["n_layers"], "intermediate_size": t["intermediate_size"]}


def _warmup(manifest) -> int:
    text = manifest["config"]["lagrangian_warmup_steps"]
    assert text.endswith("ba"), text
    return int(text[:-2])


def _model(manifest):
    from transformers import LlamaForCausalLM

    path = golden_path(manifest["model_dir"])
    model = LlamaForCausalLM.from_pretrained(str(path), **dtype_kwarg(torch.float32)).eval()
    model.config.use_cache = False
    return model


def _gates(manifest, model, *, targeted=True) -> sheared_model.Gates:
    arrays = _npz(manifest, "sheared_l0__")
    config = manifest["config"]
    source, head_dim = sheared.shape_of(model.config), sheared.head_dim_of(model.config)
    if targeted:
        gates = sheared_model.Gates(source, head_dim, sheared.target_for(model.config, _target(manifest)),
                              warmup_steps=_warmup(manifest), start_sparsity=config["start_sparsity"])
    else:
        gates = sheared_model.Gates(source, head_dim, target_sparsity=config["untargeted_target_sparsity"],
                              warmup_steps=_warmup(manifest), start_sparsity=config["start_sparsity"])
    with torch.no_grad():
        for m in sheared.GATE_SETS:
            gates.log_alpha[m].copy_(torch.from_numpy(arrays[f"z_loga_raw/{m}"]))
        for name, value in config["lambdas"].items():
            if name in gates.lambdas:
                gates.lambdas[name].fill_(value)
    gates.constrain()  # the fixtures clamp the raw log-alphas once, as the original's module does
    return gates


def _eps(manifest):
    arrays = _npz(manifest, "sheared_l0__")
    return {m: torch.from_numpy(arrays[f"eps/{m}"]) for m in sheared.GATE_SETS}


def _eval_rows():
    return torch.from_numpy(np.load(golden_path("eval.npy"))).long()


def _assert_zs(zs: sheared_model.Zs, arrays, prefix):
    for m in sheared.GATE_SETS:
        _close(getattr(zs, m), arrays[f"{prefix}/{ZS_KEYS[m]}"])
    _close(zs.layer, arrays[f"{prefix}/head_layer_z"])


# ----------------------------------------------------------------------------- gate maths

@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_gate_maths(manifest):
    arrays = _npz(manifest, "sheared_l0__")
    model = _model(manifest)
    gates = _gates(manifest, model)
    for m in sheared.GATE_SETS:
        _close(gates.log_alpha[m], arrays[f"z_loga/{m}"])
        _close(gates.cdf_qz(m), arrays[f"cdf_qz/{m}"])
        _close(gates.expected_score(m), arrays[f"expected_score/{m}"])
        _close(gates.expected_sparsity(m), arrays[f"expected_sparsity/{m}"])
        for step in [0, *manifest["config"]["steps"]]:
            assert gates.target_sparsity_at(step, m) == pytest.approx(float(arrays[f"target_sparsity/{m}/step{step}"]),
                                                                      rel=1e-12)
    assert gates.prunable_size == int(arrays["prunable_model_size"])
    assert sheared.prunable_size(gates.target, gates.head_dim) == int(arrays["prunable_target_model_size"])
    assert gates.full_target_sparsity() == pytest.approx(float(arrays["target_sparsity_overall"]), rel=1e-12)
    _close(gates.expected_parameters(), arrays["expected_num_params"])
    _close(gates.expected_overall_sparsity(), arrays["expected_sparsity_overall"])
    for step in manifest["config"]["steps"]:
        _close(gates.lagrangian(step), arrays[f"lagrangian_loss/step{step}"])
    sampled = gates.sample(_eps(manifest))
    for m in sheared.GATE_SETS:
        _close(getattr(sampled, m), arrays[f"sample_z/{m}"])
        _close(getattr(gates.deterministic(target=True), m), arrays[f"deterministic_z_target/{m}"])
        _close(getattr(gates.deterministic(target=False), m), arrays[f"deterministic_z_current/{m}"])
    _assert_zs(sampled, arrays, "zs_train")
    _assert_zs(gates.deterministic(target=True), arrays, "zs_eval_target")
    _assert_zs(gates.deterministic(target=False), arrays, "zs_eval_current")


@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_untargeted_gate_maths(manifest):
    arrays = _npz(manifest, "sheared_l0__")
    gates = _gates(manifest, _model(manifest), targeted=False)
    assert gates.prunable_size == int(arrays["untargeted/prunable_model_size"])
    _close(gates.expected_parameters(), arrays["untargeted/expected_num_params"])
    for step in manifest["config"]["steps"]:
        _close(gates.lagrangian(step), arrays[f"untargeted/lagrangian_loss/step{step}"])
    _assert_zs(gates.deterministic(target=False), arrays, "untargeted/zs_eval")


# ----------------------------------------------------------------------------- masked forward

def _logits(model, zs, *, mask_embedding):
    masking = sheared_model.Masking(model, mask_embedding=mask_embedding)
    try:
        with torch.no_grad(), masking.using(zs):
            return model(input_ids=_eval_rows()).logits
    finally:
        masking.remove()


def _ce(logits, ids):
    from training.losses import lm_loss

    return float(lm_loss(logits, ids))


@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_masked_forward(manifest):
    forward = _npz(manifest, "sheared_forward__")
    model = _model(manifest)
    gates = _gates(manifest, model)
    ids = _eval_rows()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    _close(dense, forward["logits/dense"], scale=True)
    assert _ce(dense, ids) == pytest.approx(float(forward["ce_loss/dense"]), rel=REL)
    # The original's explicit path: the gates passed in, the embedding masked too.
    cases = {"det_target": gates.deterministic(target=True), "det_current": gates.deterministic(target=False),
             "sampled": gates.sample(_eps(manifest))}
    for case, zs in cases.items():
        logits = _logits(model, zs, mask_embedding=True)
        _close(logits, forward[f"logits/{case}"], scale=True)
        assert _ce(logits, ids) == pytest.approx(float(forward[f"ce_loss/{case}"]), rel=REL)
    # Its integrated path (the shearing run's own forward): the embedding is left unmasked.
    for mode, zs in (("integrated_eval", cases["det_target"]), ("integrated_train", cases["sampled"])):
        logits = _logits(model, zs, mask_embedding=False)
        _close(logits, forward[f"{mode}/logits"], scale=True)
        for step in manifest["config"]["steps"]:
            ce = _ce(logits, ids)
            lag = float(gates.lagrangian(step).detach())
            assert ce == pytest.approx(float(forward[f"{mode}/ce_loss/step{step}"]), rel=REL)
            assert lag == pytest.approx(float(forward[f"{mode}/lag_loss/step{step}"]), rel=REL)
            assert ce + lag == pytest.approx(float(forward[f"{mode}/total/step{step}"]), rel=REL)


@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_gradients_of_the_objective(manifest):
    from training.losses import lm_loss

    grads = _npz(manifest, "sheared_grad__")
    model = _model(manifest)
    model.requires_grad_(False)
    ids = _eval_rows()
    masking = sheared_model.Masking(model, mask_embedding=False)
    try:
        for step in manifest["config"]["steps"]:
            for which, with_ce in (("total_loss_grad", True), ("lag_grad", False)):
                gates = _gates(manifest, model)
                lag = gates.lagrangian(step)
                _close(lag, grads[f"lagrangian_loss/step{step}"])
                loss = lag
                if with_ce:
                    with masking.using(gates.sample(_eps(manifest))):
                        loss = loss + lm_loss(model(input_ids=ids).logits, ids)
                loss.backward()
                for m in sheared.GATE_SETS:
                    _close(gates.log_alpha[m].grad, grads[f"{which}/step{step}/z_loga/{m}"], scale=True)
                for name, p in gates.lambdas.items():
                    _close(p.grad, grads[f"{which}/step{step}/{name}"])
    finally:
        masking.remove()


# ----------------------------------------------------------------------------- fold and removal

@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_fold_and_removal(manifest, tmp_path):
    pruned = _npz(manifest, "sheared_prune__")
    model = _model(manifest)
    gates = _gates(manifest, model)
    _assert_zs(gates.deterministic(target=True), pruned, "zs")
    layers = model.config.num_hidden_layers
    report = methods.prune(model, "sheared", state=gates, target_shape=_target(manifest))
    assert report["layers_removed"] == pruned["layers_removed"].tolist()
    assert [i for i in range(layers) if i not in report["layers_removed"]] == pruned["layers_kept"].tolist()
    assert report["hidden_kept"] == pruned["hidden_kept"].tolist()
    for i, entry in enumerate(report["layers"]):
        assert entry["heads_kept"] == pruned[f"heads_kept/layer{i}"].tolist(), i
        assert entry["mlp_channels_kept"] == pruned[f"intermediate_kept/layer{i}"].tolist(), i
    state = model.state_dict()
    for key in pruned.files:
        if not key.startswith("param/"):
            continue
        name = key[len("param/model.transformer."):]
        parts = name.split(".")
        if parts[0] == "blocks":
            ours = f"model.layers.{parts[1]}.{COMPOSER_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"
        else:
            ours = f"{COMPOSER_NAMES[parts[0]]}.{parts[-1]}"
        assert list(state[ours].shape) == pruned[f"shape/{key[len('param/'):]}"].tolist(), ours
        _close(state[ours], pruned[key], scale=True)
    # The pruned model is a plain Llama of the target shape, and reloads to the original's logits.
    target = _target(manifest)
    for name, value in target.items():
        assert getattr(model.config, name) == value, name
    assert model.config.model_type == "llama"
    model.save_pretrained(tmp_path / "pruned")
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "pruned"), **dtype_kwarg(torch.float32)).eval()
    ids = _eval_rows()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    _close(logits, pruned["logits/pruned_hf"], scale=True)
    _close(logits, pruned["logits/pruned_target_model"], scale=True)
    assert _ce(logits, ids) == pytest.approx(float(pruned["ce_loss/pruned_target_model"]), rel=REL)


@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_the_corrected_lm_head_fold_gives_the_masked_models_logits(manifest):
    forward = _npz(manifest, "sheared_forward__")
    model = _model(manifest)
    gates = _gates(manifest, model)
    methods.prune(model, "sheared", state=gates, target_shape=_target(manifest), fold_hidden_into_lm_head=False)
    with torch.no_grad():
        logits = model(input_ids=_eval_rows()).logits
    _close(logits, forward["logits/det_target"], scale=True)


# ----------------------------------------------------------------------------- dynamic batch loading

@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_proportion_updates(manifest):
    dyn = manifest["config"]["dynload"]
    arrays = _npz(manifest, "sheared_dynload__")
    rules = sorted({key.split("/")[0] for key in arrays.files if key.endswith("/new_proportion")})
    assert rules, "no proportion updates in the fixture"
    initial, reference = dyn["proportion"], dyn["target_loss"]
    for rule in rules:
        for case, losses in dyn["cases"].items():
            _close(arrays[f"{rule}/{case}/losses"], losses)
            got = update_proportions(initial, losses, reference, rule=rule)
            _close(got, arrays[f"{rule}/{case}/new_proportion"])
            assert abs(sum(got) - 1) < 1e-12
        current = initial
        for j, case in enumerate(dyn["chain"]):
            current = update_proportions(current, dyn["cases"][case], reference, rule=rule)
            _close(current, arrays[f"{rule}/chain/step{j}"])


@pytest.mark.parametrize("manifest", CASES, ids=_ids)
def test_the_papers_clipped_rule_ignores_losses_below_the_reference(manifest):
    dyn = manifest["config"]["dynload"]
    initial, reference = dyn["proportion"], dyn["target_loss"]
    below = [r - 0.05 * (i + 1) for i, r in enumerate(reference)]  # unequal: a uniform shift cancels
    unclipped = update_proportions(initial, below, reference, rule="doremi")
    clipped = update_proportions(initial, below, reference, rule="doremi", clip=True)
    equal = update_proportions(initial, reference, reference, rule="doremi")
    _close(clipped, equal)
    assert not np.allclose(unclipped, clipped, rtol=0, atol=1e-9)
