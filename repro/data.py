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

import random
from typing import Callable, List, Sequence

import torch

from methods.core.errors import UsageError
from methods.core.text import (SMOKE_CALIB_TEXT, SMOKE_EVAL_TEXT, WIKITEXT_CONFIG, WIKITEXT_DATASET, bookcorpus,
                               c4_train, check_positive, encoder, existing_path, hub_text, is_token_file,
                               load_dataset, load_token_file, local_text_path, read_documents)

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
    check_positive("nsamples", nsamples)
    check_positive("seqlen", seqlen)
    spec = str(spec)
    if is_window_spec(spec):
        return window_calibration(spec, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen)
    if _is_token_file(spec):
        return _rows_from_token_file(spec, nsamples, seqlen)
    if spec == "c4":
        data = c4_train()
        return sample_documents_wanda(len(data), lambda i: data[i]["text"], encoder(tokenizer),
                                      nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec == "wikitext2":
        text = " ".join(hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "train", "text"))
        return sample_stream(encoder(tokenizer)(text), nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec == "bookcorpus":
        data = bookcorpus()
        return sample_documents_llmpruner(len(data), lambda i: data[i]["text"], encoder(tokenizer),
                                          nsamples=nsamples, seqlen=seqlen, seed=seed)
    if spec.startswith(STREAM_PREFIX):
        path = existing_path(spec[len(STREAM_PREFIX):], _ACCEPTED_CALIB)
        stream = encoder(tokenizer)("\n\n".join(read_documents(path, paragraphs=False)))
        return sample_stream(stream, nsamples=nsamples, seqlen=seqlen, seed=seed)
    path = local_text_path(spec, _ACCEPTED_CALIB, SMOKE_CALIB_TEXT)
    encode = encoder(tokenizer)
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
        text = "\n\n".join(hub_text(WIKITEXT_DATASET, WIKITEXT_CONFIG, "test", "text"))
    elif spec == "ptb":
        text = "\n\n".join(hub_text("ptb_text_only", "penn_treebank", "validation", "sentence",
                                     script=True))
    else:
        path = local_text_path(spec, _ACCEPTED_EVAL, SMOKE_EVAL_TEXT)
        text = "\n\n".join(read_documents(path, paragraphs=False))
    ids = encoder(tokenizer, add_special_tokens=add_special_tokens)(text)
    return torch.tensor(ids, dtype=torch.long).reshape(1, -1)


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


def _is_token_file(spec: str) -> bool:
    return is_token_file(spec) and not spec.startswith(STREAM_PREFIX)


def _rows_from_token_file(spec: str, nsamples: int, seqlen: int) -> torch.LongTensor:
    tokens = load_token_file(spec)
    rows, length = tokens.shape
    if length != seqlen:
        raise UsageError(f"token file {spec} has seqlen {length}, but seqlen {seqlen} was requested")
    if rows < nsamples:
        raise UsageError(f"token file {spec} has {rows} rows, fewer than the {nsamples} samples requested")
    return tokens[:nsamples].clone()


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
        path = local_text_path(spec[len(WINDOWS_PREFIX):], _ACCEPTED_CALIB, SMOKE_CALIB_TEXT)
        text = "\n\n".join(read_documents(path, paragraphs=False))
    return consecutive_windows(encoder(tokenizer)(text), nsamples=nsamples, seqlen=seqlen)


def _first_rows(path: str, name, split: str, field: str, count: int) -> List[str]:
    # Streaming reads only the split's own files: PG19's train split alone is some 11 GB.
    import itertools

    rows = load_dataset(path, name, split=split, streaming=True)
    return [row[field] for row in itertools.islice(rows, count)]
