"""The model of a sharded run, loaded so that no rank ever holds all of it (issue 21, host memory).

A sharded run (training/engine.py `Run.sharded`) builds the model on the meta device
(methods/core/models.py `empty_model`: parameters without storage, the non-persistent buffers such as
rotary `inv_freq` computed for real), lets FSDP2 shard it (every parameter split on dim 0, as
`torch.chunk` splits: the last rank's rows may be fewer, or none), gives the shards storage, and then
each rank reads only its own rows of every parameter straight from the checkpoint's safetensors files:
rows of a row-major tensor are contiguous, so a rank's share is one byte range, read with `readinto`
into its local shard (or into a small buffer of the stored dtype and converted, for a bf16 or fp16
checkpoint, exactly as `from_pretrained(dtype=float32)` converts). Nothing is memory-mapped: mapped
pages would count in the rank's resident memory. Sharded checkpoints (`model.safetensors.index.json`),
tied embeddings (one parameter, read once) and the kit's per-layer-width formats load the same way.

A checkpoint without safetensors files, or whose tensor names are not the model's (a format that
transformers converts while it loads), is loaded whole on each rank and its rows copied: correct, but
without the memory saving. One process on the CPU (nothing sharded) loads the model as it always has.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from methods.core.errors import UsageError

# safetensors' dtype names -> torch dtypes (the floating types a checkpoint's parameters are stored in).
STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def skeleton(path: str, run) -> nn.Module:
    """The model to train, before FSDP2: empty (meta) when the run is sharded, else loaded whole."""
    from methods.core.models import empty_model, load_model

    if run.sharded:
        return empty_model(path)
    return load_model(path, load_tokenizer=False)[0]


def fill(model: nn.Module, path: str, run) -> Dict[str, int]:
    """Give a sharded skeleton's shards storage on the run's device and read them from `path`; the
    run's other kinds of model are loaded already. Returns what this rank read: `bytes_read` (of the
    checkpoint) and `largest_read` (bytes of the largest single read, never more than one shard)."""
    stats = {"bytes_read": 0, "largest_read": 0}
    if not any(p.is_meta for p in model.parameters()):
        return stats
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=run.device)  # storage for the local shards only: FSDP2 holds DTensors
    source = Checkpoint(path)
    names = [name for name, _ in model.named_parameters()] + [n for n in buffers if n in source.tensors]
    whole = None if source.has_all(names) else _WholeModel(path)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in source.tensors and whole is None:
                source.read_rows(name, 0, buffer.shape[0] if buffer.dim() else 1, buffer, stats)
            else:
                buffer.copy_(buffers[name] if whole is None else whole.tensor(name))
        for name, param in model.named_parameters():
            local, (start, stop) = _local_rows(param)
            if whole is not None:
                local.copy_(whole.tensor(name)[start:stop] if param.dim() else whole.tensor(name))
            elif stop > start:
                source.read_rows(name, start, stop, local, stats)
    return stats


def _local_rows(param) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """This rank's shard of a parameter and the dim-0 rows of the whole it holds."""
    if not hasattr(param, "to_local"):
        return param, (0, param.shape[0] if param.dim() else 1)
    try:  # torch >= 2.5
        from torch.distributed.tensor import Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"expected FSDP2's dim-0 shards, got placements {param.placements}")
    mesh = param.device_mesh
    rows = param.shape[0]
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    local = param.to_local()
    if tuple(local.shape) != (stop - start, *param.shape[1:]):
        raise RuntimeError(f"a local shard of shape {tuple(local.shape)} is not rows {start}:{stop} of "
                           f"{tuple(param.shape)}")
    return local, (start, stop)


class Checkpoint:
    """The tensors of a checkpoint's safetensors files, read by row ranges without mapping the files."""

    def __init__(self, path: str):
        folder = Path(path)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [f.name for f in sorted(folder.glob("*.safetensors"))]
        # name -> (file, stored dtype, shape, absolute byte offset of its data)
        self.tensors: Dict[str, Tuple[Path, str, Tuple[int, ...], int]] = {}
        for name in files:
            file = folder / name
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    self.tensors[key] = (file, entry["dtype"], tuple(entry["shape"]), 8 + size + entry["data_offsets"][0])

    def has_all(self, names) -> bool:
        return bool(self.tensors) and all(n in self.tensors and self.tensors[n][1] in STORED for n in names)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor, stats: Optional[dict] = None) -> None:
        """Rows start:stop of tensor `name` into `out` (their shape), converted to out's dtype."""
        file, stored, shape, offset = self.tensors[name]
        if tuple(out.shape) != ((stop - start, *shape[1:]) if shape else ()):
            raise UsageError(f"{file.parent}: tensor {name} has shape {list(shape)}, the model's config "
                             f"makes it {list(out.shape)} (rows {start}:{stop})")
        dtype = STORED[stored]
        row = math.prod(shape[1:]) * dtype.itemsize
        direct = dtype == out.dtype and out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=dtype)
        view = memoryview(target.detach().reshape(-1).view(torch.uint8).numpy())
        with open(file, "rb", buffering=0) as handle:
            handle.seek(offset + start * row)
            done = 0
            while done < len(view):
                got = handle.readinto(view[done:])
                if not got:
                    raise UsageError(f"{file} ends inside tensor {name}: the file is truncated")
                done += got
        if not direct:
            out.copy_(target)
        if stats is not None:
            stats["bytes_read"] += len(view)
            stats["largest_read"] = max(stats["largest_read"], len(view))

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its stored dtype."""
        _, stored, shape, _ = self.tensors[name]
        out = torch.empty(shape, dtype=STORED[stored])
        self.read_rows(name, 0, shape[0] if shape else 1, out)
        return out


class _WholeModel:
    """The fallback: the model loaded whole on this rank, as before sharded loading existed."""

    def __init__(self, path: str):
        from methods.core.models import load_model

        model = load_model(path, load_tokenizer=False)[0]
        self.state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name].detach()
