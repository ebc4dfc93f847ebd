"""Token ids for calibration and for perplexity, sampled exactly as the original code bases did.

Two entry points:

* ``calibration(spec, tokenizer=..., nsamples=..., seqlen=..., seed=...)`` -> LongTensor [nsamples, seqlen]
* ``eval_tokens(spec, tokenizer=...)`` -> LongTensor [1, N], the stream a perplexity protocol windows

Calibration specs
-----------------
``c4``
    Wanda / SparseGPT: ``allenai/c4`` config ``en``, only the file
    ``en/c4-train.00000-of-01024.json.gz``, split train. ``random.seed(seed)`` once, then per sample:
    draw a document with ``random.randint(0, ndocs - 1)``, tokenize it with the tokenizer's default
    special tokens (BOS for Llama), redraw until it has strictly more than ``seqlen`` tokens, draw
    ``start = random.randint(0, ntok - seqlen - 1)`` and keep ``[start, start + seqlen)``. A document
    can be drawn twice.
``wikitext2``
    The Wanda / FLAP ``get_wikitext2`` sampler: ``wikitext-2-raw-v1`` train rows joined with a single
    space (that is what both repositories do; the test split is joined with "\\n\\n"), tokenized once,
    ``random.seed(seed)``, then per sample ``start = random.randint(0, N - seqlen - 1)``.
``bookcorpus``
    The LLM-Pruner / Shortened-LLaMA sampler: ``random.seed(seed)`` (the
    recipes pass 42 for LLM-Pruner, 1234 for Shortened), then per sample: draw a row with
    ``random.randint(0, nrows - 1)``, tokenize it with default special tokens (BOS included in the
    count), redraw until it has **at least** ``seqlen`` tokens and was not accepted before, draw
    ``start = random.randint(0, ntok - seqlen)`` and keep ``[start, start + seqlen)``. Upstream seeds
    Python's ``random`` at program start rather than just before sampling; nothing in between draws
    from it [inference from hf_prune.py], so seeding here gives the same rows.
``smoke``
    The shipped public-domain text ``SMOKE_CALIB_TEXT`` (see below), sampled like a local directory.
a local text path (file or directory)
    The documents are: for a directory, each regular file directly inside it (sorted by name, symlinks
    followed, hidden files and files named README skipped) is one document; for a single file, the
    paragraphs, i.e. the pieces between blank lines (lines holding only whitespace), stripped, empty
    ones dropped. Text is read as UTF-8 with undecodable bytes replaced. Then the ``c4`` algorithm runs
    over this document list. If no document has more than ``seqlen`` tokens, a UsageError names the
    longest one instead of looping forever (upstream would: Wanda at Llama-3's 131072-token seqlen).
``text-stream:PATH``
    The same file or directory read as one stream (the documents joined with "\\n\\n", tokenized once)
    and sampled with the ``wikitext2`` algorithm. Use it when the documents are too short.
a token file ``*.pt`` / ``*.npy``
    A 2-D integer tensor [rows, seqlen_in_file] (``torch.load(weights_only=True)`` / ``numpy.load``
    without pickles). The first ``nsamples`` rows are returned; fewer rows or another seqlen is a
    UsageError. ``load_token_file`` validates without slicing (the CLI uses the file's shape when the
    user gave no ``--nsamples``/``--seqlen``).

``pg19`` / ``wikitext103-train`` / ``windows:PATH`` / ``windows:smoke``
    The Minitron / ShortGPT collection scorer: a text stream tokenized once (one BOS at
    the very start), cut from its beginning into ``min(ntokens // seqlen, nsamples)`` consecutive,
    non-overlapping windows of ``seqlen`` tokens (fewer rows than asked when the stream is short,
    as the original; the seed is unused). ``pg19``: ``emozilla/pg19`` validation, first 8,000 rows
    (all 50 books), column ``text``, joined with one space. ``wikitext103-train``: ``wikitext-103-v1``
    train, first 131,072 rows, joined with "\\n\\n". ``windows:`` reads a local file or directory
    (or the shipped smoke text) as one stream, documents joined with "\\n\\n".

Evaluation specs
----------------
``wikitext2`` (``wikitext-2-raw-v1`` test) and ``ptb`` (``ptb_text_only`` validation, field
``sentence``): rows joined with "\\n\\n" and tokenized once, so a Llama tokenizer puts one BOS at the
very start (the Wanda and LLM-Pruner evaluations). ``smoke`` is ``SMOKE_EVAL_TEXT``. A local file, or a directory's files in
sorted order, is joined with "\\n\\n" and tokenized once. A token file is flattened row by row into
[1, rows * seqlen] (how the golden fixtures are evaluated). ``add_special_tokens=False`` tokenizes
without BOS, for the Shortened-LLaMA per-window-BOS protocol.

Hub data goes through ``datasets.load_dataset``: C4 (whose old ``allenai--c4`` config fails on datasets >= 2.14) by config ``en`` plus explicit
``data_files`` with verification off (the shard does not match the split sizes in the dataset card);
``bookcorpus`` and ``ptb_text_only`` were script datasets, which need ``trust_remote_code`` on datasets
2.20-3.x and no longer run at all on datasets >= 4, where their parquet conversion is read instead.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from methods.errors import UsageError

ASSETS = Path(__file__).resolve().parent / "assets"
SMOKE_CALIB_TEXT = ASSETS / "text" / "calib"
SMOKE_EVAL_TEXT = ASSETS / "text" / "eval.txt"
# Debian/Ubuntu ship these licence texts; handy real English when the kit's own text is not wanted.
OS_LICENSE_TEXTS = Path("/usr/share/common-licenses")

C4_DATASET = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_DATASET = "Salesforce/wikitext"  # the hub's current home of the old canonical "wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"

HUB_CALIBRATION = ("c4", "wikitext2", "bookcorpus")
HUB_EVAL = ("wikitext2", "ptb")
TOKEN_FILE_SUFFIXES = (".pt", ".npy")
STREAM_PREFIX = "text-stream:"

# C4 sampling redraws until a long enough document turns up. Far more redraws than this in a row means
# the corpus has (almost) none, and upstream would spin forever.
MAX_REDRAWS = 200_000

_ACCEPTED_CALIB = ("c4, wikitext2, bookcorpus, pg19, wikitext103-train, smoke, a text file or directory, "
                   "text-stream:PATH, windows:PATH, or a token file (.pt/.npy)")
_ACCEPTED_EVAL = "wikitext2, ptb, smoke, a text file or directory, or a token file (.pt/.npy)"


# ----------------------------------------------------------------------------- public entry points

def calibration(spec: str, *, tokenizer=None, nsamples: int, seqlen: int, seed: int = 0) -> torch.LongTensor:
    """Calibration token ids [nsamples, seqlen] for `spec` (see the module docstring)."""
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    spec = str(spec)
    if is_window_spec(spec):
        return window_calibration(spec, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen)
    if _is_token_file(spec):
        return _rows_from_token_file(spec, nsamples, seqlen)
    if spec == "c4":
        data = _load_c4_train()
        return sample_documents_wanda(len(data), lambda i: data[i]["text"], _encoder(tokenizer),
                                      nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec == "wikitext2":
        text = " ".join(_hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "train", "text"))
        return sample_stream(_encoder(tokenizer)(text), nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec == "bookcorpus":
        data = _load_bookcorpus()
        return sample_documents_llmpruner(len(data), lambda i: data[i]["text"], _encoder(tokenizer),
                                          nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec.startswith(STREAM_PREFIX):
        path = _existing_path(spec[len(STREAM_PREFIX):], _ACCEPTED_CALIB)
        stream = _encoder(tokenizer)("\n\n".join(read_documents(path, paragraphs=False)))
        return sample_stream(stream, nsamples=nsamples, seqlen=seqlen, seed=seed)
    path = _local_text_path(spec, _ACCEPTED_CALIB, SMOKE_CALIB_TEXT)
    encode = _encoder(tokenizer)
    # Local corpora are small: tokenize every document once, which also lets us refuse a corpus with
    # no usable document up front instead of redrawing forever.
    docs = [encode(text) for text in read_documents(path)]
    longest = max((len(d) for d in docs), default=0)
    if longest <= seqlen:
        raise UsageError(f"no document in {path} has more than seqlen={seqlen} tokens (longest: {longest}); "
                         f"use a shorter seqlen or '{STREAM_PREFIX}{path}'")
    return sample_documents_wanda(len(docs), docs.__getitem__, lambda ids: ids,
                                  nsamples=nsamples, seqlen=seqlen, seed=seed)


def eval_tokens(spec: str, *, tokenizer=None, add_special_tokens: bool = True) -> torch.LongTensor:
    """The token stream [1, N] a perplexity protocol windows (see the module docstring)."""
    spec = str(spec)
    if _is_token_file(spec):
        return load_token_file(spec).reshape(1, -1)
    if spec == "wikitext2":
        text = "\n\n".join(_hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "test", "text"))
    elif spec == "ptb":
        text = "\n\n".join(_hub_text("ptb_text_only", "penn_treebank", "validation", "sentence",
                                     script=True))
    else:
        path = _local_text_path(spec, _ACCEPTED_EVAL, SMOKE_EVAL_TEXT)
        text = "\n\n".join(read_documents(path, paragraphs=False))
    ids = _encoder(tokenizer, add_special_tokens=add_special_tokens)(text)
    return torch.tensor(ids, dtype=torch.long).reshape(1, -1)


def load_token_file(path) -> torch.LongTensor:
    """Load and validate a token-id file: 2-D, integer, non-negative. Returned as is (int64)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UsageError(f"token file not found: {path}")
    if path.suffix not in TOKEN_FILE_SUFFIXES:
        raise UsageError(f"token file must end in .pt or .npy: {path}")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse is the user's file, not our bug
        raise UsageError(f"cannot load token file {path}: {type(exc).__name__}: {_one_line(exc)}") from None
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "iu":
            raise UsageError(f"token file {path} must hold integer ids, not dtype {array.dtype}")
        if array.ndim == 2 and array.size and array.min() < 0:
            raise UsageError(f"token file {path} holds negative token ids (min {int(array.min())})")
        array = torch.from_numpy(array.astype(np.int64))
    elif not isinstance(array, torch.Tensor):
        raise UsageError(f"token file {path} must hold one tensor, not a {type(array).__name__}")
    tokens = array
    if tokens.dim() != 2:
        raise UsageError(f"token file {path} must be 2-D [nsamples, seqlen], got shape {list(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise UsageError(f"token file {path} must hold integer ids, not {tokens.dtype}")
    if tokens.numel() == 0:
        raise UsageError(f"token file {path} is empty (shape {list(tokens.shape)})")
    if int(tokens.min()) < 0:
        raise UsageError(f"token file {path} holds negative token ids (min {int(tokens.min())})")
    return tokens.to(torch.long).contiguous()


# ----------------------------------------------------------------------------- the samplers

def sample_documents_wanda(ndocs: int, get: Callable[[int], object], encode: Callable[[object], List[int]], *,
                           nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """The Wanda/SparseGPT C4 sampler over `ndocs` documents; `encode(get(i))` gives token ids."""
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        for _attempt in range(MAX_REDRAWS):
            ids = encode(get(random.randint(0, ndocs - 1)))
            if len(ids) > seqlen:
                break
        else:
            raise UsageError(f"found no document with more than seqlen={seqlen} tokens in "
                             f"{MAX_REDRAWS} draws; use a shorter seqlen")
        start = random.randint(0, len(ids) - seqlen - 1)
        rows.append(list(ids[start:start + seqlen]))
    return torch.tensor(rows, dtype=torch.long)


def sample_documents_llmpruner(ndocs: int, get: Callable[[int], object], encode: Callable[[object], List[int]], *,
                               nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """The LLM-Pruner/Shortened BookCorpus sampler: >= seqlen tokens, no document twice."""
    random.seed(seed)
    accepted = set()
    rows = []
    for _ in range(nsamples):
        for _attempt in range(MAX_REDRAWS):
            index = random.randint(0, ndocs - 1)
            ids = encode(get(index))
            if len(ids) >= seqlen and index not in accepted:
                accepted.add(index)
                break
        else:
            raise UsageError(f"found no unused document with at least seqlen={seqlen} tokens in "
                             f"{MAX_REDRAWS} draws; use a shorter seqlen or fewer samples")
        start = random.randint(0, len(ids) - seqlen)
        rows.append(list(ids[start:start + seqlen]))
    return torch.tensor(rows, dtype=torch.long)


def sample_stream(ids: Sequence[int], *, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """The Wanda/FLAP wikitext2 sampler: random windows of one token stream."""
    if len(ids) <= seqlen:
        raise UsageError(f"the token stream has {len(ids)} tokens; seqlen={seqlen} needs more than that")
    stream = torch.as_tensor(list(ids), dtype=torch.long)
    random.seed(seed)
    starts = [random.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s:s + seqlen] for s in starts])


# ----------------------------------------------------------------------------- local text

def read_documents(path: Path, *, paragraphs: bool = True) -> List[str]:
    """The documents of a local text path (rule in the module docstring).

    With paragraphs=False a single file is one document (for streams, where the split does not matter).
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.name != "README")
        if not files:
            raise UsageError(f"no text files in directory {path}")
        return [_read_text(p) for p in files]
    text = _read_text(path)
    if not paragraphs:
        return [text]
    return [piece.strip() for piece in re.split(r"\n[ \t\r\f\v]*\n", text) if piece.strip()]


def _read_text(path: Path) -> str:
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _local_text_path(spec: str, accepted: str, smoke: Path) -> Path:
    if spec == "smoke":
        return smoke
    return _existing_path(spec, accepted)


def _existing_path(raw: str, accepted: str) -> Path:
    path = Path(os.path.expanduser(raw))
    if path.exists():
        return path
    if os.sep in raw or raw.startswith((".", "~")) or path.suffix:
        raise UsageError(f"data path not found: {raw}")
    raise UsageError(f"unknown data spec {raw!r}; expected {accepted}")


def _is_token_file(spec: str) -> bool:
    return spec.lower().endswith(TOKEN_FILE_SUFFIXES) and not spec.startswith(STREAM_PREFIX)


def _rows_from_token_file(spec: str, nsamples: int, seqlen: int) -> torch.LongTensor:
    tokens = load_token_file(spec)
    rows, length = tokens.shape
    if length != seqlen:
        raise UsageError(f"token file {spec} has seqlen {length}, but seqlen {seqlen} was requested")
    if rows < nsamples:
        raise UsageError(f"token file {spec} has {rows} rows, fewer than the {nsamples} samples requested")
    return tokens[:nsamples].clone()


# ----------------------------------------------------------------------------- tokenizing

def _encoder(tokenizer, *, add_special_tokens: bool = True) -> Callable[[str], List[int]]:
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to turn text into token ids (only .pt/.npy token files work without one)")

    def encode(text: str) -> List[int]:
        # verbose=False: whole documents are longer than model_max_length, which is fine here
        # because no model sees them unwindowed.
        return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    return encode


# ----------------------------------------------------------------------------- hub loaders

def _load_dataset(*args, script: bool = False, **kwargs):
    try:
        import datasets
    except ImportError:
        raise UsageError("hub data needs the 'datasets' package: pip install datasets") from None
    major = int(datasets.__version__.split(".")[0])
    if script and major < 4:
        # Script datasets run their loading script only when trusted (2.20-3.x); on datasets >= 4 the
        # scripts are gone and the parquet conversion the hub keeps under refs/convert/parquet is read.
        kwargs["trust_remote_code"] = True
    elif script:
        kwargs["revision"] = "refs/convert/parquet"
    return datasets.load_dataset(*args, **kwargs)


def _load_c4_train():
    return _load_dataset(C4_DATASET, "en", data_files={"train": C4_TRAIN_FILE}, split="train",
                         verification_mode="no_checks")


def _load_bookcorpus():
    # [unverified] on datasets >= 4 the parquet conversion is assumed to keep the script's row order.
    return _load_dataset("bookcorpus", split="train", script=True)


def _hub_text(path: str, name: str, split: str, field: str, *, script: bool = False) -> List[str]:
    return list(_load_dataset(path, name, split=split, script=script)[field])


# ----------------------------------------------------------------------------- small helpers

def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


# ----------------------------------------------------------------------------- consecutive windows

PG19_DATASET = "emozilla/pg19"
WIKITEXT103_CONFIG = "wikitext-103-v1"   # the tokenized (<unk>) variant, as the collection loads it
WINDOWS_PREFIX = "windows:"
WINDOW_SPECS = ("pg19", "wikitext103-train")
# How many rows of each hub split the collection's scorer reads.
PG19_ROWS = 8000
WIKITEXT103_ROWS = 131072


def is_window_spec(spec: str) -> bool:
    return spec in WINDOW_SPECS or spec.startswith(WINDOWS_PREFIX)


def consecutive_windows(ids: Sequence[int], *, nsamples: int, seqlen: int) -> torch.LongTensor:
    """The first min(len(ids) // seqlen, nsamples) non-overlapping windows of the stream, in order."""
    count = min(len(ids) // seqlen, nsamples)
    if count < 1:
        raise UsageError(f"the token stream has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    return torch.as_tensor(list(ids[:count * seqlen]), dtype=torch.long).reshape(count, seqlen)


def window_calibration(spec: str, *, tokenizer, nsamples: int, seqlen: int) -> torch.LongTensor:
    """Calibration rows for the window specs (module docstring): one stream, consecutive windows."""
    if spec == "pg19":
        text = " ".join(_first_rows(PG19_DATASET, None, "validation", "text", PG19_ROWS))
    elif spec == "wikitext103-train":
        text = "\n\n".join(_first_rows(WIKITEXT_DATASET, WIKITEXT103_CONFIG, "train", "text", WIKITEXT103_ROWS))
    else:
        path = _local_text_path(spec[len(WINDOWS_PREFIX):], _ACCEPTED_CALIB, SMOKE_CALIB_TEXT)
        text = "\n\n".join(read_documents(path, paragraphs=False))
    return consecutive_windows(_encoder(tokenizer)(text), nsamples=nsamples, seqlen=seqlen)


def _first_rows(path: str, name, split: str, field: str, count: int) -> List[str]:
    # Streaming reads only the split's own files: PG19's train split alone is some 11 GB.
    import itertools

    rows = _load_dataset(path, name, split=split, streaming=True)
    return [row[field] for row in itertools.islice(rows, count)]


# ----------------------------------------------------------------------------- training data

DCLM_DATASET = "Zephyr271828/dclm-260b"      # the collection's DCLM-Baseline-1.0 subset, Llama-3 tokens
DCLM_REVISION = "llama3-pyarrow-60b"          # 60B tokens in the FMS-FSDP arrow format
TRAINING_TOKEN_SUFFIXES = (".pt", ".npy", ".bin")
_ACCEPTED_TRAIN = ("a token file (.pt/.npy/.bin), a folder of rank_<k>.arrow files, dclm, smoke, "
                   "a local text file or folder, c4, wikitext2 or bookcorpus")


def training_source(spec: str, *, tokenizer=None, seqlen: int, seed: int = 0, shuffle: bool = True,
                    vocab_size: Optional[int] = None, dynamic=None):
    """What `lpc train --data SPEC` reads, as a factory `(layout, rank) -> stream` (training/data.py).

    Token files and text become random-access windows served in global batches; text is packed as
    [BOS] + document + [EOS] (the tokenizer's own ids; a missing one is left out). A folder of
    `rank_<k>.arrow` files, and `dclm` (downloaded from the hub), are read in the FMS-FSDP way.
    With `dynamic` (training.data.Dynamic: dynamic batch loading), SPEC is a folder (`smoke`: the
    shipped text, one chapter file per domain) and each domain is its entry of that name: a token
    file, a text file (paragraphs as documents) or a folder of text files.
    Everything is validated here, before any training starts.
    """
    from training import data as train_data

    spec = str(spec)
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
    return lambda layout, rank: train_data.GlobalStream(windows, layout, rank=rank, seed=seed, shuffle=shuffle)


def _domain_source(spec: str, dynamic, *, tokenizer, seqlen: int, seed: int, vocab_size: Optional[int]):
    from training import data as train_data

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
    from training import data as train_data

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
    documents = [_encoder(tokenizer, add_special_tokens=False)(text) for text in read_documents(entry)]
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return train_data.Windows(train_data.pack_documents(documents, bos=bos, eos=eos, seqlen=seqlen), seqlen,
                              origin=str(entry))


def _training_documents(spec: str, tokenizer) -> List[List[int]]:
    if spec == "c4":
        texts = [row["text"] for row in _load_c4_train()]
    elif spec == "wikitext2":
        texts = [t for t in _hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "train", "text") if t.strip()]
    elif spec == "bookcorpus":
        texts = [row["text"] for row in _load_bookcorpus()]
    else:
        texts = read_documents(_local_text_path(spec, _ACCEPTED_TRAIN, SMOKE_CALIB_TEXT))
    encode = _encoder(tokenizer, add_special_tokens=False)
    return [encode(text) for text in texts]


def _dclm_folder() -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("the dclm data needs huggingface_hub: pip install huggingface_hub") from None
    from training.data import ARROW_FILE

    root = Path(snapshot_download(DCLM_DATASET, repo_type="dataset", revision=DCLM_REVISION,
                                  allow_patterns=["*.arrow"]))
    folders = sorted({p.parent for p in root.rglob("*.arrow") if ARROW_FILE.match(p.name)})
    if not folders:
        raise UsageError(f"the {DCLM_DATASET}@{DCLM_REVISION} download holds no rank_<k>.arrow files")
    return folders[0]
