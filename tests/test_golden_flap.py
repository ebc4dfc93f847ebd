"""Golden equivalence with the original FLAP repository (CASIA-IVA-Lab/FLAP @ 3bb57db).

Every run of the FLAP-repo manifests is replayed: FLAP (WIFV, AL-AM, bias compensation, both head
weight variants), its Wanda-sp and its mag-sp, with the manifest's ratio and calibration rows. They
must keep exactly the original's heads and MLP channels, add the same biases, gather the same
statistics and standardised scores (1e-5 relative) and reach the same perplexity (1e-3 relative).

The original's `unstr` runs only mask instead of slicing; masks, biases and perplexity are the same
either way, so they are replayed with real pruning and held to the same values.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import methods
from methods import width_stats
from methods.scoring import perplexity
from methods.core.compat import dtype_kwarg
from tests.conftest import golden_manifests, golden_params, golden_path

METHODS = {"flap": "flap", "wanda_sp": "wanda-sp", "mag_sp": "wanda-sp"}


MANIFESTS = "flap_repo_manifest*.json"


def _runs():
    """Every run the FLAP-repo manifests describe (held-out models and ratios replay the same way)."""
    runs = []
    for manifest in golden_manifests(MANIFESTS):
        for name, run in json.loads(manifest.read_text())["runs"].items():
            npz = [f for f in run["files"] if f.endswith(".npz")]
            runs.append(dict(run, name=name, file=npz[0], model=run.get("model") or name.split("__")[1]))
    return golden_params(runs, MANIFESTS)


def _options(run) -> dict:
    assert run["remove_heads"] == -1, "only the remove_heads=-1 runs (AL-AM / UL-UM) are implemented"
    options = {"pruning_ratio": run["pruning_ratio"]}
    if run["method"] == "flap":
        variant = run["attn_compression_weight_variant"]
        assert variant in ("headdim_generalized", "literal_512_over_3"), variant
        options.update(metrics=run["metrics"], structure=run["structure"],
                       head_weight="literal" if variant == "literal_512_over_3" else "generalized")
    else:
        options["score"] = "magnitude" if run["method"] == "mag_sp" else "wanda"
    return options


def assert_close(got, want, what: str, rel: float = 1e-5) -> None:
    """Within `rel` of the reference's largest magnitude (elementwise relative error is meaningless
    for the near-zero entries of means, biases and standardised scores)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(np.abs(want).max()) if want.size else 0.0
    error = float(np.abs(got - want).max()) if want.size else 0.0
    assert error <= rel * scale + 1e-12, f"{what}: max |diff| {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def data():
    calib = torch.load(golden_path("calib.pt"), weights_only=True)
    evaluation = torch.load(golden_path("eval.pt"), weights_only=True)
    return calib, evaluation


@pytest.mark.parametrize("run", _runs(), ids=lambda r: r["name"])
def test_matches_original(run, data):
    from transformers import LlamaForCausalLM

    calib, evaluation = data
    model = LlamaForCausalLM.from_pretrained(str(golden_path(run["model"])), **dtype_kwarg(torch.float32)).eval()
    with width_stats.recording() as stats:
        report = methods.prune(model, METHODS[run["method"]], calib[: run["nsamples"]], device="cpu",
                               **_options(run))
    expected = np.load(golden_path("expected", run["file"]))
    layers = [m for m in model.model.layers]
    for index, (layer, kept) in enumerate(zip(layers, report["layers"])):
        heads = np.zeros_like(expected[f"layer{index}/heads_kept_mask"])
        heads[kept["heads_kept"]] = True
        channels = np.zeros_like(expected[f"layer{index}/mlp_channels_kept_mask"])
        channels[kept["mlp_channels_kept"]] = True
        np.testing.assert_array_equal(heads, expected[f"layer{index}/heads_kept_mask"], f"layer {index} heads")
        np.testing.assert_array_equal(channels, expected[f"layer{index}/mlp_channels_kept_mask"],
                                      f"layer {index} MLP channels")
        for key, linear in (("o_proj_bias", layer.self_attn.o_proj), ("down_proj_bias", layer.mlp.down_proj)):
            want = expected[f"layer{index}/{key}"]
            if run["method"] == "flap":
                assert linear.bias is not None, (index, key)
                assert_close(linear.bias.detach().numpy(), want, f"layer {index} {key}")
            else:  # the original's zero-initialised biases stay zero; ours are simply absent
                assert linear.bias is None and not want.any(), (index, key)
    if not run["unstr"]:
        # The original's model carries (zero-initialised) o_proj/down_proj biases in every layer.
        hidden = model.config.hidden_size
        absent_biases = 0 if run["method"] == "flap" else 2 * hidden * len(layers)
        assert report["parameters"]["pruned"] + absent_biases == run["n_params_after"]
    stat_keys = [k for k in expected.files if k.startswith("stats/")]
    assert stat_keys or run["method"] == "mag_sp"
    for key in stat_keys:
        module, statistic = key[len("stats/"):].rsplit("/", 1)
        index, name = module[len("model.layers."):].split(".", 1)
        assert_close(stats[(int(index), name, statistic)].numpy(), expected[key], key)
    if "derived/threshold" in expected.files:
        assert_close(report["scores"]["heads"], expected["derived/attn_head_score_standardized"], "head scores")
        assert_close(report["scores"]["mlp_channels"], expected["derived/mlp_channel_score_standardized"],
                     "MLP channel scores")
        assert_close(report["threshold"], expected["derived/threshold"], "threshold")
    assert perplexity(model, evaluation, "rows") == pytest.approx(run["ppl"], rel=1e-3)
