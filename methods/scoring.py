"""How good a model is: perplexity under each paper's protocol, and lm-eval task accuracy.

Methods score candidates with these (Minitron's block scan, Shortened LLaMA's PPL criterion) and the
kit evaluates pruned models with the same code, so a method's scorer and the reported numbers
cannot drift apart.

Perplexity
----------
``perplexity(model, tokens, protocol, ...)`` is exp of a mean next-token NLL; the protocols differ
in how the tokens are cut and in the order of the float arithmetic, which is kept as each paper's
code had it because rounding decides close comparisons:

``windows`` (Wanda, SparseGPT, magnitude, FLAP, Wanda-sp, LLM-Pruner, Shortened LLaMA evaluation)
    A [1, N] stream cut into non-overlapping ``seqlen`` windows, the remainder dropped; exp of the
    float32 mean of the per-window mean NLLs. With ``bos_per_window`` set to a token id, that id is
    put in front of every window (Shortened LLaMA's ``ppl_bos``: the stream is then tokenized
    without BOS), so each window scores ``seqlen`` predictions. Windows may be batched
    (``batch_size``, an int or "auto": as many as fit a quarter of free memory), which changes only
    float rounding. The window is the paper's: the model's
    context (capped at 8192) for Wanda/SparseGPT/magnitude, 128 for the others; never compare
    numbers across windows.
``rows``
    Every row of [n, L] fed alone; exp of the float32 mean of all n * (L - 1) token NLLs. The golden
    fixtures' evaluation formula, and Shortened LLaMA's PPL criterion.
``minitron`` (the Minitron depth scan's scorer, as the LLM Pruning Collection computes it)
    Every row of [n, L] fed alone; per row the mean cross-entropy, weighted by L (not L - 1), summed
    as a Python float; exp of that float32 tensor. The score therefore has float32 precision; its
    rounding decides ``closest`` comparisons, so it is kept bit for bit.

In every protocol logits are cast to float32 before the softmax whatever the model's dtype
(transformers 4.43 did so inside the model, 5.x does not), the model runs in eval mode without a KV
cache on the device of its input embedding, and its training mode is restored afterwards.

Tasks (lm-eval)
---------------
``run_tasks`` wraps the in-memory model in lm-eval's HF backend (``HFLM(pretrained=model, ...)``), so
a pruned model is evaluated without saving it. Conventions, chosen to match the papers:

* No BOS before contexts: the 0.3-era harnesses the papers used tokenized with
  ``add_special_tokens=False``. lm-eval 0.4.x exposes this as ``HFLM(add_bos_token=...)``: ``None``
  (the default since 0.4.6 or so) means "whatever the tokenizer does", which is BOS for Llama;
  the kit always passes ``add_bos_token=False``. lm-eval still drops a BOS that the prompt text itself
  starts with and conditions empty contexts on the BOS/EOS id, as every version did.
* The metric is named per table cell (``acc`` or ``acc_norm``); every metric the harness reported is
  kept, so one run of a (task, shots) pair serves every cell that needs it.
* Seeds: Python, numpy, torch and the few-shot sampler are all seeded with ``seed`` (default 1234,
  the harness's own default), explicitly, so no version's default can drift.
* Values are fractions in [0, 1], as lm-eval reports them.

* Batch size 1 is what the papers ran; ``batch_size`` N (or lm-eval's "auto") pads the requests of a
  batch, which changes float rounding only (the parity figures are in the README).
* The task index (lm-eval scans thousands of task YAMLs: seconds) is built once per process and
  include-path set, and not at all when every requested task lives in the kit's own folders (the smoke
  task); every run gets a deep copy, because lm-eval 0.4.8/0.4.9 managers remember group members
  across loads and would rename a group's subtasks the second time.

The kit's own tasks (``lpc_smoke_mc``) ship in methods/core/assets/tasks and are always findable. Note that
0.4.x task configs differ from the 0.3-era ones in prompts and splits for some tasks; paper tables
carry that caveat, this module does not hide it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from methods.core import hub
from methods.core.batching import batch_that_fits, parse_batch_size
from methods.core.errors import UsageError
from methods.core.text import SMOKE_TASKS
from methods.core.numerics import widened

SMOKE_TASK_DIR = SMOKE_TASKS
SMOKE_TASK = "lpc_smoke_mc"
DEFAULT_SEED = 1234
PROTOCOLS = ("windows", "rows", "minitron")


# ----------------------------------------------------------------------------- perplexity

def perplexity(model, tokens: torch.Tensor, protocol: str = "windows", *, seqlen: Optional[int] = None,
               bos_per_window: Optional[int] = None, batch_size: Union[int, str] = 1) -> float:
    """The perplexity of `tokens` under `protocol` (see the module docstring).

    ``windows``: `tokens` is a [1, N] stream and `seqlen` the window; `bos_per_window` and
    `batch_size` apply. ``rows`` and ``minitron``: `tokens` is [n, L], each row scored at its own length.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"perplexity protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "windows":
        return _windows(model, tokens, seqlen, bos_per_window, batch_size)
    for name, value, default in (("seqlen", seqlen, None), ("bos_per_window", bos_per_window, None),
                                 ("batch_size", batch_size, 1)):
        if value != default:
            raise UsageError(f"{name} applies to the windows protocol only, not to {protocol!r}")
    rows = _token_rows(tokens)
    with _inference(model):
        if protocol == "rows":
            nlls = [F.cross_entropy(*_next_token_logits(model, row[None]), reduction="none") for row in rows]
            return math.exp(torch.cat(nlls).mean().item())
        length = rows.shape[1]
        total, count = 0.0, 0
        for row in rows:
            total += F.cross_entropy(*_next_token_logits(model, row[None])).item() * length
            count += length
    return torch.exp(torch.tensor(total / count)).item()


def _windows(model, tokens: torch.Tensor, seqlen: Optional[int], bos_per_window: Optional[int],
             batch_size: Union[int, str]) -> float:
    stream = _token_stream(tokens)
    _check_int("seqlen", seqlen, minimum=2 if bos_per_window is None else 1)
    batch_size = parse_batch_size("batch_size", batch_size)
    nwin = stream.numel() // seqlen
    if nwin == 0:
        raise UsageError(f"the token stream has {stream.numel()} tokens, fewer than one window of {seqlen}")
    windows = stream[:nwin * seqlen].reshape(nwin, seqlen)
    if bos_per_window is not None:
        _check_int("bos_per_window", bos_per_window, minimum=0)
        windows = torch.cat([torch.full((nwin, 1), bos_per_window, dtype=torch.long), windows], dim=1)
    if batch_size == "auto":
        # A window's logits in float32, their log-softmax and its gradient-free copy dominate.
        per_window = 3 * 4 * windows.shape[1] * model.config.vocab_size
        batch_size = batch_that_fits(per_window, nwin, model.get_input_embeddings().weight.device)
    means = []
    with _inference(model):
        for first in range(0, nwin, batch_size):
            batch = windows[first:first + batch_size]
            nll = F.cross_entropy(*_next_token_logits(model, batch), reduction="none")
            means.append(nll.reshape(batch.shape[0], -1).cpu().mean(dim=1))
    return math.exp(torch.cat(means).mean().item())


def _next_token_logits(model, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 logits of positions 0..L-2 and the tokens 1..L-1 they predict, flattened over the batch."""
    device = model.get_input_embeddings().weight.device
    batch = batch.to(device=device, dtype=torch.long)
    logits = widened(model(input_ids=batch, use_cache=False).logits[:, :-1, :])
    return logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _token_stream(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != 1:
        raise UsageError(f"tokens must be a [1, N] token tensor, got {_shape(tokens)}")
    _check_token_dtype(tokens)
    return tokens[0].to(torch.long).cpu()


def _token_rows(tokens) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise UsageError(f"rows must be a [n, L] token tensor with L >= 2, got {_shape(tokens)}")
    _check_token_dtype(tokens)
    return tokens


def _check_token_dtype(tokens: torch.Tensor) -> None:
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise UsageError(f"token ids must be integers, got {tokens.dtype}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _shape(obj) -> str:
    return f"shape {list(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__


# ----------------------------------------------------------------------------- lm-eval tasks

@dataclass(frozen=True)
class TaskSpec:
    """One requested number: a task, its few-shot count and the metric a table cell reports.

    `split` is a free-text note (e.g. "validation, 3270") for provenance; the task config decides the
    split lm-eval actually uses.
    """

    name: str
    num_fewshot: int = 0
    metric: str = "acc"
    split: Optional[str] = None

    @property
    def key(self) -> str:
        """The result key: the task name for zero-shot, ``name@N`` for N-shot."""
        return self.name if self.num_fewshot == 0 else f"{self.name}@{self.num_fewshot}"


def run_tasks(model, tokenizer, tasks: Sequence[TaskSpec], *, batch_size: Union[int, str] = 1, limit=None,
              seed: int = DEFAULT_SEED, include_paths: Iterable = (), per_request: bool = False) -> Dict[str, Any]:
    """Evaluate `model` on lm-eval tasks; every (task, shots) pair runs once.

    Returns ``{spec.key: entry, ..., "harness": {...}}``. An entry holds the metric of the first spec
    with that key (``value`` as a fraction, ``metric``, ``stderr``), ``metrics`` with every metric the
    harness reported (``{"acc": {"value", "stderr"}, "acc_norm": ...}``) for the other cells of the same
    (task, shots), ``n`` (examples scored), ``num_fewshot`` and ``task_version``; with `per_request`, also
    ``loglikelihoods``: every request's log-likelihood, by document then choice (the batch-parity check).
    ``cell_value`` reads one cell. The shipped task ``lpc_smoke_mc`` is always findable; more task folders go in `include_paths`.
    """
    specs = [_as_spec(t) for t in tasks]
    if not specs:
        raise UsageError("no tasks requested")
    batch_size = parse_batch_size("batch_size", batch_size)
    lm_eval, HFLM, _ = _import_lm_eval()
    paths = [SMOKE_TASK_DIR] + [Path(os.path.expanduser(str(p))) for p in include_paths]
    for path in paths:
        if not path.is_dir():
            raise UsageError(f"task include path is not a directory: {path}")
    include = tuple(str(p) for p in paths)
    wanted = {s.name for s in specs}
    manager = task_index(include, wanted)
    unknown = sorted(wanted - set(manager.all_tasks))
    if unknown:
        raise UsageError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    local_configs = _local_data_overrides(paths)

    # A model that is not a transformers one (MaxText's, training/maxtext/lm.py) brings its own lm-eval LM,
    # with the same conventions (no BOS before contexts).
    own = getattr(model, "lm_eval_model", None)
    if own is not None:
        lm = own(batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
    # Group the runs by shot count: simple_evaluate takes one num_fewshot for all its tasks.
    by_shots: Dict[int, List[str]] = {}
    for spec in specs:
        names = by_shots.setdefault(spec.num_fewshot, [])
        if spec.name not in names:
            names.append(spec.name)
    seeds = _seed_kwargs(lm_eval.simple_evaluate, seed)
    raw: Dict[int, Dict[str, Any]] = {}
    for number, (shots, names) in enumerate(by_shots.items()):
        if number:
            manager = task_index(include, wanted)  # a fresh copy per simple_evaluate
        requested = [dict(local_configs[n]) if n in local_configs else n for n in names]
        with hub.routed_datasets():  # lm-eval's own task datasets: from the hub mirror, when one is set
            raw[shots] = lm_eval.simple_evaluate(model=lm, tasks=requested, num_fewshot=shots, batch_size=batch_size,
                                                 limit=limit, task_manager=manager, log_samples=per_request, **seeds)

    out: Dict[str, Any] = {}
    versions: Dict[str, Any] = {}
    for spec in specs:
        result = raw[spec.num_fewshot]
        versions.update(result.get("versions", {}))
        if spec.key not in out:
            out[spec.key] = _entry(result, spec)
            if per_request:
                samples = sorted(result["samples"][spec.name], key=lambda sample: sample["doc_id"])
                # resps: per request a list holding one (log-likelihood, is-greedy) pair.
                out[spec.key]["loglikelihoods"] = [float(resp[0][0]) for sample in samples for resp in sample["resps"]]
        elif spec.metric not in out[spec.key]["metrics"]:
            raise _missing_metric(spec, out[spec.key]["metrics"])
    out["harness"] = {
        "lm_eval": getattr(lm_eval, "__version__", None) or _distribution_version("lm-eval"),
        "task_versions": dict(sorted((str(k), v) for k, v in versions.items())),
        "add_bos_token": False,
        "seed": seed,
        "batch_size": batch_size,
        "limit": limit,
    }
    return out


def cell_value(results: Dict[str, Any], spec: TaskSpec) -> float:
    """The fraction one table cell (task, shots, metric) reports, from `run_tasks`' result."""
    entry = results.get(spec.key)
    if entry is None:
        raise UsageError(f"no result for task {spec.key}")
    if spec.metric not in entry["metrics"]:
        raise _missing_metric(spec, entry["metrics"])
    return entry["metrics"][spec.metric]["value"]


def _entry(result: Dict[str, Any], spec: TaskSpec) -> Dict[str, Any]:
    row = result["results"][spec.name]
    metrics: Dict[str, Dict[str, Optional[float]]] = {}
    for field, value in row.items():
        # lm-eval names fields "<metric>,<filter>" and "<metric>_stderr,<filter>".
        # Fields without a filter part ("alias", "sample_len") are bookkeeping, not metrics.
        name, comma, filt = field.partition(",")
        if not comma or name.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        # The unfiltered value wins over a filtered variant of the same metric.
        if filt != "none" and name in metrics:
            continue
        stderr = row.get(f"{name}_stderr,{filt}")
        metrics[name] = {"value": float(value), "stderr": _float_or_none(stderr)}
    if spec.metric not in metrics:
        raise _missing_metric(spec, metrics)
    return {
        "value": metrics[spec.metric]["value"],
        "metric": spec.metric,
        "stderr": metrics[spec.metric]["stderr"],
        "metrics": metrics,
        "n": _sample_count(result, spec.name),
        "num_fewshot": spec.num_fewshot,
        "task_version": result.get("versions", {}).get(spec.name),
        "split": spec.split,
    }


def _sample_count(result: Dict[str, Any], name: str) -> Optional[int]:
    counts = result.get("n-samples") or {}
    if name in counts:
        return int(counts[name].get("effective", counts[name].get("original")))
    # A group has no count of its own; its subtasks do.
    children = (result.get("group_subtasks") or {}).get(name) or []
    found = [_sample_count(result, child) for child in children]
    return sum(found) if found and None not in found else None


def _missing_metric(spec: TaskSpec, metrics: Dict[str, Any]) -> UsageError:
    return UsageError(f"task {spec.name} reported no metric {spec.metric!r}; it has: {', '.join(sorted(metrics)) or 'none'}")


def _float_or_none(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _as_spec(task) -> TaskSpec:
    if isinstance(task, TaskSpec):
        spec = task
    elif isinstance(task, str):
        spec = TaskSpec(task)
    else:
        raise UsageError(f"a task must be a TaskSpec or a task name, got {type(task).__name__}")
    if not spec.name:
        raise UsageError("a task name is empty")
    _check_int(f"num_fewshot of {spec.name}", spec.num_fewshot, minimum=0)
    return spec


def _seed_kwargs(simple_evaluate, seed: int) -> Dict[str, int]:
    # Older 0.4.x releases lack some of these keywords; pass every one this version has.
    accepted = inspect.signature(simple_evaluate).parameters
    names = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
    return {name: seed for name in names if name in accepted}


def _local_data_overrides(paths: Sequence[Path]) -> Dict[str, Dict[str, Any]]:
    """Full configs of self-contained local task YAMLs, their relative ``data_files`` made absolute.

    lm-eval hands ``data_files`` to ``datasets.load_dataset``, which resolves them against the working
    directory, so a shipped task would only load when run from one folder. The whole config is passed
    (as an inline task) because 0.4.13 no longer merges a dict with the registered YAML. YAMLs that
    ``include`` others or use ``!function`` are left to lm-eval as they are.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        tagged = False

    def _tag(loader, suffix, node):
        loader.tagged = True
        return None

    _Loader.add_multi_constructor("!", _tag)
    configs: Dict[str, Dict[str, Any]] = {}
    for root in paths:
        for yaml_path in sorted(root.rglob("*.yaml")):
            loader = _Loader(yaml_path.read_text(encoding="utf-8"))
            try:
                config = loader.get_single_data()
            except yaml.YAMLError:
                continue
            finally:
                loader.dispose()
            if loader.tagged or not isinstance(config, dict) or "include" in config:
                continue
            kwargs = config.get("dataset_kwargs")
            if not isinstance(config.get("task"), str) or not isinstance(kwargs, dict) or "data_files" not in kwargs:
                continue
            resolved = _resolve_files(kwargs["data_files"], yaml_path.parent)
            if resolved != kwargs["data_files"]:
                configs[config["task"]] = dict(config, dataset_kwargs=dict(kwargs, data_files=resolved))
    return configs


def _resolve_files(files, base: Path):
    if isinstance(files, str):
        return files if os.path.isabs(files) or "://" in files else str(base / files)
    if isinstance(files, list):
        return [_resolve_files(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _resolve_files(v, base) for k, v in files.items()}
    return files


def known_tasks() -> frozenset:
    """Every task name lm-eval can load, the kit's shipped tasks included."""
    return frozenset(_pristine_index((str(SMOKE_TASK_DIR),), True).all_tasks)


def task_index(include: Tuple[str, ...], names: Iterable[str] = ()):
    """An lm-eval TaskManager over `include` that finds `names` and that the caller may use up: a deep
    copy of an index this process builds once. Tasks that all live in `include` (the smoke task) need
    only those folders indexed, milliseconds; any other task needs lm-eval's own index as well."""
    include, names = tuple(include), set(names)
    local = _pristine_index(include, False)
    return copy.deepcopy(local if names and names <= set(local.all_tasks) else _pristine_index(include, True))


@functools.lru_cache(maxsize=None)
def _pristine_index(include: Tuple[str, ...], with_lm_eval_tasks: bool):
    _, _, TaskManager = _import_lm_eval()
    return TaskManager(include_path=list(include), include_defaults=with_lm_eval_tasks)


def _distribution_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _import_lm_eval() -> Tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(f"task evaluation needs lm-eval 0.4.x (pip install 'lm-eval>=0.4'): {exc}") from None
    return lm_eval, HFLM, TaskManager
