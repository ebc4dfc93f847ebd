"""Issue 21, fast tier: the one hub resolver (methods/core/hub.py), `lpc mirror list`, a rehearsal's
cuts and its REHEARSED cells, and the up-front refusal of a MaxText row this environment cannot train.
Nothing here touches the network: every mirror is a folder written by the test."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from methods.core import hub
from methods.core.errors import UsageError
from repro.cli import main


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv(hub.MIRROR_ENV, str(root))
    return root


def _parquet(path: Path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


# ----------------------------------------------------------------------------- the resolver

def test_without_a_mirror_a_hub_id_is_passed_on_unchanged(monkeypatch):
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    assert hub.mirror() is None
    assert hub.model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_a_mirror_answers_model_reads_from_its_folder(mirror):
    from methods.core.models import resolve

    folder = mirror / "owner" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve("owner/model") == str(folder)
    assert hub.snapshot("owner/model") == folder
    with pytest.raises(UsageError, match="has no model other/model") as err:
        resolve("other/model")
    assert "\n" not in str(err.value)


def test_a_mirror_that_is_no_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="is not a directory"):
        hub.mirror()


def test_a_mirrored_dataset_is_read_by_its_card_configs(mirror):
    """Only the config the kit reads is in the mirror; the card's data_files name its files."""
    folder = mirror / "datasets" / "owner" / "text"
    _parquet(folder / "small" / "test-00000-of-00001.parquet", [{"text": "a"}, {"text": "b"}])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files:\n  - split: test\n"
                                      "    path: small/test-*\n---\n")
    rows = hub.load_dataset("owner/text", "small", split="test")
    assert rows["text"] == ["a", "b"]


def test_a_script_dataset_is_read_from_its_parquet_conversion(mirror):
    from methods.core.text import load_dataset

    _parquet(mirror / "datasets" / "ptb_text_only" / "penn_treebank" / "test" / "0000.parquet",
             [{"sentence": "the n <unk>"}])
    rows = load_dataset("ptb_text_only", "penn_treebank", split="test", script=True)
    assert rows["sentence"] == ["the n <unk>"]
    with pytest.raises(UsageError, match="no config 'other'"):
        load_dataset("ptb_text_only", "other", split="test", script=True)


def test_lm_evals_own_dataset_reads_are_routed_while_open(mirror):
    """lm-eval calls datasets.load_dataset(path=<hub id>) itself: routed to the mirror only while open."""
    import datasets

    folder = mirror / "datasets" / "owner" / "task"
    _parquet(folder / "data" / "validation-00000-of-00001.parquet", [{"q": "x"}])
    original = datasets.load_dataset
    with hub.routed_datasets():
        assert datasets.load_dataset(path="owner/task", split="validation")["q"] == ["x"]
        with pytest.raises(UsageError, match="has no dataset owner/absent"):
            datasets.load_dataset(path="owner/absent", split="validation")
    assert datasets.load_dataset is original


# ----------------------------------------------------------------------------- lpc mirror list

def test_mirror_list_names_every_object_of_a_profile(capsys):
    assert main(["mirror", "list", "--profile", "paper", "--method", "magnitude"]) == 0
    out = capsys.readouterr().out
    for repo in ("meta-llama/Llama-2-7b-hf", "allenai/c4", "Salesforce/wikitext", "aps/super_glue",
                 "nyu-mll/glue", "Rowan/hellaswag", "allenai/winogrande", "allenai/ai2_arc", "allenai/openbookqa"):
        assert repo in out, repo
    assert "en/c4-train.00000-of-01024.json.gz" in out


def test_the_smoke_profile_reads_nothing_from_the_hub(capsys):
    """Its task reads shipped files through lm-eval's `json` builder: no hub object (it was listed as one)."""
    assert main(["mirror", "list", "--profile", "smoke", "--method", "wanda"]) == 0
    assert "\n0 objects." in capsys.readouterr().out


def test_every_object_of_every_paper_profile_has_a_stand_in():
    """`lpc mirror rehearsal` can write all that `lpc mirror list` names: a new hub read without a
    stand-in writer fails here, not in a rehearsal."""
    from repro import mirror as listing
    from repro import standin_data, standin_models

    objects = listing.catalogue()
    kinds = {o.kind for o in objects}
    assert {"model", "dataset", "local"} <= kinds
    for obj in objects:
        if obj.kind == "model":
            assert obj.repo in standin_models.TOPOLOGIES, obj.repo
        elif obj.kind == "dataset" and obj.task is None:
            assert obj.repo in standin_data.HUB_DATASETS, obj.repo
    tasks = {o.task for o in objects if o.task}
    assert {"boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa",
            "sciq"} <= tasks


def test_mirror_rehearsal_needs_out(capsys):
    assert main(["mirror", "rehearsal"]) == 2
    assert "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a rehearsal's recipe

def test_a_rehearsal_cuts_counts_and_widths_but_not_protocols(mirror):
    from repro.recipe import load_recipe
    from repro.rehearsal import CUTS

    paper = load_recipe("minitron-width", "paper")
    rehearsed = load_recipe("minitron-width", "paper", rehearsal=True)
    assert rehearsed.rehearsal and not paper.rehearsal and rehearsed.config["device"] == "cpu"
    assert rehearsed.config["calibration"]["nsamples"] == CUTS["calibration_samples"]
    assert rehearsed.config["calibration"]["spec"] == paper.config["calibration"]["spec"]
    for name, spec in rehearsed.config["training"].items():
        assert spec["steps"] == CUTS["train_steps"] and spec["kind"] == paper.config["training"][name]["kind"]
        assert spec["lr"] == paper.config["training"][name]["lr"]
    row = next(r for r, o in paper.rows.items() if "hidden_size" in o)
    assert rehearsed.rows[row]["hidden_size"] * 32 == paper.rows[row]["hidden_size"]


def test_a_rehearsal_trains_lora_in_fp32_on_the_cpu(mirror):
    """llm-pruner's paper LoRA is fp16 autocast, which the CPU refuses (found by its rehearsal)."""
    from repro.recipe import load_recipe

    paper = load_recipe("llm-pruner", "paper").config["training"]
    rehearsed = load_recipe("llm-pruner", "paper", rehearsal=True).config["training"]
    lora = [name for name, spec in paper.items() if spec.get("kind") == "lora"]
    assert any(paper[name]["recipe"].get("precision") == "fp16" for name in lora)
    for name in lora:
        assert rehearsed[name]["recipe"]["precision"] == "fp32"
        for key, value in paper[name]["recipe"].items():
            if key not in ("precision", "val_set_size", "warmup_steps", "eval_steps"):
                assert rehearsed[name]["recipe"][key] == value, key


def test_a_rehearsal_without_a_mirror_is_refused(monkeypatch, capsys):
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    assert main(["repro", "magnitude", "--profile", "paper", "--rehearse"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LPC_HUB_MIRROR" in err


def test_a_rehearsal_is_not_submitted(mirror, capsys):
    assert main(["repro", "magnitude", "--profile", "paper", "--rehearse", "--submit", "local"]) == 2
    assert "not submitted" in capsys.readouterr().err


# ----------------------------------------------------------------------------- REHEARSED cells

def _paper_table():
    from repro.tables import load_profile

    return load_profile("magnitude", "paper")


def test_rehearsed_cells_show_as_rehearsed_and_a_non_number_fails():
    from repro import diff

    table = _paper_table()
    keys = list(table.metrics)
    metrics = {k: 1.0 for k in keys}
    metrics[keys[1]] = math.nan
    results = {"dense": {"metrics": metrics, "rehearsal": {"cuts": {}}}}
    cells = [c for c in diff.diff_cells(table, results) if c.row == "dense"]
    statuses = {c.metric: c.status for c in cells}
    assert statuses[keys[0]] == diff.REHEARSED and statuses[keys[1]] == "FAIL"
    others = [c for c in diff.diff_cells(table, results) if c.row != "dense"]
    assert others and all(c.status == "MISSING" for c in others)  # a cell no row produced fails the diff
    assert diff.failed(c.status for c in cells + others)
    results["dense"]["metrics"][keys[1]] = 2.0
    assert all(c.status == diff.REHEARSED for c in diff.diff_cells(table, results, rows=["dense"]))


# ----------------------------------------------------------------------------- MaxText rows, up front

def test_a_maxtext_row_is_refused_before_any_row_runs(tmp_path, monkeypatch):
    """The minitron-width paper profile's TPU row, outside the MaxText environment: refused in one line
    before the GPU rows run (issue 21), not after them."""
    from repro import plan, runner
    from repro.recipe import load_recipe
    from training.stage import MAXTEXT_PYTHON_ENV, maxtext_command

    monkeypatch.delenv(MAXTEXT_PYTHON_ENV, raising=False)
    if maxtext_command() == []:
        pytest.skip("MaxText is installed in this environment")
    recipe = load_recipe("minitron-width", "paper")
    table = runner.load_table(recipe)
    steps = plan.plan(recipe, table, list(recipe.rows), results_root=tmp_path, work=tmp_path / "work", log=lambda _: None)
    assert any(s.stage == "train" and s.request.engine == "maxtext" for s in steps)
    with pytest.raises(UsageError, match="--engine maxtext") as err:
        runner.check_engines(steps)
    assert "nothing was run" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv(MAXTEXT_PYTHON_ENV, sys.executable)  # the MaxText venv's python, named
    assert maxtext_command() == [sys.executable]
    runner.check_engines(steps)
    monkeypatch.setenv(MAXTEXT_PYTHON_ENV, str(tmp_path / "no-python"))
    assert maxtext_command() is None

