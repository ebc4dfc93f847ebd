"""Every method on every declared architecture, against the method's own rule.

The originals of the width methods are Llama-only, so the reference is each method's rule applied to
the dense model the way the original computes it for Llama: statistics from the model's own forward
(whole-model passes, batch 1, hooks on the stock modules named here), the scores and the selection
restated in plain torch, removals done by masking. Unit by unit, the kept units must be the method's
and the pruned model must compute what the masked one does. The sparse family is checked the same
way: the originals' layer-by-layer procedure run with the model's own forward, which is what the
calibration engine must reproduce whatever mask a layer gets (sliding, alternating).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods
from methods import sheared, sheared_model
from methods.scoring import perplexity
from methods.sparsity import Hessian, InputSquaredNorm, SparsityPattern, hessian_factor, sparsegpt_prune, wanda_mask
from tests.conftest import ARCHITECTURES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
HEADS, KV, DIM = 4, 2, {"qwen3": 16, "gemma2": 16}
# The norms that read the residual before attention and before the MLP, and the block-output norms.
INPUT_NORMS = {"gemma2": ("input_layernorm", "pre_feedforward_layernorm")}
OUTPUT_NORMS = {"gemma2": ("post_attention_layernorm", "post_feedforward_layernorm")}
OFFSET = {"gemma2": 1.0}


def head_dim(arch):
    return DIM.get(arch, 8)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def inputs_of(model, modules, calib=CALIB):
    """The inputs each module receives, one tensor [tokens, features] per calibration row, from the
    model's own forward (batch 1)."""
    seen = {name: [] for name in modules}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0][0].detach().clone()))
               for name, m in modules.items()]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def projections(arch, layer):
    """name -> (weight rows, gradient rows getter) of q, k, v, o, gate, up, down: views into a fused Linear
    for Phi-3, laid out as transformers' Phi3Attention / Phi3MLP split them."""
    attn, mlp = layer.self_attn, layer.mlp
    if arch != "phi3":
        return {p: getattr(attn if p in "qkvo" else mlp, f"{p}_proj").weight for p in ("q", "k", "v", "o", "gate", "up", "down")}
    q, kv, inter = attn.o_proj.in_features, (attn.qkv_proj.out_features - attn.o_proj.in_features) // 2, mlp.down_proj.in_features
    qkv, gate_up = attn.qkv_proj.weight, mlp.gate_up_proj.weight
    return {"q": qkv[:q], "k": qkv[q:q + kv], "v": qkv[q + kv:], "o": attn.o_proj.weight,
            "gate": gate_up[:inter], "up": gate_up[inter:], "down": mlp.down_proj.weight}


def uniform_keep(scores, ratio):
    threshold = torch.sort(scores)[0][int(ratio * scores.numel())]
    return [i for i, s in enumerate(scores.tolist()) if s >= threshold]


def zero_columns(linear, columns):
    with torch.no_grad():
        linear.weight[:, list(columns)] = 0


# ----------------------------------------------------------------------------- the sparse family

def sequential_reference(model, prune_linear):
    """The originals' procedure: layer by layer, each Linear's inputs from passes over the calibration rows
    through the model with its earlier layers already pruned, then the Linear pruned from them."""
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for name, xs in inputs_of(model, linears).items():
            prune_linear(linears[name], xs)


def _wanda(linear, xs):
    norm = InputSquaredNorm(linear.in_features, torch.device("cpu"))
    for x in xs:
        norm.add(x[None])
    linear.weight.data.masked_fill_(wanda_mask(linear.weight.data, norm.value, SparsityPattern(0.5)), 0)


def _sparsegpt(linear, xs):
    hessian = Hessian(linear.in_features, torch.device("cpu"))
    for x in xs:
        hessian.add(x[None])
    linear.weight.data = sparsegpt_prune(linear.weight.data, hessian_factor(hessian.value, 0.01),
                                         SparsityPattern(0.5), blocksize=128)


@pytest.mark.parametrize("name,reference", [("wanda", _wanda), ("sparsegpt", _sparsegpt)])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_sparse_family_reproduces_the_originals_procedure(arch, name, reference):
    model = tiny_model(arch, num_hidden_layers=4)
    expected = copy.deepcopy(model)
    methods.prune(model, name, CALIB, device="cpu", sparsity_ratio=0.5)
    sequential_reference(expected, reference)
    for (key, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), key


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_magnitude_prunes_every_stored_linear_by_its_own_threshold(arch):
    model = tiny_model(arch)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    report = methods.prune(model, "magnitude", None, sparsity_ratio=0.5, exact_count=True)
    assert set(report["sparsity"]) == set(weights)  # Phi-3: qkv_proj and gate_up_proj, one matrix each
    for name, weight in weights.items():
        kept = dict(model.named_modules())[name].weight != 0
        assert int((~kept).sum()) == weight.numel() // 2
        assert weight.abs()[kept].min() >= weight.abs()[~kept].max()


# ----------------------------------------------------------------------------- width methods

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wanda_sp_keeps_what_its_rule_keeps_layer_by_layer(arch):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    report = methods.prune(model, "wanda-sp", CALIB, device="cpu", pruning_ratio=0.5)
    dim = head_dim(arch)
    for index, layer in enumerate(reference.model.layers):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        seen = inputs_of(reference, {"o": o, "down": down})   # earlier layers already masked: sequential
        scores = {}
        for name, linear in (("o", o), ("down", down)):
            norm = torch.stack([x.pow(2).sum(0) for x in seen[name]]).mean(0)
            scores[name] = (linear.weight.abs() * norm.sqrt()).mean(0).detach()
        groups = scores["o"].view(HEADS, dim).sum(1).view(KV, HEADS // KV).sum(1)
        kept_groups, kept_channels = uniform_keep(groups, 0.5), uniform_keep(scores["down"], 0.5)
        entry = report["layers"][index]
        assert entry["kv_heads_kept"] == kept_groups and entry["mlp_channels_kept"] == kept_channels
        torch.testing.assert_close(torch.tensor(report["scores"]["heads"][index]), groups, rtol=1e-5, atol=1e-6)
        removed = [g for g in range(KV) if g not in kept_groups]
        zero_columns(o, [c for g in removed for c in range(g * (HEADS // KV) * dim, (g + 1) * (HEADS // KV) * dim)])
        zero_columns(down, [c for c in range(down.in_features) if c not in kept_channels])
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def _flap_fluctuation(xs):
    """FLAP's per-channel baseline and its running fluctuation (the original's aliased update), float64."""
    mean = torch.zeros(xs[0].shape[1], dtype=torch.float64)
    fluc = torch.zeros_like(mean)
    for n, x in enumerate(xs):
        x = x.double()
        mean = mean * n / (n + 1) + x.mean(0) / (n + 1)
        if n > 0:
            fluc = fluc * (n - 1) / n + ((x - mean) ** 2).sum(0) / (n + 1)
    return mean, fluc


def _standardize(values):
    return (values - values.mean()) / values.std()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flap_scores_the_dense_fluctuation_and_compensates_what_it_removes(arch):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    report = methods.prune(model, "flap", CALIB, device="cpu", pruning_ratio=0.3)
    dim, threshold = head_dim(arch), report["threshold"]
    linears = {f"{i}.{n}": getattr(layer.self_attn if n == "o" else layer.mlp, f"{n}_proj")
               for i, layer in enumerate(reference.model.layers) for n in ("o", "down")}
    seen = inputs_of(reference, linears)                       # all from the dense model
    for index in range(len(reference.model.layers)):
        kept = {}
        for name in ("o", "down"):
            linear = linears[f"{index}.{name}"]
            baseline, fluc = _flap_fluctuation(seen[f"{index}.{name}"])
            metric = (fluc * linear.weight.detach().double().pow(2).sum(0)).float()
            if name == "o":
                score = _standardize(metric ** 2).view(KV, HEADS // KV * dim).mean(1)
                reported = report["scores"]["heads"][index]
            else:
                score = _standardize(metric)
                reported = report["scores"]["mlp_channels"][index]
            torch.testing.assert_close(torch.tensor(reported), score, rtol=1e-4, atol=1e-4)
            kept[name] = [u for u, s in enumerate(reported) if s > threshold]
            columns = [c for c in range(linear.in_features)
                       if (c // (HEADS // KV * dim) if name == "o" else c) not in kept[name]]
            with torch.no_grad():
                bias = linear.weight[:, columns] @ baseline[columns].to(linear.weight.dtype)
                linear.bias = nn.Parameter(bias if linear.bias is None else linear.bias + bias)
            zero_columns(linear, columns)
        assert report["layers"][index]["kv_heads_kept"] == kept["o"]
        assert report["layers"][index]["mlp_channels_kept"] == kept["down"]
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)


def _llm_pruner(arch, **options):
    """LLM-Pruner's report, and the dense model holding the gradients of its loss on the calibration batch."""
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    report = methods.prune(model, "llm-pruner", CALIB, device="cpu", **options)
    reference(input_ids=CALIB, labels=CALIB, use_cache=False).loss.backward()
    return report, reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llm_pruner_block_mode_ranks_by_first_order_taylor_salience(arch):
    report, reference = _llm_pruner(arch, pruning_ratio=0.5, layers="0:3")
    dim, fold = head_dim(arch), HEADS // KV
    for index, layer in enumerate(reference.model.layers):
        weights = projections(arch, layer)
        grads = projections(arch, _grads_of(layer))
        salience = {p: (weights[p] * grads[p]).abs().detach() for p in weights}
        # Root k (GQA): k, v rows; q rows and o columns folded onto key/value channels by the stride.
        channels = salience["k"].sum(1) + salience["v"].sum(1) + \
            salience["q"].sum(1).view(fold, KV * dim).sum(0) + salience["o"].sum(0).view(fold, KV * dim).sum(0)
        units = channels.view(KV, dim).sum(1)
        mlp = salience["gate"].sum(1) + salience["up"].sum(1) + salience["down"].sum(0)
        torch.testing.assert_close(torch.tensor(report["scores"]["heads"][str(index)]), units, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(report["scores"]["mlp_channels"][str(index)]), mlp, rtol=1e-4, atol=1e-6)
        entry = report["layers"][index]
        assert entry["kv_heads_kept"] == [int(torch.argmax(units))]
        assert entry["mlp_channels_kept"] == sorted(torch.argsort(mlp)[32:].tolist())


def _grads_of(layer):
    """A copy of the layer whose weights are the original's gradients (so `projections` slices them alike)."""
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for (_, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
            q.copy_(p.grad)
    return twin


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llm_pruner_channel_mode_scores_every_member_of_the_hidden_dimension(arch):
    report, reference = _llm_pruner(arch, pruning_ratio=0.25, mode="channel")
    offset = OFFSET.get(arch, 0.0)
    embed = reference.get_input_embeddings().weight
    score = (embed * embed.grad).abs().sum(0)
    norms = [m.weight for n, m in reference.named_modules() if n.endswith("norm") and ".self_attn." not in n]
    for weight in norms:  # a Gemma norm by the scale it applies, 1 + w
        score = score + ((weight + offset) * weight.grad).abs()
    for layer in reference.model.layers:
        weights, grads = projections(arch, layer), projections(arch, _grads_of(layer))
        for p in weights:
            salience = (weights[p] * grads[p]).abs()
            score = score + (salience.sum(1) if p in ("o", "down") else salience.sum(0))
    head = reference.get_output_embeddings().weight
    score = score + (head * head.grad).abs().sum(0)
    torch.testing.assert_close(torch.tensor(report["scores"]["hidden_channels"]), score.detach(), rtol=1e-4, atol=1e-6)
    assert report["hidden_kept"] == sorted(torch.argsort(score)[8:].tolist())
    assert len(norms) == 3 * (4 if arch == "gemma2" else 2) + 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_minitron_width_ranks_by_the_activations_of_the_norms_that_feed_each_block(arch):
    model = tiny_model(arch)
    report = methods.prune(copy.deepcopy(model), "minitron-width", CALIB, device="cpu", hidden_size=24,
                           ffn_hidden_size=40, num_heads=2)
    names = INPUT_NORMS.get(arch, ("input_layernorm", "post_attention_layernorm"))
    watched = {f"{i}.{n}": getattr(layer, n) for i, layer in enumerate(model.model.layers) for n in names}
    outputs = {name: [] for name in watched}
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: outputs[name].append(out[0].detach()))
               for name, m in watched.items()]
    linears = {f"{i}.{n}": getattr(layer.self_attn if n == "o" else layer.mlp, f"{n}_proj")
               for i, layer in enumerate(model.model.layers) for n in ("o", "down")}
    seen = inputs_of(model, linears)
    for handle in handles:
        handle.remove()
    hidden = sum(x.pow(2).sum(0) for xs in outputs.values() for x in xs)
    assert report["hidden_kept"] == torch.sort(hidden, descending=True).indices[:24].tolist()
    dim = head_dim(arch)
    for index, entry in enumerate(report["layers"]):
        mlp = sum(x.pow(2).sum(0) for x in seen[f"{index}.down"])
        assert entry["mlp_channels_kept"] == torch.sort(mlp, descending=True).indices[:40].tolist()
        heads = sum(x.pow(2).sum(0) for x in seen[f"{index}.o"]).view(HEADS, dim).norm(dim=1)
        best = [max(range(g * 2, g * 2 + 2), key=lambda h: float(heads[h])) for g in range(KV)]
        assert entry["heads_kept"] == best


TARGET = {"hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
          "intermediate_size": 40}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sheared_gates_fold_and_prune_to_exactly_the_masked_model(arch):
    model = tiny_model(arch)
    plain = logits(model)
    masking = sheared_model.Masking(model, mask_embedding=True)
    ones = sheared_model.Zs(torch.ones(3, KV), torch.ones(3, 64), torch.ones(3), torch.ones(32))
    with masking.using(ones):  # every gate open: the masked norms are the stock norms
        torch.testing.assert_close(logits(model), plain, rtol=1e-5, atol=1e-5)
    gates = sheared_model.Gates(sheared.shape_of(model.config), sheared.head_dim_of(model.config),
                          sheared.target_for(model.config, TARGET), warmup_steps=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=generator) * 3)
    with masking.using(gates.deterministic(target=True)):
        masked = logits(model)
    masking.remove()
    report = methods.prune(model, "sheared", state=gates, target_shape=TARGET, fold_hidden_into_lm_head=False,
                           mask_embedding=True)
    assert len(report["layers_removed"]) == 1 and len(report["hidden_kept"]) == 24
    torch.testing.assert_close(logits(model), masked, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- depth methods

def skipping(model, layers):
    """The model with `layers` passing their input through (masking a removal)."""
    masked = copy.deepcopy(model)

    def identity(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    for index in layers:
        masked.model.layers[index].register_forward_hook(identity, with_kwargs=True)
    return masked


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shortgpt_removes_the_layers_whose_output_is_closest_to_their_input(arch):
    model = tiny_model(arch, num_hidden_layers=4)
    dense = copy.deepcopy(model)
    report = methods.prune(model, "shortgpt", CALIB, device="cpu", remove_layers=2)
    scores = []
    for layer in dense.model.layers:
        pairs = []
        handle = layer.register_forward_hook(
            lambda _m, args, kwargs, out: pairs.append((args[0] if args else kwargs["hidden_states"],
                                                        out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        with torch.no_grad():
            for row in CALIB:
                dense(input_ids=row[None], use_cache=False)
        handle.remove()
        scores.append(sum(1 - torch.cosine_similarity(a.float(), b.float(), dim=-1).mean().item() for a, b in pairs) / 4)
    assert report["scores"]["block_influence"] == pytest.approx(scores, rel=1e-5)
    assert report["layers_removed"] == sorted(sorted(range(4), key=lambda i: scores[i])[:2])
    torch.testing.assert_close(logits(model), logits(skipping(dense, report["layers_removed"])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_minitron_depth_and_shortened_score_each_candidate_as_its_removal(arch):
    dense = tiny_model(arch, num_hidden_layers=4)
    model = copy.deepcopy(dense)
    report = methods.prune(model, "minitron-depth", CALIB, device="cpu", remove_layers=2)
    candidates = [perplexity(skipping(dense, [i, i + 1]), CALIB, "minitron") for i in range(3)]
    assert report["scores"]["candidates"] == pytest.approx(candidates, rel=1e-5)
    torch.testing.assert_close(logits(model), logits(skipping(dense, report["layers_removed"])), rtol=1e-5, atol=1e-5)
    model = copy.deepcopy(dense)
    report = methods.prune(model, "shortened", CALIB, device="cpu", criterion="ppl", remove_layers=1,
                           plus_heuristic=False)
    blocks = [perplexity(skipping(dense, [i]), CALIB, "rows") for i in range(4)]
    assert report["scores"]["block"] == pytest.approx(blocks, rel=1e-5)
    torch.testing.assert_close(logits(model), logits(skipping(dense, report["layers_removed"])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shortened_taylor_sums_every_weight_of_a_block_norms_by_the_scale_they_apply(arch):
    dense = tiny_model(arch)
    report = methods.prune(copy.deepcopy(dense), "shortened", CALIB, device="cpu", criterion="taylor",
                           remove_layers=1, plus_heuristic=False)
    dense.zero_grad()
    dense(input_ids=CALIB, labels=CALIB, use_cache=False).loss.backward()
    offset = OFFSET.get(arch, 0.0)
    want = []
    for layer in dense.model.layers:
        total = 0.0
        for name, p in layer.named_parameters():
            if "weight" in name:
                scale = p + offset if name.endswith("norm.weight") and ".self_attn." not in f".{name}" else p
                total += float((scale * p.grad).abs().sum().detach())
        want.append(total)
    assert report["scores"]["block"] == pytest.approx(want, rel=1e-4)
