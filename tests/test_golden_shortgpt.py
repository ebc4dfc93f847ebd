"""Golden equivalence with sramshetty/ShortGPT (hf-models branch), the unofficial implementation:
ShortGPT's `variant="unofficial"`, one forward per calib.pt row.

Every run of every shortgpt_sramshetty manifest is replayed (held-out models replay the same way).
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
MANIFESTS = "shortgpt_sramshetty_manifest*.json"


def _runs():
    runs = []
    for model, name, run, npz in manifest_runs(MANIFESTS):
        metric, _, count = name.partition("_remove")
        runs.append(dict(run, model=model, name=name, metric=metric, count=int(count), npz=npz))
    return runs


RUNS = _runs()


def _array(run, field):
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


def test_manifests_are_found():
    assert {r["metric"] for r in RUNS} == {"bi", "angular"}


@pytest.mark.parametrize("run", golden_params(RUNS, MANIFESTS), ids=lambda r: f"{r['model']}-{r['name']}")
def test_matches_sramshetty(run, data):
    from transformers import LlamaForCausalLM

    calib, evaluation = data
    model = LlamaForCausalLM.from_pretrained(str(golden_path(run["model"])), **dtype_kwarg(torch.float32))
    report = methods.prune(model.eval(), "shortgpt", calib, device="cpu", remove_layers=run["count"],
                           variant="unofficial", metric=run["metric"])
    key = "block_influence" if run["metric"] == "bi" else "angular"
    got, want = np.asarray(report["scores"][key]), _array(run, "importances").astype(np.float64)
    assert got.shape == want.shape
    # Angular entries past L - n are never updated upstream: exactly zero on both sides.
    np.testing.assert_array_equal(got[want == 0], 0.0)
    np.testing.assert_allclose(got[want != 0], want[want != 0], rtol=REL_SCORE, atol=0)
    assert report["layers_removed"] == _array(run, "layers_removed").tolist()  # argsort order
    if "remaining_layers" in run:
        assert len(model.model.layers) == len(run["remaining_layers"])
    assert perplexity(model, evaluation, "rows") == pytest.approx(run["eval_ppl_after_removal"], rel=REL_PPL)
