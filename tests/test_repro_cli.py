"""`lpc prune`, `lpc repro` and `lpc diff` end to end on the golden tiny model (no network).

The test recipe replays the golden Wanda-repo settings (calib.npy, 16 x 64; the fixtures' row-wise
perplexity on eval.npy), and its table holds the original implementation's perplexities, so a pass
here is also a golden check through the whole pipeline.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repro.cli import main
from tests.conftest import REPO, golden_path

GOLDEN_PPL = {"dense": 48.123829986929074, "unstructured-0.5": 51.86071789633231, "2of4": 57.833803454553625,
              "4of8": 55.00128856438444}


def write_recipe(tmp_path: Path, method: str = "magnitude", dense_reference: float = GOLDEN_PPL["dense"],
                 rows=("dense", "unstructured-0.5", "2of4", "4of8")) -> Path:
    options = {"dense": {}, "unstructured-0.5": {"sparsity_ratio": 0.5}, "2of4": {"sparsity_type": "2:4"},
               "4of8": {"sparsity_type": "4:8"}}
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "tables").mkdir(exist_ok=True)
    recipe = {"method": method, "table": "golden", "profiles": {"golden": {
        "model": str(golden_path("tiny-llama-mha")), "dtype": "float32", "device": "cpu",
        "calibration": {"spec": str(golden_path("calib.npy")), "nsamples": 16, "seqlen": 64, "seed": 0},
        "rows": {r: options[r] for r in rows}}}}
    references = dict(GOLDEN_PPL, dense=dense_reference)
    table = {"method": method, "profiles": {"golden": {
        "model": "tiny-llama-mha", "reference": "paper", "ppl_rel": 1e-3,
        "sources": {"paper": "locuslab/wanda @ 8e8fc87 on the golden fixture"},
        "metrics": {"ppl": {"kind": "perplexity", "data": str(golden_path("eval.npy")), "protocol": "rows",
                            "seqlen": 64}},
        "rows": {r: {"ppl": {"paper": references[r]}} for r in rows}}}}
    (tmp_path / "tables" / "golden.yaml").write_text(yaml.safe_dump(table))
    path = tmp_path / "recipes" / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def repro_args(recipe: Path, results: Path, *extra: str):
    return ["repro", "magnitude", "--profile", "golden", "--recipe", str(recipe), "--results-dir", str(results),
            *extra]


def test_repro_matches_golden_and_resumes(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    results = tmp_path / "results"
    assert main(repro_args(recipe, results)) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    files = sorted((results / "golden" / "magnitude").glob("*.json"))
    assert [f.stem for f in files] == ["2of4", "4of8", "dense", "unstructured-0.5"]
    record = json.loads(files[-1].read_text())
    assert record["prune"]["overall_sparsity"] == pytest.approx(0.50014, abs=1e-5)
    assert record["provenance"]["packages"]["torch"]
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert main(repro_args(recipe, results)) == 0
    assert "done already" in capsys.readouterr().out
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())


def test_dense_gate_stops_before_pruning(tmp_path, capsys):
    recipe = write_recipe(tmp_path, dense_reference=30.0)
    results = tmp_path / "results"
    assert main(repro_args(recipe, results)) == 1
    assert "dense gate failed" in capsys.readouterr().err
    assert [f.stem for f in (results / "golden" / "magnitude").glob("*.json")] == ["dense"]


def test_diff_fails_on_a_tampered_result_and_refuses_a_corrupt_one(tmp_path, capsys):
    recipe = write_recipe(tmp_path, rows=("dense", "2of4"))
    results = tmp_path / "results"
    assert main(repro_args(recipe, results)) == 0
    path = results / "golden" / "magnitude" / "2of4.json"
    record = json.loads(path.read_text())
    record["metrics"]["ppl"] *= 1.01
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(repro_args(recipe, results)) == 1
    assert "FAIL" in capsys.readouterr().out
    path.write_text('{"metrics": {"ppl": 5')
    assert main(repro_args(recipe, results)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt results file" in err


def test_killed_run_loses_no_finished_row(tmp_path):
    recipe = write_recipe(tmp_path)
    results = tmp_path / "results"
    folder = results / "golden" / "magnitude"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "repro.cli", *repro_args(recipe, results)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {f.stem: f.read_text() for f in folder.glob("*.json")}
    assert finished, "no row finished before the kill"
    for text in finished.values():
        json.loads(text)  # complete JSON, never truncated
    rerun = subprocess.run([sys.executable, "-m", "repro.cli", *repro_args(recipe, results)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for row, text in finished.items():
        assert f"{row}: done already" in rerun.stdout
        assert (folder / f"{row}.json").read_text() == text
    assert len(list(folder.glob("*.json"))) == 4


def test_prune_writes_a_checkpoint_that_reloads_to_the_same_logits(tmp_path):
    from transformers import LlamaForCausalLM

    import methods

    out = tmp_path / "pruned"
    calib = str(golden_path("calib.npy"))
    assert main(["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "wanda",
                 "--sparsity-ratio", "0.5", "--calib", calib, "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["calibration"]["shape"] == [16, 64]
    assert set(report["sparsity"]) and all(abs(v - 0.5) < 1e-9 for v in report["sparsity"].values())
    assert report["packages"]["transformers"]
    reloaded = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    fresh = LlamaForCausalLM.from_pretrained(str(golden_path("tiny-llama-mha")), torch_dtype=torch.float32)
    methods.prune(fresh, "wanda", torch.from_numpy(np.load(calib)), sparsity_ratio=0.5, device="cpu")
    ids = torch.from_numpy(np.load(golden_path("eval.npy")))[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, fresh(ids).logits)
    expected = np.load(golden_path("expected", "wanda_repo__tiny-llama-mha__wanda__unstructured.npz"))
    got = (reloaded.model.layers[3].mlp.down_proj.weight == 0).numpy()
    assert (got == expected["mask/model.layers.3.mlp.down_proj"]).all()


BAD_INPUTS = [
    (["prune", "--model", "{model}", "--method", "nope", "--out", "{out}"], "unknown method"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "1.5", "--calib", "{calib}",
      "--out", "{out}"], "method 'wanda': option sparsity_ratio must be < 1, got 1.5"),
    (["prune", "--model", "{model}", "--method", "magnitude", "--sparsity-type", "4:2", "--out", "{out}"],
     "0 < N < M"),
    (["prune", "--model", "{model}", "--method", "magnitude", "--sparsity-type", "3:7", "--out", "{out}"],
     "not divisible by M=7"),
    (["prune", "--model", "{tmp}/missing", "--method", "magnitude", "--sparsity-ratio", "0.5", "--out", "{out}"],
     "not found"),
    (["prune", "--model", "{tmp}", "--method", "magnitude", "--sparsity-ratio", "0.5", "--out", "{out}"],
     "no config.json"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "0.5", "--calib", "{tmp}/none.pt",
      "--out", "{out}"], "not found"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "0.5", "--calib", "{tmp}/bad.npy",
      "--out", "{out}"], "token"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "0.5", "--calib", "{tmp}/float.npy",
      "--out", "{out}"], "integer"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "0.5", "--out", "{out}"], "--calib"),
    (["prune", "--model", "{model}", "--method", "wanda", "--sparsity-ratio", "x", "--out", "{out}"],
     "method 'wanda': option sparsity_ratio must be a number, got 'x'"),
    (["prune", "--model", "{model}", "--method", "wanda", "--pruning-ratio", "0.5", "--out", "{out}"],
     "method 'wanda' takes no option pruning_ratio"),
    (["prune", "--model", "{model}", "--method", "magnitude", "--option", "exact_count", "--out", "{out}"],
     "--option expects KEY=VALUE"),
    (["repro", "nope"], "no recipe"),
    (["repro", "wanda", "--profile", "nope"], "no profile"),
    (["diff", "wanda", "--profile", "nope"], "no profile"),
    (["diff"], "give a method or --all"),
]


def _fill(argv, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), dtype=np.int64))
    np.save(tmp_path / "float.npy", np.zeros((2, 8), dtype=np.float32))
    fill = {"model": str(golden_path("tiny-llama-mha")), "out": str(tmp_path / "out"), "tmp": str(tmp_path),
            "calib": str(golden_path("calib.npy"))}
    return [a.format(**fill) for a in argv]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a[:4]) + "|" + m for a, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert main(_fill(argv, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lpc: error: ") and message in err, err


@pytest.mark.parametrize("case", [3, 7, 10])
def test_bad_input_real_stderr_has_no_noise(tmp_path, case):
    """As a subprocess: nothing but the one line reaches stderr (no warnings, bars or tracebacks)."""
    argv, message = BAD_INPUTS[case]
    proc = subprocess.run([sys.executable, "-m", "repro.cli", *_fill(argv, tmp_path)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_prune_has_a_flag_for_every_declared_option(capsys):
    import methods
    from methods.options import declared
    from repro.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "--help"])
    help_text = capsys.readouterr().out
    for method in methods.REGISTRY.values():
        for name in declared(method.options_type):
            if name != "seed":  # the general --seed; `--option seed=N` reaches shortgpt's
                assert "--" + name.replace("_", "-") in help_text, name


def test_flag_help_names_each_method_with_its_declaration():
    import methods
    from methods.options import declared
    from repro.flags import _flag_help

    uses = [(m, declared(methods.get(m).options_type)["remove_layers"]) for m in ("shortgpt", "shortened")]
    text = _flag_help(uses)
    for method, field in uses:
        assert f"{method}: {field.description}; >= 1; required" in text
    score = [("wanda-sp", declared(methods.get("wanda-sp").options_type)["score"])]
    assert "{wanda,magnitude}; default wanda" in _flag_help(score)


@pytest.mark.parametrize("argv,expected", [
    # YAML would read 2:4 as the base-60 integer 124 and 1e-3 as a string: the declared type decides.
    (["--method", "sparsegpt", "--sparsity-type", "2:4", "--percdamp", "1e-3"],
     {"sparsity_type": "2:4", "percdamp": 0.001}),
    (["--method", "magnitude", "--sparsity-ratio", "0.5", "--exact-count"], {"sparsity_ratio": 0.5, "exact_count": True}),
    (["--method", "flap", "--pruning-ratio", "0.2", "--no-bias-compensation", "--option", "head_weight=literal"],
     {"pruning_ratio": 0.2, "bias_compensation": False, "head_weight": "literal"}),
    (["--method", "llm-pruner", "--pruning-ratio", "1", "--layers", "4:30", "--option", "gqa-importance=grouped"],
     {"pruning_ratio": 1, "layers": "4:30", "gqa_importance": "grouped"}),
    (["--method", "minitron-depth", "--remove-layers", "2", "--score", "lpc_smoke_mc", "--limit", "null"],
     {"remove_layers": 2, "score": "lpc_smoke_mc", "limit": None}),
    (["--method", "shortened", "--criterion", "taylor", "--remove-layers", "3", "--option", "plus_heuristic=false"],
     {"criterion": "taylor", "remove_layers": 3, "plus_heuristic": False}),
    (["--method", "shortgpt", "--remove-layers", "3", "--variant", "random", "--option", "seed=7"],
     {"remove_layers": 3, "variant": "random", "seed": 7}),
    # Refused later with the declaration's message: a bool for a ratio, an int for a true/false option.
    (["--method", "wanda", "--sparsity-ratio", "true"], {"sparsity_ratio": True}),
    (["--method", "flap", "--option", "exact_fluctuation=1"], {"exact_fluctuation": 1}),
])
def test_command_line_values_keep_their_types(argv, expected):
    import methods
    from repro.cli import build_parser
    from repro.flags import method_options

    args = build_parser().parse_args(["prune", "--model", "m", "--out", "o", *argv])
    got = method_options(args, methods.get(args.method))
    assert got == expected and all(type(got[k]) is type(v) for k, v in expected.items()), got


def test_a_model_that_is_not_llama_like_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    code = main(["prune", "--model", str(tmp_path / "gpt2"), "--method", "magnitude", "--sparsity-ratio", "0.5",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a decoder-only" in err, err


def test_an_unknown_task_in_a_table_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path, rows=("dense",))
    table = yaml.safe_load((tmp_path / "tables" / "golden.yaml").read_text())
    table["profiles"]["golden"]["metrics"]["nope"] = {"kind": "accuracy", "task": "no_such_task_xyz",
                                                      "metric": "acc", "shots": 0, "n": 10}
    (tmp_path / "tables" / "golden.yaml").write_text(yaml.safe_dump(table))
    code = main(repro_args(recipe, tmp_path / "results"))
    err = capsys.readouterr().err
    assert code == 2 and "unknown lm-eval task" in err and "no_such_task_xyz" in err, err


@pytest.mark.parametrize("file,edit,message", [
    ("recipe", lambda raw: raw["profiles"]["golden"].update(calibraton={}),
     "magnitude.yaml:golden: unknown key calibraton (expected model, "),
    ("recipe", lambda raw: raw["profiles"]["golden"]["calibration"].update(nsamples=0),
     "magnitude.yaml:golden: calibration.nsamples: input should be greater than 0, got 0"),
    ("table", lambda raw: raw["profiles"]["golden"]["metrics"]["ppl"].pop("protocol"),
     "golden.yaml:golden: metrics.ppl: perplexity metric lacks protocol"),
])
def test_a_schema_error_stops_repro_with_one_line(tmp_path, capsys, file, edit, message):
    recipe = write_recipe(tmp_path, rows=("dense",))
    path = recipe if file == "recipe" else tmp_path / "tables" / "golden.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    assert main(repro_args(recipe, tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert err.startswith("lpc: error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists()  # refused before any model is loaded


def test_compute_dtype_float64_is_its_own_prune_and_saves_in_the_dtype(tmp_path):
    """`--compute-dtype float64` (the smoke profiles' portable arithmetic): the scores and statistics
    are float64, the checkpoint is saved in --dtype, and the prune is not confused with a float32 one."""
    from safetensors.torch import load_file

    model, calib = str(golden_path("tiny-llama-mha")), str(golden_path("calib.npy"))
    common = ["prune", "--model", model, "--method", "wanda", "--sparsity-type", "2:4", "--calib", calib,
              "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*common, "--compute-dtype", "float64", "--out", str(tmp_path / "fp64")]) == 0
    fp32, fp64 = (json.loads((tmp_path / name / "prune.json").read_text()) for name in ("fp32", "fp64"))
    assert fp64["compute_dtype"] == "float64" and fp64["dtype"] == "float32"
    assert fp64["inputs"]["compute_dtype"] == "float64" and "compute_dtype" not in fp32["inputs"]
    assert fp64["fingerprint"] != fp32["fingerprint"]
    weights = load_file(str(tmp_path / "fp64" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    dense = load_file(str(golden_path("tiny-llama-mha", "model.safetensors")))
    # Wanda only zeroes weights: every kept weight is the dense one, bit for bit, after the float64 round trip.
    kept = [(weights[k] != 0) for k in weights]
    assert all(torch.equal(weights[k][m], dense[k][m]) for k, m in zip(weights, kept))
    ours = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    agree = sum(int(((weights[k] == 0) == (ours[k] == 0)).sum()) for k in weights) / sum(t.numel() for t in weights.values())
    assert agree > 0.99, agree


def test_an_unknown_compute_dtype_is_one_line(tmp_path, capsys):
    assert main(["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "magnitude", "--sparsity-ratio",
                 "0.5", "--compute-dtype", "float128", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("lpc: error: unknown --compute-dtype 'float128'; use one of float32, "
                                               "float16, bfloat16, float64")
