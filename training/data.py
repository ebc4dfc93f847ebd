"""Training data: fixed-length token windows, served as a stateful stream of global batches.

Every optimizer step consumes one global batch of `global_batch` windows of `seqlen` tokens; the
labels are the inputs (the model shifts them by one). Two kinds of source:

* `Windows`: random access to N windows. Token files ([N, seqlen] `.pt`/`.npy`, or a flat stream
  in a 1-D `.npy` or a raw little-endian `.bin`, cut into consecutive windows) and text packed with
  `pack_documents` ([BOS] + document + [EOS], concatenated, cut into windows, the remainder dropped).
  `GlobalStream` orders them: sample i of the run is window perm_e[i mod N] of epoch e = i // N, a
  seeded permutation per epoch (or the file order, unshuffled). Step t takes samples
  [t*B, (t+1)*B); rank r's k-th micro-batch of that step is the slice starting at
  t*B + (r*accumulation + k)*micro_batch. The whole state is the step number, so a resumed run sees
  exactly the samples an uninterrupted one would, and a run on W processes sees the same global
  batches as a run on one (the distributed equivalence the tests check).
* `ArrowShards`: the collection's FMS-FSDP format, a directory of `rank_<k>.arrow` files whose
  records hold `input_ids` (one document each). As in FMS, rank r reads files r, r+W, r+2W, ...
  in order and packs [BOS] + document + [EOS] into a running buffer from which windows are cut, so
  what a rank sees depends on the world size (FMS's own behaviour). Its state (file, record,
  leftover buffer) is per rank and saved with every checkpoint; a resume must use the same world size.
* `DomainStream`: dynamic batch loading (Sheared LLaMA), over one `Windows` source per domain. Each
  sample's domain is drawn with the current proportions from one seeded generator that every rank
  advances alike (so the global batch does not depend on the world size); within a domain, windows
  are taken in a seeded per-domain permutation, without replacement (a domain that runs out starts
  another permutation: the original refuses to read a domain twice). Every `interval` steps the
  engine measures each domain's loss on held-out windows and `update` moves the proportions
  (`update_proportions`). Proportions, windows used per domain and the generator's state are the
  stream's state, saved with every checkpoint, so a resumed run draws exactly what an uninterrupted
  one would.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from methods.core.batching import accumulation_steps
from methods.core.errors import UsageError
from methods.core.text import read_token_file

ARROW_FILE = re.compile(r"^rank_(\d+)\.arrow$")
UPDATE_RULES = ("doremi", "bandit", "constant")
# Mixed into the updated proportions so that no domain's weight reaches 0 (DoReMi's smoothing).
SMOOTHING = 1e-4
# Raw .bin token files are flat little-endian uint32 ids (Llama-3's 128k vocabulary needs > 16 bits).


def pack_documents(documents: Iterable[Sequence[int]], *, bos: Optional[int], eos: Optional[int],
                   seqlen: int) -> torch.LongTensor:
    """[BOS] + document + [EOS] for every document, concatenated and cut into [N, seqlen] windows."""
    stream: List[int] = []
    for ids in documents:
        if bos is not None:
            stream.append(bos)
        stream.extend(int(i) for i in ids)
        if eos is not None:
            stream.append(eos)
    count = len(stream) // seqlen
    if count == 0:
        raise UsageError(f"the training text has {len(stream)} tokens, fewer than one window of seqlen={seqlen}")
    return torch.tensor(stream[:count * seqlen], dtype=torch.long).reshape(count, seqlen)


class Windows:
    """N windows of seqlen token ids, read by index (a tensor, or a memory-mapped flat file)."""

    def __init__(self, data, seqlen: int, *, origin: str):
        self.data = data            # [N, seqlen] tensor, or a 1-D array cut on the fly
        self.seqlen = seqlen
        self.origin = origin
        flat = getattr(data, "ndim", None) == 1
        self.count = len(data) // seqlen if flat else int(data.shape[0])
        self.flat = flat
        if self.count == 0:
            raise UsageError(f"{origin} holds fewer tokens than one window of seqlen={seqlen}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.LongTensor:
        if self.flat:
            start = index * self.seqlen
            return torch.from_numpy(np.asarray(self.data[start:start + self.seqlen], dtype=np.int64))
        if isinstance(self.data, torch.Tensor):
            return self.data[index].long()
        return torch.from_numpy(np.array(self.data[index], dtype=np.int64))  # a copy out of the memory map

    def split(self, tail: int) -> tuple:
        """(the first len - tail windows, the last tail windows) as two sources."""
        keep = self.count - tail
        if keep < 1 or tail < 1:
            raise UsageError(f"{self.origin} has {self.count} windows of {self.seqlen} tokens: too few to hold "
                             f"out {tail} for evaluation and train on the rest")
        cut = keep * self.seqlen if self.flat else keep
        end = self.count * self.seqlen if self.flat else self.count
        return (Windows(self.data[:cut], self.seqlen, origin=self.origin),
                Windows(self.data[cut:end], self.seqlen, origin=f"{self.origin} (held out)"))

    def max_id(self) -> int:
        if isinstance(self.data, torch.Tensor):
            return int(self.data.max())
        return int(np.max(self.data[:self.count * self.seqlen] if self.flat else self.data))

    @classmethod
    def from_file(cls, path, seqlen: int) -> "Windows":
        """A token file (methods/core/text.py): [N, seqlen] .pt/.npy, a flat 1-D .npy, or a flat uint32 .bin."""
        array = read_token_file(path, flat=True)
        if array.ndim == 2 and array.shape[1] != seqlen:
            raise UsageError(f"token file {path} has windows of {array.shape[1]} tokens, but --seqlen is {seqlen}")
        return cls(array.long() if isinstance(array, torch.Tensor) else array, seqlen, origin=str(path))


class Layout:
    """How one optimizer step's global batch is split: world x accumulation x micro_batch."""

    def __init__(self, global_batch: int, micro_batch: int, world: int):
        self.accumulation = accumulation_steps(global_batch, micro_batch, world)
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.world = world


class GlobalStream:
    """Global batches over `Windows`; stateless apart from the step (see the module docstring)."""

    def __init__(self, windows: Windows, layout: Layout, *, rank: int, seed: int, shuffle: bool = True):
        self.windows = windows
        self.layout = layout
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._order: Optional[torch.Tensor] = None

    def _window_of(self, sample: int) -> int:
        epoch, position = divmod(sample, len(self.windows))
        if not self.shuffle:
            return position
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.windows), generator=generator)
            self._epoch = epoch
        return int(self._order[position])

    def micro_batches(self, step: int) -> List[torch.LongTensor]:
        """This rank's micro-batches of optimizer step `step`, in order."""
        layout = self.layout
        out = []
        for k in range(layout.accumulation):
            first = step * layout.global_batch + (self.rank * layout.accumulation + k) * layout.micro_batch
            out.append(torch.stack([self.windows[self._window_of(first + j)] for j in range(layout.micro_batch)]))
        return out

    def state(self, step: int) -> Dict[str, int]:
        return {"kind": "global", "next_step": step}

    def restore(self, state: Dict[str, int]) -> None:
        if state.get("kind") != "global":
            raise UsageError("the checkpoint's data state belongs to another kind of data source")


class ArrowShards:
    """The FMS-FSDP format, read per rank (see the module docstring)."""

    def __init__(self, folder, layout: Layout, *, rank: int, seqlen: int, bos: Optional[int], eos: Optional[int]):
        import pyarrow  # noqa: F401  (datasets brings it; fail early with a clear error otherwise)

        folder = Path(os.path.expanduser(str(folder)))
        files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := ARROW_FILE.match(p.name))) \
            if folder.is_dir() else []
        if not files:
            raise UsageError(f"{folder} holds no rank_<k>.arrow files (the FMS-FSDP data format)")
        self.files = [p for _, p in files][rank::layout.world]
        if not self.files:
            raise UsageError(f"{folder} has {len(files)} arrow files, fewer than the {layout.world} processes")
        self.layout, self.rank, self.seqlen, self.bos, self.eos = layout, rank, seqlen, bos, eos
        self.file_index, self.record, self.buffer = 0, 0, []
        self._table, self._table_path = None, None
        self.origin = str(folder)

    def _next_document(self) -> List[int]:
        while True:
            path = self.files[self.file_index % len(self.files)]  # past the last file: another epoch
            if self._table_path != path:
                self._table, self._table_path = read_arrow(path).column("input_ids"), path
            if self.record < len(self._table):
                ids = self._table[self.record].as_py()
                self.record += 1
                return ids
            self.record = 0
            self.file_index += 1

    def _window(self) -> torch.LongTensor:
        while len(self.buffer) < self.seqlen:
            self.buffer.extend(([self.bos] if self.bos is not None else []) + self._next_document()
                               + ([self.eos] if self.eos is not None else []))
        window, self.buffer = self.buffer[:self.seqlen], self.buffer[self.seqlen:]
        return torch.tensor(window, dtype=torch.long)

    def micro_batches(self, step: int) -> List[torch.LongTensor]:
        return [torch.stack([self._window() for _ in range(self.layout.micro_batch)])
                for _ in range(self.layout.accumulation)]

    def state(self, step: int) -> dict:
        return {"kind": "arrow", "rank": self.rank, "world": self.layout.world, "file_index": self.file_index,
                "record": self.record, "buffer": list(self.buffer), "next_step": step}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "arrow":
            raise UsageError("the checkpoint's data state belongs to another kind of data source")
        if state["world"] != self.layout.world:
            raise UsageError(f"the checkpoint was written by {state['world']} processes; the FMS data format "
                             f"assigns files per process, so resume it with --nproc {state['world']}")
        self.file_index, self.record, self.buffer = state["file_index"], state["record"], list(state["buffer"])


def update_proportions(proportions: Sequence[float], losses: Sequence[float], reference: Sequence[float], *,
                       rule: str = "doremi", clip: bool = False) -> List[float]:
    """Dynamic batch loading's new domain proportions from the domains' losses and reference losses.

    `doremi`: softmax(log p + (loss - reference)), then (1 - c) p + c / n with c = 1e-4; `bandit`:
    the same with p in place of log p; `constant`: p. The excess loss is not clipped at 0 (the
    original's code; `clip=True` is the paper's max(loss - reference, 0)). As in the original, the
    arithmetic is float32 (tensors of Python floats), the result float64 renormalised to sum 1.
    """
    if rule not in UPDATE_RULES:
        raise UsageError(f"unknown proportion update rule {rule!r}; known: {', '.join(UPDATE_RULES)}")
    p = torch.tensor([float(x) for x in proportions])
    excess = torch.tensor([float(x) for x in losses]) - torch.tensor([float(x) for x in reference])
    if clip:
        excess = excess.clamp(min=0)
    if rule == "constant":
        weights = p
    else:
        weights = torch.softmax((torch.log(p) if rule == "doremi" else p) + excess, dim=0)
        weights = (1 - SMOOTHING) * weights + SMOOTHING / len(weights)
    out = weights.numpy().astype(np.float64)
    return (out / out.sum()).tolist()


@dataclass(frozen=True)
class Dynamic:
    """Dynamic batch loading's settings (the training options of the same names)."""
    proportions: Dict[str, float]               # the domains, in order, with their initial proportions
    reference_loss: Optional[Dict[str, float]]
    update_interval: int                        # steps between updates; 0: the proportions stay
    update_rule: str = "doremi"
    clip_excess: bool = False
    eval_windows: int = 8                       # per domain
    eval_data: Optional[str] = None

    @classmethod
    def from_options(cls, options) -> "Optional[Dynamic]":
        if not options.domains:
            return None
        return cls(dict(options.domains), dict(options.reference_loss) if options.reference_loss else None,
                   options.update_interval, options.update_rule, options.clip_excess, options.eval_windows,
                   options.eval_data)

    @property
    def names(self) -> List[str]:
        return list(self.proportions)


class DomainStream:
    """Global batches drawn over domains with proportions that training updates (see the module docstring)."""

    def __init__(self, train: Sequence[Windows], evaluation: Sequence[Windows], layout: Layout, *, rank: int,
                 seed: int, dynamic: Dynamic):
        self.train, self.evaluation = list(train), list(evaluation)
        self.layout, self.rank, self.seed, self.dynamic = layout, rank, seed, dynamic
        self.names = dynamic.names
        total = sum(dynamic.proportions.values())
        self.proportions = [v / total for v in dynamic.proportions.values()]
        self.rng = np.random.default_rng(seed)
        self.used = [0] * len(self.names)
        self.next_step = 0
        self._orders: Dict[int, tuple] = {}     # domain -> (epoch, its permutation)

    def _order(self, domain: int, epoch: int) -> torch.Tensor:
        cached = self._orders.get(domain)
        if cached is None or cached[0] != epoch:
            seed = int(np.random.SeedSequence([self.seed, domain, epoch]).generate_state(1)[0])
            order = torch.randperm(len(self.train[domain]), generator=torch.Generator().manual_seed(seed))
            cached = self._orders[domain] = (epoch, order)
        return cached[1]

    def micro_batches(self, step: int) -> List[torch.LongTensor]:
        """This rank's micro-batches of step `step`; steps must come in order (the stream has a state)."""
        if step != self.next_step:
            raise RuntimeError(f"dynamic batch loading serves steps in order: asked for {step}, next is {self.next_step}")
        layout = self.layout
        domains = self.rng.choice(len(self.names), size=layout.global_batch, p=self.proportions)
        picks = []
        for d in domains.tolist():
            epoch, position = divmod(self.used[d], len(self.train[d]))
            picks.append((d, int(self._order(d, epoch)[position])))
            self.used[d] += 1
        self.next_step += 1
        out = []
        for k in range(layout.accumulation):
            first = (self.rank * layout.accumulation + k) * layout.micro_batch
            out.append(torch.stack([self.train[d][i] for d, i in picks[first:first + layout.micro_batch]]))
        return out

    def update(self, losses: Sequence[float]) -> List[float]:
        """New proportions from the domains' held-out losses (in the order of `names`)."""
        dyn = self.dynamic
        reference = [dyn.reference_loss[n] for n in self.names] if dyn.reference_loss else list(losses)
        self.proportions = update_proportions(self.proportions, losses, reference, rule=dyn.update_rule,
                                              clip=dyn.clip_excess)
        return self.proportions

    def state(self, step: int) -> dict:
        return {"kind": "domains", "names": self.names, "proportions": list(self.proportions), "used": list(self.used),
                "rng": self.rng.bit_generator.state, "next_step": step}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "domains" or state.get("names") != self.names:
            raise UsageError("the checkpoint's data state belongs to another data source or other domains")
        self.proportions, self.used = list(state["proportions"]), list(state["used"])
        self.rng.bit_generator.state = state["rng"]
        self.next_step = state["next_step"]


def read_arrow(path: Path):
    """One arrow file as a table: the IPC file format, or the IPC stream format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise UsageError(f"cannot read arrow file {path}: {exc}") from None


def write_arrow(path: Path, documents: Iterable[Sequence[int]]) -> None:
    """Write documents as an FMS-format shard (tests, and converting local data)."""
    import pyarrow as pa

    table = pa.table({"input_ids": pa.array([list(map(int, d)) for d in documents], type=pa.list_(pa.int32()))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
