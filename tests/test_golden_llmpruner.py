"""Golden equivalence with the original LLM-Pruner (horseee/LLM-Pruner @ 128a07d).

Every run of the LLM-Pruner manifests in the golden folder is replayed from the manifest's own
settings (model, ratio, layer range, number of calibration rows, importance type): the kept heads,
key/value heads and MLP channels of every layer must be identical, the group importances the
original ranked must agree within 1e-4 relative, and the eval perplexity within 1e-3 relative.
Runs the original could not complete (its `failures`) must be refused with a UsageError when the
cause is a ratio that removes less than one head; a GQA checkpoint that only `hf_prune.py`'s
vendored (MHA-only) Llama cannot load is no failure of the method, and is skipped.

Random importance: the original draws `torch.rand(channels)` per group from the global generator,
in layer order, attention before MLP, after `set_random_seed(seed)` and nothing else that draws
(the manifests' runs have `test_before_train` off; its sampled generation would consume the
generator first). Seeding torch with the run's seed right before pruning therefore reproduces the
draw, and the kept sets are asserted exactly; for a run that generated text first, only the counts
are guaranteed and only they are checked.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import methods
from methods.core.errors import UsageError
from methods.scoring import perplexity
from methods.core.compat import dtype_kwarg
from tests.conftest import golden_manifests, golden_params, golden_path

TAYLOR = {"param_first": "element1", "param_second": "element2", "vectorize": "vector", "param_mix": "param_mix"}


MANIFESTS = "llmpruner*manifest*.json"


def _runs():
    runs = []
    for path in golden_manifests(MANIFESTS):
        manifest = json.loads(path.read_text())
        for name, run in manifest["runs"].items():
            runs.append(pytest.param(dict(run, name=name, settings=manifest["settings"]), id=name))
    return golden_params(runs, MANIFESTS)


def _failures():
    out = []
    for path in golden_manifests(MANIFESTS):
        manifest = json.loads(path.read_text())
        for name, failure in (manifest.get("failures") or {}).items():
            out.append(pytest.param(dict(name=name, failure=failure, settings=manifest["settings"]), id=name))
    return golden_params(out, MANIFESTS)


def _setting(run: dict, key: str):
    args = run.get("args") or {}
    if key in args:
        return args[key]
    settings = run.get("settings", {})
    if key.startswith("block_attention_layer_"):
        pair = settings.get("block_attention_layer_start/end")
        return pair[0] if key.endswith("start") else pair[1]
    return settings[key]


def _options(run: dict) -> dict:
    pruner = run.get("pruner_type") or _setting(run, "pruner_type")
    taylor = run.get("taylor") or (run.get("args") or {}).get("taylor")
    importance = TAYLOR[taylor] if pruner == "taylor" else pruner
    start = _setting(run, "block_attention_layer_start")
    end = _setting(run, "block_attention_layer_end")
    args = run.get("args") or {}
    # The kit prunes attention and MLP over one range, as every run of the original here does.
    assert (args.get("block_mlp_layer_start", start), args.get("block_mlp_layer_end", end)) == (start, end)
    return {"pruning_ratio": float(_setting(run, "pruning_ratio")), "importance": importance,
            "layers": f"{start}:{end}"}


@pytest.fixture(scope="module")
def data():
    return torch.load(golden_path("calib.pt"), weights_only=True), torch.load(golden_path("eval.pt"), weights_only=True)


def _load(name: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(golden_path(name)), **dtype_kwarg(torch.float32))


def _close(got, want, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, (what, np.abs(got - want).max() / scale)


@pytest.mark.parametrize("run", _runs())
def test_matches_original(run, data):
    calib, evaluation = data
    model = _load(run["model"])
    options = _options(run)
    examples = int(_setting(run, "num_examples"))
    torch.manual_seed(int(_setting(run, "seed")))
    report = methods.prune(model, "llm-pruner", calib[:examples], device="cpu", **options)
    expected = np.load(golden_path("expected", next(f for f in run["files"] if f.endswith(".npz"))))
    exact = options["importance"] != "random" or not (run.get("args") or {}).get("test_before_train")
    for index, layer in enumerate(report["layers"]):
        for key in ("heads_kept", "kv_heads_kept", "mlp_channels_kept"):
            want = expected[f"layer{index}/{key}"].tolist()
            if exact:
                assert layer[key] == want, (index, key)
            else:
                assert len(layer[key]) == len(want), (index, key)
    if "n_params_after" in run:
        assert report["parameters"]["pruned"] == run["n_params_after"]
        assert report["parameters"]["dense"] == run["n_params_before"]
    start, end = (int(x) for x in options["layers"].split(":"))
    for index in range(start, end):
        prefix = f"model.layers.{index}."
        grouped = [k for k in expected.files if k.startswith(f"importance_grouped/{prefix}self_attn.")]
        mlp = f"importance/{prefix}mlp.gate_proj"
        assert len(grouped) == 1, grouped
        if exact:
            _close(report["scores"]["heads"][str(index)], expected[grouped[0]], grouped[0])
            _close(report["scores"]["mlp_channels"][str(index)], expected[mlp], mlp)
    if exact:
        assert perplexity(model, evaluation, "rows") == pytest.approx(float(run["eval_ppl"]), rel=1e-3)


@pytest.mark.parametrize("case", _failures())
def test_refuses_what_the_original_cannot_do(case, data):
    text = json.dumps(case["failure"])
    if "non-empty list" not in text:
        pytest.skip(f"not a method failure: {text[:120]}")
    calib, _ = data
    run = dict(case["failure"]) if isinstance(case["failure"], dict) else {}
    run.setdefault("settings", case["settings"])
    model = _load(run.get("model") or case["name"].split("__")[1])
    options = _options({**run, "pruner_type": run.get("pruner_type") or _pruner_from_name(case["name"]),
                        "taylor": run.get("taylor") or _taylor_from_name(case["name"])})
    with pytest.raises(UsageError, match="fewer than one head"):
        methods.prune(model, "llm-pruner", calib, device="cpu", **options)


def _pruner_from_name(name: str) -> str:
    kind = name.split("__")[3]
    return "taylor" if kind.startswith("taylor_") else kind


def _taylor_from_name(name: str):
    kind = name.split("__")[3]
    names = {"element1": "param_first", "element2": "param_second", "vector": "vectorize", "param_mix": "param_mix"}
    return names.get(kind[len("taylor_"):]) if kind.startswith("taylor_") else None
