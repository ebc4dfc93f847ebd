"""The one door to the Hugging Face hub: every model, tokenizer and dataset the kit reads from the hub
goes through here, so that a local mirror can stand in for the hub.

With `LPC_HUB_MIRROR=DIR` set, nothing is fetched: a hub read is answered from a directory laid out
like the hub's own URLs, each repository as it is at the revision the kit pins (`lpc mirror list`
prints repository, revision, files and folder of every object a profile reads):

    DIR/<repo id>/...              a model repository (config.json, *.safetensors, tokenizer files)
    DIR/datasets/<repo id>/...     a dataset repository (README.md, its data files)

A dataset the kit reads as the hub's parquet conversion (`revision="refs/convert/parquet"`: the old
script datasets) keeps that conversion's layout, `<config>/<split>/*.parquet`, and is read as parquet
files; every other dataset folder is read by `datasets.load_dataset` exactly as it reads the hub
repository (its README configs, its file patterns), so a mirror exercises the same parsing. Unset, the
kit reads the hub as it always did. Cluster nodes without internet, and the paper-profile rehearsal
(docs/rehearsal.md), use the same path.

lm-eval reads its task datasets itself (`datasets.load_dataset(path=<hub id>, ...)` from its task
YAMLs), and how its task configs can be overridden differs between its 0.4.x releases; what every
release shares is that call, so `routed_datasets()` sends it through `load_dataset` below while
lm-eval runs.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from methods.core.errors import UsageError

MIRROR_ENV = "LPC_HUB_MIRROR"
DATASETS = "datasets"
PARQUET_CONVERSION = "refs/convert/parquet"


def mirror() -> Optional[Path]:
    """The mirror directory, when one is set (refused in one line when it is not a directory)."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    if not value:
        return None
    root = Path(os.path.expanduser(value))
    if not root.is_dir():
        raise UsageError(f"{MIRROR_ENV}={value} is not a directory")
    return root


def model_dir(root: Path, repo: str) -> Path:
    return root / repo


def dataset_dir(root: Path, repo: str) -> Path:
    return root / DATASETS / repo


def _missing(what: str, repo: str, folder: Path) -> UsageError:
    return UsageError(f"the hub mirror ({MIRROR_ENV}) has no {what} {repo} (expected {folder}); fill it on a "
                      "machine with access: `lpc mirror list` names every object, docs/rehearsal.md says how")


def model(repo: str) -> str:
    """Where a hub model is read from: its mirror folder, or the hub id itself (transformers fetches it)."""
    root = mirror()
    if root is None:
        return repo
    folder = model_dir(root, repo)
    if not (folder / "config.json").is_file():
        raise _missing("model", repo, folder)
    return str(folder)


def model_files(repo: str, revision: Optional[str] = None, patterns=("*.json", "*.safetensors", "tokenizer*")) -> Path:
    """A local folder holding a hub model's files: its mirror folder, or a snapshot download."""
    root = mirror()
    if root is not None:
        return Path(model(repo))
    return snapshot(repo, revision=revision, patterns=patterns)


def snapshot(repo: str, *, revision: Optional[str] = None, patterns=None, dataset: bool = False) -> Path:
    """The files of a hub repository at `revision` matching `patterns`, as a local folder."""
    root = mirror()
    if root is not None:
        folder = dataset_dir(root, repo) if dataset else model_dir(root, repo)
        if not folder.is_dir():
            raise _missing("dataset" if dataset else "model", repo, folder)
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"reading {repo} from the hub needs huggingface_hub: pip install huggingface_hub") from None
    return Path(snapshot_download(repo, repo_type="dataset" if dataset else None, revision=revision,
                                  allow_patterns=list(patterns) if patterns else None))


def load_dataset(path: str, name: Optional[str] = None, *, revision: Optional[str] = None, **kwargs):
    """`datasets.load_dataset` of a hub dataset, from the mirror when one is set (module docstring)."""
    datasets = _datasets()
    root = mirror()
    if root is None:
        if revision is not None:
            kwargs["revision"] = revision
        return _ORIGINAL.get("load_dataset", datasets.load_dataset)(path, name, **kwargs)
    folder = dataset_dir(root, path)
    if not folder.is_dir():
        raise _missing("dataset", path, folder)
    kwargs.pop("trust_remote_code", None)  # nothing in a mirror runs a loading script
    if revision == PARQUET_CONVERSION:
        return _parquet_conversion(folder, path, name, **kwargs)
    if "data_files" not in kwargs:
        kwargs.update(_config_files(folder, name))
    return _ORIGINAL.get("load_dataset", datasets.load_dataset)(str(folder), name, **kwargs)


def _config_files(folder: Path, name: Optional[str]) -> dict:
    """The data files its README declares for config `name`, as `data_files`. On the hub datasets infers
    the file type from the first config's files, which a mirror holding only the configs the kit reads
    (wikitext-2 of Salesforce/wikitext) lacks; naming the config's own files keeps the rest as on the hub."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        card = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return {}
    configs = {c.get("config_name", "default"): c for c in card.get("configs") or [] if isinstance(c, dict)}
    config = configs.get(name if name is not None else "default")
    if config is None and name is None and len(configs) == 1:
        config = next(iter(configs.values()))
    files = config.get("data_files") if config else None
    if isinstance(files, list) and all(isinstance(f, dict) and "split" in f for f in files):
        return {"data_files": {f["split"]: f["path"] for f in files}}
    return {"data_files": files} if files else {}


def _parquet_conversion(folder: Path, repo: str, name: Optional[str], **kwargs):
    """The hub's parquet conversion of a script dataset, `<config>/<split>/*.parquet`, read as parquet."""
    configs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if name is None and len(configs) == 1:
        name = configs[0]
    if name not in configs:
        raise UsageError(f"the hub mirror's parquet conversion of {repo} has no config {name!r} "
                         f"(it has {', '.join(configs) or 'none'})")
    splits = {p.name: sorted(str(f) for f in p.glob("*.parquet"))
              for p in sorted((folder / name).iterdir()) if p.is_dir()}
    files = {split: found for split, found in splits.items() if found}
    if not files:
        raise UsageError(f"the hub mirror's {repo}/{name} holds no <split>/*.parquet files")
    return _ORIGINAL.get("load_dataset", _datasets().load_dataset)("parquet", data_files=files, **kwargs)


def datasets_version() -> str:
    return _datasets().__version__


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UsageError("hub data needs the 'datasets' package: pip install datasets") from None
    return datasets


_ORIGINAL: dict = {}


@contextlib.contextmanager
def routed_datasets() -> Iterator[None]:
    """While it is open, `datasets.load_dataset` of a hub id (lm-eval's task datasets) reads the mirror.

    Local folders, files and the packaged builders (json, parquet, ...) pass through unchanged; without a
    mirror nothing changes at all."""
    if mirror() is None:
        yield
        return
    datasets = _datasets()
    original = datasets.load_dataset
    _ORIGINAL["load_dataset"] = original

    def routed(path, name=None, *args, **kwargs):
        if args or not is_hub_dataset(str(path)):  # lm-eval passes keywords; anything else is not its read
            return original(path, name, *args, **kwargs)
        return load_dataset(str(path), name, **kwargs)

    datasets.load_dataset = routed
    try:
        yield
    finally:
        datasets.load_dataset = original
        _ORIGINAL.pop("load_dataset", None)


def is_local_path(spec: str) -> bool:
    """A path on this machine (existing, or written as one), never a hub id."""
    return spec.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(spec))


def is_hub_dataset(path: str) -> bool:
    """A hub id, not a packaged builder (json, parquet, ...), a local path or a URL."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return not (path in _PACKAGED_DATASETS_MODULES or is_local_path(path) or "://" in path)
