"""Rows as stage pipelines (prune -> train -> eval) on the golden tiny model, CPU.

`lpc eval` writes what the pipeline writes; a pipeline killed between stages or inside training
resumes at the first unfinished stage and never redoes a finished one; `lpc prune` skips a finished
prune; the recipe schema of training rows; `lpc repro --submit local` runs the chain through jobman.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from repro.cli import main
from repro.requests import read_request
from tests.conftest import REPO, golden_path, kill_lpc_at, lpc_env
from tests.jobman.conftest import kill_leftover_jobs

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE_PPL = 48.123829986929074      # the golden Wanda-repo perplexity of the tiny model (rows protocol)
TWO_FOUR_PPL = 57.833803454553625   # ... after magnitude 2:4


def write_recipe(tmp_path: Path, *, data=None, steps: int = 8, rows=None) -> Path:
    """Magnitude on the golden tiny model: dense, 2:4, and 2:4 + sparse retraining on the calibration ids."""
    rows = rows or {"dense": {}, "2of4": {"sparsity_type": "2:4"}, "2of4-sparse": {"sparsity_type": "2:4",
                                                                                     "train": "sparse"}}
    spec = {"kind": "sparse", "data": str(data or golden_path("calib.npy")), "steps": steps, "global_batch": 4,
            "micro_batch": 2, "seqlen": 64, "lr": 1.0e-3, "save_every": 2}
    recipe = {"method": "magnitude", "table": "golden", "profiles": {"golden": {
        "model": str(golden_path("tiny-llama-mha")), "dtype": "float32", "device": "cpu",
        "training": {"sparse": spec}, "rows": rows}}}
    cells = {"dense": {"ppl": {"paper": DENSE_PPL}}, "2of4": {"ppl": {"paper": TWO_FOUR_PPL},
                                                              "pattern": {"paper": 1.0}},
             "2of4-sparse": {"ppl": {}, "pattern": {"paper": 1.0}}}
    table = {"method": "magnitude", "profiles": {"golden": {
        "model": "tiny-llama-mha", "reference": "paper", "ppl_rel": 1e-3,
        "sources": {"paper": "locuslab/wanda @ 8e8fc87 on the golden fixture"},
        "metrics": {"ppl": {"kind": "perplexity", "data": str(golden_path("eval.npy")), "protocol": "rows",
                            "seqlen": 64},
                    "pattern": {"kind": "structure", "field": "nm_2of4"}},
        "rows": {r: cells[r] for r in rows}}}}
    (tmp_path / "tables").mkdir(exist_ok=True)
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "tables" / "golden.yaml").write_text(yaml.safe_dump(table))
    path = tmp_path / "recipes" / "magnitude.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def repro_args(recipe: Path, results: Path, *extra: str):
    return ["repro", "magnitude", "--profile", "golden", "--recipe", str(recipe), "--results-dir", str(results),
            *extra]


def result(results: Path, row: str) -> dict:
    return json.loads((results / "golden" / "magnitude" / f"{row}.json").read_text())


def test_a_training_row_runs_prune_train_eval_and_keeps_the_two_of_four_pattern(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    results = tmp_path / "results"
    assert main(repro_args(recipe, results)) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "NOREF" in out and "FAIL" not in out
    trained = result(results, "2of4-sparse")
    assert trained["metrics"]["pattern"] == 1.0
    assert trained["training"]["options"]["kind"] == "sparse"
    assert [r["step"] for r in trained["training"]["log"]] == list(range(1, 9))
    assert set(trained["stages"]) == {"prune", "train", "evaluate"}
    assert trained["prune"]["method"] == "magnitude" and "fingerprint" not in trained["prune"]
    # Stage folders: the trained checkpoint stays, the prune (quick to remake) goes.
    stages = results / "golden" / "magnitude" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["2of4-sparse"]
    assert sorted(p.name for p in (stages / "2of4-sparse").iterdir()) == ["trained"]
    assert json.loads((stages / "2of4-sparse" / "trained" / "train.json").read_text())["lineage"]["prune"][
        "fingerprint"] == trained["training"]["inputs"]["model"]["fingerprint"]
    # The untrained 2:4 row's perplexity is the golden one: the checkpoint round trip changes nothing.
    assert result(results, "2of4")["metrics"]["ppl"] == pytest.approx(TWO_FOUR_PPL, rel=1e-6)


def test_lpc_eval_writes_what_the_pipeline_wrote(tmp_path, capsys):
    recipe = write_recipe(tmp_path, rows={"dense": {}, "2of4": {"sparsity_type": "2:4"},
                                          "2of4-sparse": {"sparsity_type": "2:4", "train": "sparse"}})
    first = tmp_path / "first"
    assert main(repro_args(recipe, first, "--keep-stages", "all")) == 0
    stages = first / "golden" / "magnitude" / "stages"
    second = tmp_path / "second"
    for row, model in (("dense", str(golden_path("tiny-llama-mha"))), ("2of4", stages / "2of4" / "pruned"),
                       ("2of4-sparse", stages / "2of4-sparse" / "trained")):
        assert main(["eval", "--model", str(model), "--method", "magnitude", "--profile", "golden", "--row", row,
                     "--recipe", str(recipe), "--results-dir", str(second)]) == 0
        ours, theirs = result(first, row), result(second, row)
        assert ours.keys() == theirs.keys()
        for key in ("metrics", "options", "model", "calibration", "seed", "prune", "training", "fingerprint",
                    "checkpoint", "harness", "batch_size"):
            assert ours[key] == theirs[key], key
    capsys.readouterr()
    # A result names its row: a checkpoint of another row's stages is refused in one line.
    assert main(["eval", "--model", str(stages / "2of4" / "pruned"), "--method", "magnitude", "--profile", "golden",
                 "--row", "2of4-sparse", "--recipe", str(recipe), "--results-dir", str(second)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no train.json" in err
    assert main(["eval", "--model", str(stages / "2of4" / "pruned"), "--method", "magnitude", "--profile", "golden",
                 "--row", "dense", "--recipe", str(recipe), "--results-dir", str(second)]) == 2
    assert "row dense evaluates the unpruned model itself" in capsys.readouterr().err
    # A trained checkpoint keeps the record of the prune it came from, when the pruned one is gone.
    import shutil

    trained_from = json.loads((stages / "2of4-sparse" / "trained" / "train.json").read_text())["options"]["model"]
    assert trained_from == str(stages / "2of4" / "pruned")     # the rows prune alike: one prune, shared
    shutil.rmtree(trained_from)
    third = tmp_path / "third"
    assert main(["eval", "--model", str(stages / "2of4-sparse" / "trained"), "--method", "magnitude", "--profile",
                 "golden", "--row", "2of4-sparse", "--recipe", str(recipe), "--results-dir", str(third)]) == 0
    assert result(third, "2of4-sparse")["prune"] == result(first, "2of4-sparse")["prune"]


def test_lpc_prune_skips_a_finished_prune_and_refuses_to_mix_runs(tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(golden_path("tiny-llama-mha")), "--method", "wanda", "--sparsity-ratio", "0.5",
            "--calib", str(golden_path("calib.npy")), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    manifest = json.loads((out / "prune.json").read_text())
    assert manifest["stage"] == "prune" and manifest["fingerprint"]
    assert manifest["inputs"]["options"] == {"sparsity_ratio": 0.5}
    assert manifest["inputs"]["calibration"]["data"]["files"]   # the token file, by content
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "pruned already" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    other = [a if a != "0.5" else "0.4" for a in args]
    assert main(other) == 2
    assert "holds something else; pass --overwrite" in capsys.readouterr().err
    assert main([*other, "--overwrite"]) == 0
    assert json.loads((out / "prune.json").read_text())["inputs"]["options"] == {"sparsity_ratio": 0.4}


def test_a_pipeline_killed_between_and_inside_stages_resumes_and_redoes_nothing(tmp_path):
    steps = 12
    recipe = write_recipe(tmp_path, steps=steps, rows={"dense": {}, "2of4-sparse": {"sparsity_type": "2:4",
                                                                                     "train": "sparse"}})
    whole = tmp_path / "whole"
    assert main(repro_args(recipe, whole, "--rows", "2of4-sparse", "--no-dense-gate")) == 0
    results = tmp_path / "cut"
    args = repro_args(recipe, results, "--rows", "2of4-sparse", "--no-dense-gate")
    folder = results / "golden" / "magnitude" / "stages" / "2of4-sparse"
    env = lpc_env()

    # Killed right after the prune stage: the rerun finds it done.
    kill_lpc_at(args, "pruned ", env)
    pruned = (folder / "pruned" / "prune.json").stat().st_mtime_ns
    # Killed inside training, after a checkpoint: the rerun resumes there.
    out = kill_lpc_at(args, f"step 7/{steps}", env)
    assert "pruned already" in out
    assert (folder / "trained" / "checkpoints").is_dir()
    rerun = subprocess.run([sys.executable, "-m", "repro.cli", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "pruned already" in rerun.stdout and "resuming at step" in rerun.stdout
    assert (folder / "pruned").exists() is False  # discarded once the result was written
    assert pruned  # the prune ran once: the reruns above said "pruned already"
    cut, uninterrupted = result(results, "2of4-sparse"), result(whole, "2of4-sparse")
    assert 0 < cut["training"]["resumed_from"] < steps
    assert np.allclose([r["loss"] for r in cut["training"]["log"]],
                       [r["loss"] for r in uninterrupted["training"]["log"]], rtol=1e-5, atol=0)
    assert cut["metrics"]["ppl"] == pytest.approx(uninterrupted["metrics"]["ppl"], rel=1e-5)
    # A finished row is finished: nothing runs again.
    again = subprocess.run([sys.executable, "-m", "repro.cli", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "2of4-sparse: done already" in again.stdout


BAD_RECIPES = [  # (edit of the golden recipe's profile, the one line it gives)
    (lambda p: p["training"]["sparse"].update(kind="dpo"), "training.sparse: option kind must be "),
    (lambda p: p["training"]["sparse"].update(stepz=3), "training.sparse: "),
    (lambda p: p["training"]["sparse"].update(steps=0), "training.sparse: option steps must be >= 1, got 0"),
    (lambda p: p["training"]["sparse"].update(out="x"), "training.sparse: out is set by the pipeline"),
    (lambda p: p["training"]["sparse"].update(kind="kd"), "training.sparse: kind kd needs --teacher"),
    (lambda p: p["training"]["sparse"].update(kind="lora", recipe={"r": 0}),
     "training.sparse: lora: option r must be >= 1, got 0"),
    (lambda p: p["training"]["sparse"].update(kind="lora", recipe={"lr": 0.1}),
     "training.sparse: lora: set lr with --lr, not as a LoRA option"),
    (lambda p: p["rows"]["2of4-sparse"].update(train="cpt"), "rows.2of4-sparse.train: names no train spec: 'cpt'"),
    (lambda p: p["rows"]["dense"].update(train="sparse"), "rows.dense.train: the dense row evaluates the model"),
]


@pytest.mark.parametrize("change,message", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_a_bad_training_block_is_one_line(tmp_path, change, message):
    from methods.core.errors import UsageError
    from repro.recipe import load_recipe

    path = write_recipe(tmp_path)
    raw = yaml.safe_load(path.read_text())
    change(raw["profiles"]["golden"])
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError) as info:
        load_recipe("magnitude", "golden", path)
    assert str(info.value).startswith("magnitude.yaml:golden: " + message) and "\n" not in str(info.value)


def test_train_specs_become_lpc_train_options():
    from repro.recipe import load_recipe

    depth = load_recipe("minitron-depth", "smoke")
    kd = depth.train_options("ppl-n8-kd", model="/w/pruned", out="/w/trained")
    assert kd.kind == "kd" and kd.teacher == "smoke" and kd.model == "/w/pruned" and kd.out == "/w/trained"
    cpt = depth.train_options("ppl-n8-cpt", model="/w/pruned", out="/w/trained")
    same = ("data", "steps", "global_batch", "micro_batch", "seqlen", "lr", "seed", "warmup_fraction",
            "final_lr_fraction")
    assert {k: getattr(kd, k) for k in same} == {k: getattr(cpt, k) for k in same}   # equal steps and tokens
    paper = load_recipe("minitron-width", "paper").train_options("width-4b-cpt", model="m", out="o")
    assert (paper.steps, paper.global_batch, paper.seqlen, paper.lr, paper.warmup_fraction,
            paper.final_lr_fraction, paper.data) == (12500, 64, 8192, 3e-4, 0.05, 0.1, "dclm")
    lora = load_recipe("llm-pruner", "smoke")
    assert lora.options("element1-0.5-lora") == {"pruning_ratio": 0.5, "importance": "element1", "layers": "4:28"}
    assert lora.train_options("element1-0.5-lora", model="m", out="o").kind == "lora"
    assert lora.train_options("element1-0.5", model="m", out="o") is None


def test_a_row_fingerprint_depends_on_its_own_train_spec_only(tmp_path):
    from repro.recipe import load_recipe

    path = write_recipe(tmp_path)
    before = load_recipe("magnitude", "golden", path)
    raw = yaml.safe_load(path.read_text())
    raw["profiles"]["golden"]["training"]["sparse"]["steps"] = 9
    raw["profiles"]["golden"]["training"]["other"] = {**raw["profiles"]["golden"]["training"]["sparse"]}
    path.write_text(yaml.safe_dump(raw))
    after = load_recipe("magnitude", "golden", path)
    assert before.fingerprint("2of4", {}) == after.fingerprint("2of4", {})
    assert before.fingerprint("dense", {}) == after.fingerprint("dense", {})
    assert before.fingerprint("2of4-sparse", {}) != after.fingerprint("2of4-sparse", {})


# ----------------------------------------------------------------------------- --submit

@pytest.fixture
def jobman_home(tmp_path, monkeypatch):
    home = tmp_path / "jobman-home"
    monkeypatch.setenv("JOBMAN_HOME", str(home))
    monkeypatch.setenv("JOBMAN_POLL", "0.1")
    monkeypatch.delenv("JOBMAN_BACKEND", raising=False)
    for key, value in lpc_env().items():
        monkeypatch.setenv(key, value)
    yield home
    kill_leftover_jobs(home)


def _states(home: Path) -> dict:
    from jobman.store import Store

    store = Store(home)
    try:
        return {row["name"]: row["state"] for row in store.jobs("1=1", ())}
    finally:
        store.close()


def _wait_all(home: Path, timeout: float = 900) -> int:
    from jobman import api
    from jobman.store import Store

    store = Store(home)
    try:
        ids = [row["id"] for row in store.jobs("1=1", ())]
    finally:
        store.close()
    return api.wait(ids, timeout=timeout)


@pytest.mark.skipif(sys.platform != "linux", reason="jobman's local backend checks processes through /proc")
def test_submit_local_runs_the_chain_through_jobman(tmp_path, jobman_home, capsys, monkeypatch):
    secret = "hf_not_a_real_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = write_recipe(tmp_path, steps=4)
    results = tmp_path / "results"
    assert main(repro_args(recipe, results, "--submit", "local")) == 0
    out = capsys.readouterr().out
    assert "6 jobs submitted to local" in out and "2of4-sparse: the same prune as 2of4, shared" in out
    queue = subprocess.run([sys.executable, "-m", "jobman", "queue", "--all", "--json"], capture_output=True,
                           text=True, env=os.environ, timeout=120)
    names = [job["name"] for job in json.loads(queue.stdout)]
    # The two rows prune alike: one prune job, which the sparse row's training waits for.
    assert names == [f"lpc-magnitude-{n}" for n in ("dense-eval", "2of4-prune", "2of4-eval", "2of4-sparse-train",
                                                     "2of4-sparse-eval", "diff")], queue.stderr
    assert _wait_all(jobman_home) == 0
    assert set(_states(jobman_home).values()) == {"COMPLETED"}
    assert result(results, "2of4-sparse")["metrics"]["pattern"] == 1.0
    assert result(results, "2of4")["metrics"]["ppl"] == pytest.approx(TWO_FOUR_PPL, rel=1e-6)
    script = (jobman_home / "jobs").glob("*/script")
    texts = [p.read_text() for p in script]
    train = next(t for t in texts if "-train" in t.splitlines()[1])
    assert "torch.distributed.run --standalone --nnodes 1 --nproc-per-node 1 -m training.stage --request" in train
    # The token goes by name: jobman reads it where the job runs; no script, log or database holds it.
    shown = json.loads(subprocess.run([sys.executable, "-m", "jobman", "show", "1", "--json"], capture_output=True,
                                      text=True, env=os.environ, timeout=120).stdout)
    assert shown["spec"]["secrets"] == ["HF_TOKEN"]
    stored = [p for p in jobman_home.rglob("*") if p.is_file()]
    assert stored and not any(secret.encode() in p.read_bytes() for p in stored)
    # Everything done: a second submission submits nothing.
    assert main(repro_args(recipe, results, "--submit", "local")) == 0
    assert "0 jobs submitted" in capsys.readouterr().out


def _maxtext_recipe(tmp_path: Path) -> Path:
    """write_recipe with its training row continued-pre-trained on MaxText instead."""
    path = write_recipe(tmp_path, rows={"dense": {}, "2of4-sparse": {"sparsity_type": "2:4", "train": "sparse"}})
    raw = yaml.safe_load(path.read_text())
    raw["profiles"]["golden"]["training"]["sparse"] = {
        "kind": "cpt", "engine": "maxtext", "data": "dclm-arrayrecord", "steps": 4, "global_batch": 32,
        "micro_batch": 2, "seqlen": 64, "lr": 1.0e-3}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_submit_tpu_runs_maxtext_on_every_host_of_the_slice_between_one_host_jobs(tmp_path, monkeypatch):
    """--tpu v4-32: prepare on one host, MaxText's trainer on the slice (one SkyPilot node, its four
    hosts from jobman's table), export on one host; the data location travels with the jobs."""
    from jobman.backends.skypilot import task_config
    from jobman.spec import JobSpec
    from repro import submit
    from repro.recipe import load_recipe
    from repro.tables import load_profile

    monkeypatch.setenv("LPC_DCLM_ARRAY_RECORD", "gs://bucket/dclm/*.array_record")
    path = _maxtext_recipe(tmp_path)
    recipe = load_recipe("magnitude", "golden", path)
    table = load_profile("magnitude", "golden", recipe.table)
    work = (tmp_path / "work").resolve()
    jobs = submit.plan_jobs(recipe, table, ["dense", "2of4-sparse"], results_root=tmp_path / "results", work=work,
                       gpus=None, nodes=1, dense_gate=True, tpu="v4-32", log=lambda _: None)
    names = [j.name for j in jobs]
    assert names == ["lpc-magnitude-dense-eval", "lpc-magnitude-2of4-sparse-prune",
                     "lpc-magnitude-2of4-sparse-train-prepare", "lpc-magnitude-2of4-sparse-train",
                     "lpc-magnitude-2of4-sparse-train-export", "lpc-magnitude-2of4-sparse-eval", "lpc-magnitude-diff"]
    prepare, run, export = jobs[2:5]
    assert [j.accelerator for j in (prepare, run, export)] == [None, "v4-32", None]
    assert prepare.after == [jobs[1]] and run.after == [prepare] and export.after == [run] and jobs[5].after == [export]
    for job, phase in ((prepare, "prepare"), (run, "run"), (export, "export")):
        assert job.command[:3] == ["-m", "training.stage", "--request"] and job.torchrun is None
        options = read_request(Path(job.command[3]), "train")
        assert options.phase == phase and options.engine == "maxtext"
        assert (options.tpu == "v4-32") == (phase == "run")
    text = submit.script(run, ["python3"], "test")
    assert "torch.distributed.run" not in text and "-m training.stage --request" in text
    spec = JobSpec(argv=["run.sh"], script=text, script_name="run.sh", name=run.name, backend="skypilot",
                   accelerator=run.accelerator, nodes=run.nodes, env={"LPC_DCLM_ARRAY_RECORD": "gs://b/*"})
    config = task_config(spec, job_id=7)
    assert config["resources"]["accelerators"] == "tpu-v4-32" and config["num_nodes"] == 1
    assert config["envs"]["LPC_DCLM_ARRAY_RECORD"] == "gs://b/*"
    # without --tpu (a single machine), the same row is one job of all three phases
    local = submit.plan_jobs(recipe, table, ["2of4-sparse"], results_root=tmp_path / "results", work=work, gpus=None,
                        nodes=1, dense_gate=True, log=lambda _: None)
    single = next(j for j in local if j.name.endswith("-train"))
    assert read_request(Path(single.command[3]), "train").phase == "all"
    assert single.torchrun is None and single.accelerator is None


@pytest.mark.parametrize("extra, env, message", [
    (["--submit", "local", "--tpu", "v4-32"], True, "--tpu v4-32: TPU slices are reached through SkyPilot"),
    (["--submit", "skypilot", "--tpu", "v4-31"], True, "--tpu: unknown TPU accelerator type 'v4-31'"),
    (["--submit", "skypilot", "--tpu", "v4-32", "--nodes", "2"], True, "drop --nodes"),
    (["--submit", "skypilot", "--gpus", "v4-32"], True, "pass --tpu v4-32"),
    (["--submit", "skypilot", "--tpu", "v4-32"], False, "set LPC_DCLM_ARRAY_RECORD"),
    (["--tpu", "v4-32"], True, "are for the jobs of --submit"),
])
def test_submit_tpu_refusals_are_one_line_before_any_job(tmp_path, capsys, monkeypatch, jobman_home, extra, env,
                                                         message):
    if env:
        monkeypatch.setenv("LPC_DCLM_ARRAY_RECORD", "gs://bucket/dclm/*.array_record")
    else:
        monkeypatch.delenv("LPC_DCLM_ARRAY_RECORD", raising=False)
    assert main(repro_args(_maxtext_recipe(tmp_path), tmp_path / "results", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (jobman_home / "jobs").exists()


def test_submit_tpu_refuses_a_row_that_trains_with_torchrun(tmp_path, capsys, jobman_home):
    recipe = write_recipe(tmp_path, rows={"dense": {}, "2of4-sparse": {"sparsity_type": "2:4", "train": "sparse"}})
    assert main(repro_args(recipe, tmp_path / "results", "--submit", "skypilot", "--tpu", "v4-32")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 2of4-sparse trains with the hf engine" in err, err


@pytest.mark.skipif(sys.platform != "linux", reason="jobman's local backend checks processes through /proc")
def test_a_failed_stage_cancels_its_dependants(tmp_path, jobman_home, capsys):
    recipe = write_recipe(tmp_path, data=tmp_path / "missing.npy", steps=4,
                          rows={"dense": {}, "2of4-sparse": {"sparsity_type": "2:4", "train": "sparse"}})
    results = tmp_path / "results"
    assert main(repro_args(recipe, results, "--submit", "local")) == 0
    assert _wait_all(jobman_home) != 0
    states = _states(jobman_home)
    assert states["lpc-magnitude-dense-eval"] == "COMPLETED"
    assert states["lpc-magnitude-2of4-sparse-prune"] == "COMPLETED"
    assert states["lpc-magnitude-2of4-sparse-train"] == "FAILED"
    assert states["lpc-magnitude-2of4-sparse-eval"] == "CANCELLED"
    assert states["lpc-magnitude-diff"] == "FAILED"       # it ran, and the missing row fails it
    assert not (results / "golden" / "magnitude" / "2of4-sparse.json").exists()


def test_submit_plans_only_the_stages_not_done(tmp_path, capsys):
    """The plan behind --submit, without running it: finished stages get no job, a training left by
    other inputs in the row's own folder is cleared, the training job runs under torchrun."""
    from repro import submit
    from repro.recipe import load_recipe
    from repro.tables import load_profile

    path = write_recipe(tmp_path, steps=2, rows={"dense": {}, "2of4-sparse": {"sparsity_type": "2:4",
                                                                              "train": "sparse"}})
    results = tmp_path / "results"
    assert main(repro_args(path, results, "--keep-stages", "all")) == 0
    raw = yaml.safe_load(path.read_text())
    raw["profiles"]["golden"]["training"]["sparse"]["steps"] = 3
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe("magnitude", "golden", path)
    table = load_profile("magnitude", "golden", recipe.table)
    work = results / "golden" / "magnitude" / "stages"
    jobs = submit.plan_jobs(recipe, table, ["dense", "2of4-sparse"], results_root=results, work=work.resolve(),
                       gpus="A100:1", nodes=2, dense_gate=True, log=lambda _: None)
    assert [j.name for j in jobs] == ["lpc-magnitude-2of4-sparse-train", "lpc-magnitude-2of4-sparse-eval",
                                      "lpc-magnitude-diff"]
    assert not (work / "2of4-sparse" / "trained").exists()        # stale: cleared for the job
    assert (work / "2of4-sparse" / "pruned" / "prune.json").is_file()  # done: kept, no job
    train = jobs[0]
    assert train.accelerator == "A100:1" and train.nodes == 2 and train.torchrun == (2, 1)
    text = submit.script(train, ["python3"], "test")
    assert "--nnodes 2 --rdzv-backend c10d" in text and "--nproc-per-node 1 -m training.stage --request" in text
    options = read_request(Path(train.command[3]), "train")
    assert options.steps == 3 and options.nproc == 1     # torchrun sets the world size
    assert jobs[1].after == [train] and jobs[2].kind == "afterany" and jobs[2].after == [jobs[1]]
    with pytest.raises(Exception, match="not divisible by micro batch 2 x 6 processes"):
        submit.plan_jobs(recipe, table, ["2of4-sparse"], results_root=results, work=work.resolve(), gpus="3",
                    nodes=2, dense_gate=True, log=lambda _: None)
