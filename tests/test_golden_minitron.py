"""Golden equivalence with the LLM Pruning Collection's `pruning/minitron`.

Every run of every minitron_collection manifest is replayed (driven by the manifests, so held-out
models such as the GQA fixture replay the same way): `bi` runs through ShortGPT's collection
variant, `depth` through Minitron-depth's block scan, `width` through Minitron-width. The scorer is
the collection's perplexity on calib.pt, one row per window (calib_size 16, max_length 64).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

import methods
from methods.scoring import perplexity
from methods.core.compat import dtype_kwarg
from tests.conftest import golden_params, golden_path, manifest_runs

REL_SCORE = 1e-4
REL_PPL = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")
MANIFESTS = "minitron_collection_manifest*.json"


def _runs():
    return [dict(run, model=model, name=name, npz=npz)
            for model, name, run, npz in manifest_runs(MANIFESTS)]


RUNS = _runs()


def _array(run, field):
    """An array field from the run's .npz (full precision), else from the manifest."""
    if run["npz"]:
        arrays = np.load(golden_path("expected", run["npz"]))
        key = f"{run['model']}/{run['name']}/{field}"
        if key in arrays.files:
            return arrays[key]
    return np.asarray(run[field])


@pytest.fixture(scope="module")
def data():
    calib = torch.load(golden_path("calib.pt"), weights_only=True)
    evaluation = torch.load(golden_path("eval.pt"), weights_only=True)
    return calib, evaluation


def _model(name):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(golden_path(name)), **dtype_kwarg(torch.float32)).eval()


def _close(got, want, rel):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=0)


def test_manifests_are_found():
    assert {r["mode"] for r in RUNS} == {"bi", "depth", "width"}


@pytest.mark.parametrize("run", golden_params(RUNS, MANIFESTS), ids=lambda r: f"{r['model']}-{r['name']}")
def test_matches_the_collection(run, data):
    calib, evaluation = data
    model = _model(run["model"])
    depth_total = model.config.num_hidden_layers
    assert perplexity(model, calib, "minitron") == pytest.approx(run["calib_ppl_baseline"], rel=REL_SCORE)
    if run["mode"] == "bi":
        report = methods.prune(model, "shortgpt", calib, device="cpu",
                               remove_layers=depth_total - run["num_layers"])
        _close(report["scores"]["block_influence"], _array(run, "bi_scores"), REL_SCORE)
        assert report["layers_removed"] == _array(run, "layer_idx_to_drop").tolist()
    elif run["mode"] == "depth":
        report = methods.prune(model, "minitron-depth", calib, device="cpu",
                               remove_layers=depth_total - run["num_layers"])
        assert report["scores"]["metric"] == "ppl"
        assert report["scores"]["baseline"] == pytest.approx(run["calib_ppl_baseline"], rel=REL_SCORE)
        _close(report["scores"]["candidates"], _array(run, "scores_calib_ppl"), REL_SCORE)
        assert report["layers_removed"] == _array(run, "layer_idx_to_drop").tolist()
    else:
        report = methods.prune(model, "minitron-width", calib, device="cpu",
                               hidden_size=run["hidden_size"], ffn_hidden_size=run["ffn_hidden_size"])
        _close(report["scores"]["hidden"], _array(run, "hidden_importance").reshape(-1), REL_SCORE)
        _close(report["scores"]["mlp_channels"], _array(run, "ffn_importance"), REL_SCORE)
        assert report["hidden_kept"] == _array(run, "hidden_idx_kept").reshape(-1).tolist()
        assert [layer["mlp_channels_kept"] for layer in report["layers"]] == _array(run, "ffn_idx_kept").tolist()
        for name, shape in run.get("param_shapes_after", {}).items():
            assert list(model.get_parameter(name).shape) == shape, name
    assert perplexity(model, calib, "minitron") == pytest.approx(run["calib_ppl_final"], rel=REL_SCORE)
    assert perplexity(model, evaluation, "rows") == pytest.approx(run["eval_ppl_after"], rel=REL_PPL)
