"""What `lpc train --data SPEC` reads, as a factory `(layout, rank) -> stream` (training/data.py).

Token files and text become random-access windows served in global batches; text is packed as
[BOS] + document + [EOS] (the tokenizer's own ids; a missing one is left out). A folder of
`rank_<k>.arrow` files, and `dclm` (downloaded from the hub), are read in the FMS-FSDP way. With
dynamic batch loading (`--domains`), SPEC is a folder (`smoke`: the shipped text, one chapter file per
domain) and each domain is its entry of that name: a token file, a text file (paragraphs as
documents) or a folder of text files. Everything is validated here, before any training starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from methods.core.errors import UsageError
from methods.core.text import (FLAT_TOKEN_SUFFIX, SMOKE_CALIB_TEXT, TOKEN_FILE_SUFFIXES, WIKITEXT_CONFIG,
                               WIKITEXT_DATASET, bookcorpus, c4_train, encoder, hub_text, local_text_path,
                               read_documents)
from training import data as train_data

DCLM_DATASET = "Zephyr271828/dclm-260b"      # the collection's DCLM-Baseline-1.0 subset, Llama-3 tokens
DCLM_REVISION = "llama3-pyarrow-60b"          # 60B tokens in the FMS-FSDP arrow format
TRAINING_TOKEN_SUFFIXES = TOKEN_FILE_SUFFIXES + (FLAT_TOKEN_SUFFIX,)
_ACCEPTED_TRAIN = ("a token file (.pt/.npy/.bin), a folder of rank_<k>.arrow files, dclm, smoke, "
                   "a local text file or folder, c4, wikitext2 or bookcorpus")


def training_source(options, *, tokenizer=None, vocab_size: Optional[int] = None):
    """The data factory of a training stage (module docstring), from its options."""
    spec = str(options.data)
    seqlen, seed = options.seqlen, options.seed
    dynamic = train_data.Dynamic.from_options(options)
    path = Path(os.path.expanduser(spec))
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if dynamic is not None:
        return _domain_source(spec, dynamic, tokenizer=tokenizer, seqlen=seqlen, seed=seed, vocab_size=vocab_size)
    if spec == "dclm" or (path.is_dir() and any(train_data.ARROW_FILE.match(p.name) for p in path.iterdir())):
        folder = _dclm_folder() if spec == "dclm" else path
        return lambda layout, rank: train_data.ArrowShards(folder, layout, rank=rank, seqlen=seqlen, bos=bos, eos=eos)
    if spec.lower().endswith(TRAINING_TOKEN_SUFFIXES):
        windows = train_data.Windows.from_file(spec, seqlen)
    else:
        windows = train_data.Windows(train_data.pack_documents(_training_documents(spec, tokenizer), bos=bos,
                                                               eos=eos, seqlen=seqlen), seqlen, origin=spec)
    if vocab_size is not None and windows.max_id() >= vocab_size:
        raise UsageError(f"{spec} holds token id {windows.max_id()}, outside the model's vocabulary of {vocab_size}")
    return lambda layout, rank: train_data.GlobalStream(windows, layout, rank=rank, seed=seed,
                                                        shuffle=options.shuffle)


def _domain_source(spec: str, dynamic, *, tokenizer, seqlen: int, seed: int, vocab_size: Optional[int]):
    folder = SMOKE_CALIB_TEXT if spec == "smoke" else Path(os.path.expanduser(spec))
    train = [_domain_windows(folder, name, tokenizer, seqlen, "--data") for name in dynamic.names]
    if dynamic.eval_data:
        held_out = Path(os.path.expanduser(dynamic.eval_data))
        evaluation = [_domain_windows(held_out, name, tokenizer, seqlen, "--eval-data") for name in dynamic.names]
    else:
        train, evaluation = map(list, zip(*(w.split(dynamic.eval_windows) for w in train)))
    for windows in train + evaluation:
        if vocab_size is not None and windows.max_id() >= vocab_size:
            raise UsageError(f"{windows.origin} holds token id {windows.max_id()}, outside the model's vocabulary "
                             f"of {vocab_size}")
    return lambda layout, rank: train_data.DomainStream(train, evaluation, layout, rank=rank, seed=seed,
                                                        dynamic=dynamic)


def _domain_windows(folder: Path, name: str, tokenizer, seqlen: int, flag: str):
    """The domain `name` of a dynamic-loading folder: its entry of that name (any suffix), as windows."""
    if not folder.is_dir():
        raise UsageError(f"dynamic batch loading reads one entry per domain from a folder; {flag} {folder} is not one")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    matches = [p for p in entries if p.name == name or (p.is_file() and p.stem == name)]
    if len(matches) != 1:
        known = ", ".join(sorted({p.stem if p.is_file() else p.name for p in entries}))
        problem = "no entry" if not matches else "more than one entry"
        raise UsageError(f"unknown domain {name!r}: {flag} {folder} has {problem} named {name} (it has {known})")
    entry = matches[0]
    if entry.is_file() and entry.suffix in TRAINING_TOKEN_SUFFIXES:
        return train_data.Windows.from_file(entry, seqlen)
    documents = [encoder(tokenizer, add_special_tokens=False)(text) for text in read_documents(entry)]
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return train_data.Windows(train_data.pack_documents(documents, bos=bos, eos=eos, seqlen=seqlen), seqlen,
                              origin=str(entry))


def _training_documents(spec: str, tokenizer) -> List[List[int]]:
    if spec == "c4":
        texts = [row["text"] for row in c4_train()]
    elif spec == "wikitext2":
        texts = [t for t in hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "train", "text") if t.strip()]
    elif spec == "bookcorpus":
        texts = [row["text"] for row in bookcorpus()]
    else:
        texts = read_documents(local_text_path(spec, _ACCEPTED_TRAIN, SMOKE_CALIB_TEXT))
    encode = encoder(tokenizer, add_special_tokens=False)
    return [encode(text) for text in texts]


def _dclm_folder() -> Path:
    from methods.core import hub

    root = hub.snapshot(DCLM_DATASET, revision=DCLM_REVISION, patterns=["*.arrow"], dataset=True)
    folders = sorted({p.parent for p in root.rglob("*.arrow") if train_data.ARROW_FILE.match(p.name)})
    if not folders:
        raise UsageError(f"the {DCLM_DATASET}@{DCLM_REVISION} download holds no rank_<k>.arrow files")
    return folders[0]
