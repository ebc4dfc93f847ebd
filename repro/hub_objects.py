"""The hub objects the kit reads, as data: what a data spec or an lm-eval task reads from the hub (or
from a local folder), with its revision, files and place in a mirror (methods/core/hub.py). `lpc mirror`
(repro/mirror.py) gathers them per profile; the rehearsal and its stand-ins (repro/rehearsal.py,
repro/standin_data.py) look them up here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from methods.core.errors import UsageError

# What the kit reads of a model repository (methods/core/models.py, training's sharded loader).
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class HubObject:
    kind: str                          # model | dataset | local
    repo: str                          # hub id (local: the path or variable the kit reads)
    revision: Optional[str]            # None: the repository's default branch
    files: Tuple[str, ...]             # glob patterns of what the kit reads
    note: str = ""
    task: Optional[str] = None         # the lm-eval task whose dataset this is

    @property
    def folder(self) -> str:
        """Its place in a mirror (methods/core/hub.py)."""
        if self.kind == "model":
            return self.repo
        if self.kind == "dataset":
            return f"datasets/{self.repo}"
        return "local/" + self.repo.lstrip("$")


def data_objects(spec: str) -> List[HubObject]:
    """The hub objects (or local inputs) a data spec of calibration, evaluation or training reads."""
    from methods.core import hub, text
    from repro import data
    from training import lora, sources
    from training.maxtext import train as maxtext_train

    parquet = hub.PARQUET_CONVERSION
    known = {
        "c4": [HubObject("dataset", text.C4_DATASET, None, ("README.md", text.C4_TRAIN_FILE))],
        "wikitext2": [HubObject("dataset", text.WIKITEXT_DATASET, None, ("README.md", f"{text.WIKITEXT_CONFIG}/*"))],
        "wikitext103-train": [HubObject("dataset", text.WIKITEXT_DATASET, None,
                                        ("README.md", f"{data.WIKITEXT103_CONFIG}/*"))],
        "pg19": [HubObject("dataset", data.PG19_DATASET, None, ("README.md", "data/validation-*"),
                           "streamed: only the validation split's files are read")],
        "bookcorpus": [HubObject("dataset", "bookcorpus", parquet, ("plain_text/train/*.parquet",),
                                 "the hub's parquet conversion of the script dataset")],
        "ptb": [HubObject("dataset", "ptb_text_only", parquet, ("penn_treebank/*/*.parquet",),
                          "the hub's parquet conversion of the script dataset")],
        "dclm": [HubObject("dataset", sources.DCLM_DATASET, sources.DCLM_REVISION, ("**/rank_*.arrow",),
                           "FMS-FSDP arrow shards of Llama-3 tokens")],
        "alpaca-cleaned": [HubObject("dataset", lora.ALPACA_HUB, None, ("README.md", "*.json"))],
        maxtext_train.DCLM_ARRAY_RECORD: [HubObject(
            "local", "$" + maxtext_train.DCLM_ARRAY_RECORD_ENV, None, ("*.array_record",),
            "the collection's llama3_64_array_record files, where the variable points (a glob or gs://)")],
    }
    if spec in known:
        return known[spec]
    if "/" in spec and not hub.is_local_path(spec):
        return [HubObject("local", spec, None, ("*",), "a local folder (read relative to the working directory)")]
    return []


def task_object(task: str) -> HubObject:
    """The dataset an lm-eval task reads, from lm-eval's own task YAML."""
    path, name = task_dataset(task)
    files = ("README.md", f"{name}/*") if name else ("*",)
    return HubObject("dataset", path, None, files, f"lm-eval task {task}" + (f" (config {name})" if name else ""),
                     task=task)


@functools.lru_cache(maxsize=None)
def task_dataset(task: str) -> Tuple[str, Optional[str]]:
    """(dataset_path, dataset_name) of an lm-eval task, following its YAML's includes."""
    config = task_config(task_yaml(task))
    if "dataset_path" not in config:
        raise UsageError(f"lm-eval task {task}: its YAML names no dataset_path")
    return config["dataset_path"], config.get("dataset_name")


@functools.lru_cache(maxsize=None)
def task_yaml(task: str) -> Path:
    """The YAML file lm-eval defines `task` in (its index entry: an object on 0.4.13, a dict before)."""
    index = _lm_eval_index()
    entry = index.task_index.get(task) if hasattr(index, "task_index") else None
    yaml_path = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
    if yaml_path is None:
        raise UsageError(f"lm-eval has no task {task!r} defined by a YAML file")
    return Path(yaml_path)


@functools.lru_cache(maxsize=1)
def _lm_eval_index():
    """lm-eval's task index with its own tasks (one copy for every look-up of this process)."""
    from methods import scoring

    return scoring.task_index((str(scoring.SMOKE_TASK_DIR),), {"<any task of lm-eval's own>"})


def task_config(path: Path) -> dict:
    """A task YAML with its `include` chain merged (functions left unresolved)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    include = config.pop("include", None)
    if include:
        base = task_config(path.parent / include if not Path(include).is_absolute() else Path(include))
        config = {**base, **config}
    return config
