"""What calibration, training and evaluation read: local text, hub text, token files, and tokenizing.

Local text. A directory's documents are its regular files (sorted by name, symlinks followed, hidden
files and files named README skipped); a single file's documents are its paragraphs, the pieces
between blank lines (lines holding only whitespace), stripped, empty ones dropped. Text is read as
UTF-8 with undecodable bytes replaced. `smoke` names the shipped public-domain text (assets/text).

Token files. `.pt` (one integer tensor, `torch.load(weights_only=True)`), `.npy` (no pickles), and, for
training, a raw little-endian uint32 `.bin` stream. `read_token_file` is the one reader: it checks the
suffix, that the file loads, that it holds integer ids, and its dimensions; each caller adds the shape
it needs (`load_token_file`: 2-D, non-negative, as int64).

Hub datasets go through `load_dataset`, which knows the `datasets` versions' differences: script
datasets (bookcorpus, ptb_text_only) need `trust_remote_code` on datasets 2.20-3.x and are read from
their parquet conversion on datasets >= 4, where scripts no longer run (and from a hub mirror, which
holds that conversion, on any version). Every hub read passes methods/core/hub.py.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Union

from methods.core.errors import UsageError

if TYPE_CHECKING:
    import torch

ASSETS = Path(__file__).resolve().parent / "assets"
SMOKE_CALIB_TEXT = ASSETS / "text" / "calib"         # chapters I-XII: calibration and training
SMOKE_EVAL_TEXT = ASSETS / "text" / "eval.txt"       # chapters XXII-XXV: perplexity, never trained on
SMOKE_INSTRUCTIONS = ASSETS / "recovery" / "smoke_instructions.jsonl"   # LoRA's `data: smoke`
SMOKE_TASKS = ASSETS / "tasks"                       # the kit's own multiple-choice task

C4_DATASET = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
WIKITEXT_DATASET = "Salesforce/wikitext"  # the hub's current home of the old canonical "wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"

TOKEN_FILE_SUFFIXES = (".pt", ".npy")
FLAT_TOKEN_SUFFIX = ".bin"
BIN_DTYPE = "<u4"


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


def local_text_path(spec: str, accepted: str, smoke: Path) -> Path:
    """`smoke` (the shipped `smoke` path), or an existing local path; else one line saying what is accepted."""
    if spec == "smoke":
        return smoke
    return existing_path(spec, accepted)


def existing_path(raw: str, accepted: str) -> Path:
    path = Path(os.path.expanduser(raw))
    if path.exists():
        return path
    if os.sep in raw or raw.startswith((".", "~")) or path.suffix:
        raise UsageError(f"data path not found: {raw}")
    raise UsageError(f"unknown data spec {raw!r}; expected {accepted}")


# ----------------------------------------------------------------------------- tokenizing

def encoder(tokenizer, *, add_special_tokens: bool = True) -> Callable[[str], List[int]]:
    if tokenizer is None:
        raise UsageError("a tokenizer is needed to turn text into token ids (only .pt/.npy token files work without one)")

    def encode(text: str) -> List[int]:
        # verbose=False: whole documents are longer than model_max_length, which is fine here
        # because no model sees them unwindowed.
        return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])

    return encode


# ----------------------------------------------------------------------------- hub text

def load_dataset(path: str, name=None, *, script: bool = False, **kwargs):
    """A hub dataset through the kit's one hub door (methods/core/hub.py), knowing the `datasets` versions."""
    from methods.core import hub

    major = int(hub.datasets_version().split(".")[0])
    if script and (major >= 4 or hub.mirror() is not None):
        # On datasets >= 4 the loading scripts are gone and the parquet conversion the hub keeps under
        # refs/convert/parquet is read; a mirror holds that conversion for every datasets version.
        kwargs["revision"] = hub.PARQUET_CONVERSION
    elif script:
        # Script datasets run their loading script only when trusted (2.20-3.x).
        kwargs["trust_remote_code"] = True
    return hub.load_dataset(path, name, **kwargs)


def c4_train():
    """C4 train shard 00000 (Wanda / SparseGPT): config `en` plus explicit data_files, verification
    off (the shard does not match the split sizes of the dataset card; the old `allenai--c4` config
    fails on datasets >= 2.14)."""
    return load_dataset(C4_DATASET, "en", data_files={"train": C4_TRAIN_FILE}, split="train",
                        verification_mode="no_checks")


def bookcorpus():
    # [unverified] on datasets >= 4 the parquet conversion is assumed to keep the script's row order.
    return load_dataset("bookcorpus", split="train", script=True)


def hub_text(path: str, name: str, split: str, field: str, *, script: bool = False) -> List[str]:
    return list(load_dataset(path, name, split=split, script=script)[field])


# ----------------------------------------------------------------------------- token files

def read_token_file(path, *, flat: bool = False):
    """A token file as an integer array: a numpy array (memory-mapped for .npy and .bin) or, for .pt,
    a torch tensor. 2-D [rows, width]; with `flat`, also a 1-D stream (.npy) or a .bin stream."""
    import numpy as np

    path = Path(os.path.expanduser(str(path)))
    suffixes = TOKEN_FILE_SUFFIXES + ((FLAT_TOKEN_SUFFIX,) if flat else ())
    if not path.is_file():
        raise UsageError(f"token file not found: {path}")
    if path.suffix not in suffixes:
        raise UsageError(f"token file must end in {', '.join(suffixes)}: {path}")
    if path.suffix == FLAT_TOKEN_SUFFIX:
        size = path.stat().st_size
        if size % np.dtype(BIN_DTYPE).itemsize:
            raise UsageError(f"{path} is {size} bytes, not a whole number of uint32 token ids")
        return np.memmap(path, dtype=BIN_DTYPE, mode="r")
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            import torch

            array = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse is the user's file, not our bug
        raise UsageError(f"cannot load token file {path}: {type(exc).__name__}: {one_line_of(exc)}") from None
    if isinstance(array, np.ndarray):
        integer = array.dtype.kind in "iu"
        dtype = f"dtype {array.dtype}"
    elif type(array).__module__.startswith("torch") and hasattr(array, "dtype"):
        integer = not (array.dtype.is_floating_point or array.dtype.is_complex or str(array.dtype) == "torch.bool")
        dtype = str(array.dtype)
    else:
        raise UsageError(f"token file {path} must hold one tensor, not a {type(array).__name__}")
    dims = (1, 2) if flat and path.suffix == ".npy" else (2,)
    if array.ndim not in dims:
        shape = "[nsamples, seqlen]" + (" or a flat stream" if len(dims) > 1 else "")
        raise UsageError(f"token file {path} must be 2-D {shape}, got shape {list(array.shape)}")
    if not integer:
        raise UsageError(f"token file {path} must hold integer ids, not {dtype}")
    return array


def load_token_file(path) -> "torch.LongTensor":
    """A 2-D file of token ids [rows, seqlen] (calibration, evaluation), non-negative, as int64."""
    import numpy as np
    import torch

    array = read_token_file(path)
    tokens = torch.from_numpy(np.array(array, dtype=np.int64)) if isinstance(array, np.ndarray) else array
    if tokens.numel() == 0:
        raise UsageError(f"token file {path} is empty (shape {list(tokens.shape)})")
    if int(tokens.min()) < 0:
        raise UsageError(f"token file {path} holds negative token ids (min {int(tokens.min())})")
    return tokens.to(torch.long).contiguous()


def is_token_file(spec: str) -> bool:
    return spec.lower().endswith(TOKEN_FILE_SUFFIXES)


def check_positive(name: str, value: Union[int, object]) -> None:
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def one_line_of(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
