"""Fingerprints: what a stage's result depends on, hashed, so that a rerun of the same inputs is skipped.

A stage's output folder is complete when it holds its manifest (prune.json, train.json) carrying the
fingerprint of its inputs: the options that decide the result and the identity of every input. A
checkpoint is identified by its own stage manifest's fingerprint, else by its files; data by content
(or, above HASH_LIMIT, by size and modification time); a hub id by its name and pinned revision.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

PRUNE_MANIFEST = "prune.json"
TRAIN_MANIFEST = "train.json"
# Manifests a checkpoint directory of the kit may hold, newest stage first.
MANIFESTS = (TRAIN_MANIFEST, PRUNE_MANIFEST)
# Data and checkpoints up to this size are identified by content, larger ones by size and time.
HASH_LIMIT = 256 * 2**20


def fingerprint(value) -> str:
    """The one fingerprint of the kit: sha256 of the value's sorted JSON, 16 hex digits."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(spec: str, path: str) -> Dict[str, object]:
    """A model by its stage manifest's fingerprint, else by its files, else (a hub id) by name."""
    if spec == "smoke":  # converted on each machine: the GGUF it came from is its identity
        return {"spec": spec, "source": smoke_source()}
    folder = Path(path)
    for name in MANIFESTS:
        manifest = folder / name
        if manifest.is_file():
            return {"spec": spec, "manifest": name, "fingerprint": json.loads(manifest.read_text()).get("fingerprint")}
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return {"spec": spec, "files": files_identity(files)}
    return {"spec": spec}


def data_identity(spec: str) -> Dict[str, object]:
    """Local data by content; `smoke` is the shipped calibration text (for every kind, LoRA's too: the
    identity of its instruction set is its name, as it has been since the first smoke references)."""
    from methods.core.text import SMOKE_CALIB_TEXT

    path = SMOKE_CALIB_TEXT if spec == "smoke" else Path(os.path.expanduser(spec))
    if not path.exists():
        return {"spec": spec}  # a hub dataset: its name (and the loader's pinned revision) say it
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"spec": spec, "files": files_identity(files)}


def files_identity(files: List[Path]) -> str:
    digest = hashlib.sha256()
    by_content = sum(p.stat().st_size for p in files) <= HASH_LIMIT
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}".encode())
        if by_content:
            digest.update(path.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def smoke_source() -> str:
    """The smoke model has no hub commit: its identity is the sha256 of the GGUF it was converted from."""
    from methods.core.results import read_json
    from methods.core.smoke_model import MARKER, smoke_model_dir

    return "gguf-sha256:" + read_json(smoke_model_dir() / MARKER)["gguf_sha256"]


def read_manifest(folder, name: str) -> Optional[dict]:
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else None


def manifest_chain(model: str) -> Dict[str, dict]:
    """The stage manifests behind a checkpoint: its train.json and the prune.json of the model it trained."""
    from methods.core.models import resolve

    chain: Dict[str, dict] = {}
    folder = Path(resolve(model))
    trained = read_manifest(folder, TRAIN_MANIFEST)
    if trained is not None:
        chain["train"] = trained
        folder = Path(trained["options"]["model"])
    pruned = read_manifest(folder, PRUNE_MANIFEST)
    if pruned is None and trained is not None:
        # The pruned checkpoint may be gone (lpc repro --keep-stages trained); its record is not.
        pruned = trained.get("lineage", {}).get("prune")
    if pruned is not None:
        chain["prune"] = pruned
    return chain


def lineage(model_path: str) -> Dict[str, dict]:
    """The manifest of the checkpoint a stage reads, kept in the stage's own (not part of its identity)."""
    pruned = read_manifest(model_path, PRUNE_MANIFEST)
    return {"prune": pruned} if pruned is not None else {}
