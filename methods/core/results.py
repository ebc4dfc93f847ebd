"""Results on disk: written atomically, read back with a clear error when damaged."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from methods.core.errors import UsageError


def write_json_atomic(path: Path, payload: Any, *, sort_keys: bool = True) -> None:
    """Write JSON so that a reader, or a crash, never sees a half-written file. `sort_keys=False` keeps
    the mappings' order where it means something (a request's domains, in the order they are drawn)."""
    write_text_atomic(path, dumps(payload, sort_keys=sort_keys) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """The file appears whole or not at all: written beside it, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# A JSON array of numbers (or nulls) as json.dumps(indent=2) spreads it: one element per line.
_NUMBER = r"(?:-?[0-9][0-9.eE+-]*|null)"
_NUMBER_ARRAY = re.compile(r"\[\s+(" + _NUMBER + r"(?:,\s+" + _NUMBER + r")*)\s+\]")


def dumps(payload: Any, *, sort_keys: bool = True) -> str:
    """Indented JSON whose number arrays (kept indices, per-unit scores) stay on one line each, so a
    structured method's result reads as a few hundred lines rather than tens of thousands."""
    text = json.dumps(payload, indent=2, sort_keys=sort_keys, default=_jsonable)
    return _NUMBER_ARRAY.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"corrupt results file {path}: {exc}") from None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
