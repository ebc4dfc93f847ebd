"""`lpc repro <method> --submit local|slurm|skypilot`: the rows' stages as a chain of jobman jobs.

Every unfinished stage of every selected row becomes one job running the stage's own command, and
the jobs are chained with afterok dependencies:

    dense: eval --gate ─┬─> row a: prune -> train (torchrun, N GPUs x K nodes) -> eval ─┐
                        └─> row b: prune -> eval ──────────────────────────────────────┴─> diff (afterany)

The dense row's evaluation gates the others, as in a local run (`--no-dense-gate` drops that edge);
a failed stage leaves its dependants to jobman (afterok never satisfied: they are cancelled); the
final diff waits for every evaluation whatever its outcome, so a failed row reports MISSING. Stages
already done (their manifest matches) get no job, so rerunning the same command after a failure
submits only what is left. Stage folders and results are read and written by jobs on other
machines: on a cluster, `--work-dir` and `--results-dir` must be on storage every node mounts.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from methods.errors import UsageError
from repro import stages
from repro.recipe import DENSE, Recipe, load_recipe
from repro.results import read_json, write_json_atomic
from repro.runner import check_dense, check_device, finished, select_rows, shared_dense, work_dir
from repro.tables import load_profile

# Passed to every job by name: jobman reads its value where the job runs and stores it nowhere.
SECRETS = ("HF_TOKEN",)
# Passed to every job by value when the submitting shell sets them: where the jobs find their data.
FORWARDED = ("LPC_DCLM_ARRAY_RECORD",)


@dataclass
class Job:
    name: str
    command: List[str]                    # the stage's argument vector (after the interpreter)
    after: List["Job"] = field(default_factory=list)
    kind: str = "afterok"
    torchrun: Optional[Tuple[int, int]] = None   # (nodes, processes per node) for a training stage
    accelerator: Optional[str] = None
    nodes: int = 1
    id: Optional[int] = None


def parse_gpus(text: Optional[str]) -> Tuple[Optional[str], Optional[int]]:
    """`--gpus N` (processes per node) or `--gpus TYPE:N` (also asked of the backend)."""
    if text is None:
        return None, None
    if text.isdigit():
        if int(text) < 1:
            raise UsageError("--gpus must be at least 1")
        return None, int(text)
    from jobman.accelerators import parse_accelerator
    from jobman.errors import UsageError as JobmanUsageError

    try:
        accelerator = parse_accelerator(text)
    except JobmanUsageError as exc:
        raise UsageError(f"--gpus: {exc}") from None
    if accelerator.is_tpu:
        raise UsageError(f"--gpus {text}: TPU slices train through MaxText, not torchrun; pass --tpu {text}")
    return f"{accelerator.name}:{accelerator.count}", accelerator.count


def parse_tpu(text: Optional[str], *, backend: str, nodes: int) -> Optional[str]:
    """`--tpu TYPE`: the slice that MaxText training stages run on, checked against jobman's table
    (the other stages run where --gpus says, as without it)."""
    if text is None:
        return None
    from training.options import tpu_slice

    accelerator = tpu_slice(text)
    if backend != "skypilot":
        raise UsageError(f"--tpu {text}: TPU slices are reached through SkyPilot; use --submit skypilot")
    if nodes != 1:
        raise UsageError(f"--tpu {text}: a slice's hosts come from its type ({accelerator.name} has "
                         f"{accelerator.hosts}); drop --nodes")
    return accelerator.name


def plan(recipe: Recipe, table, rows: List[str], *, results_root: Path, work: Path, gpus: Optional[str],
         nodes: int, dense_gate: bool, tpu: Optional[str] = None, log=print) -> List[Job]:
    """The jobs for the unfinished stages of `rows`, dense first, then one diff job."""
    accelerator, per_node = parse_gpus(gpus)
    one = None if accelerator is None else accelerator.split(":")[0] + ":1"
    single = one if recipe.config.get("device", "cpu").startswith("cuda") else None
    measures = stages.metric_specs(table)
    base = f"lpc-{recipe.method}"
    results = Path(results_root).resolve()
    common = ["--profile", recipe.profile, "--results-dir", str(results), "--recipe", str(recipe.path)]
    if "batch_size" in recipe.config:  # as the recipe says, or as --eval-batch-size replaced it
        common += ["--eval-batch-size", str(recipe.config["batch_size"])]
    jobs: List[Job] = []
    gate: Optional[Job] = None
    evals: List[Job] = []
    for row in rows:
        path = results / recipe.profile / recipe.method / f"{row}.json"
        stamp = recipe.fingerprint(row, measures)
        if finished(path, stamp):
            log(f"[{recipe.method}/{recipe.profile}] {row}: done already ({path})")
            if row == DENSE and dense_gate:
                check_dense(table, read_json(path), log)
            continue
        shared = shared_dense(results, recipe.profile, stamp) if row == DENSE else None
        if shared is not None:
            write_json_atomic(path, {**read_json(shared), "method": recipe.method})
            log(f"[{recipe.method}/{recipe.profile}] {row}: same dense model and protocol as {shared}, reused")
            if dense_gate:
                check_dense(table, read_json(path), log)
            continue
        name = _job_name(base, row)
        previous = [gate] if gate is not None and row != DENSE else []
        model = recipe.config["model"]
        if row != DENSE:
            request = recipe.prune_request(row, out=work / row / "pruned")
            pruned = stages.prune_fingerprint(request)
            done = stages.read_manifest(request.out, stages.PRUNE_MANIFEST)
            if done is None or done.get("fingerprint") != pruned:
                job = Job(f"{name}-prune", _prune_command(request), after=previous, accelerator=single)
                jobs.append(job)
                previous = [job]
            model = str(request.out)
            options = recipe.train_options(row, model=model, out=work / row / "trained")
            if options is not None:
                state = stages.train_state(options.out, stages.train_identity(options, pruned=pruned)[0])
                if state == "stale":  # the row's own folder, left by other inputs: the job starts afresh
                    shutil.rmtree(options.out)
                if state != "done":
                    if options.engine == "maxtext":
                        jobs += _maxtext_jobs(f"{name}-train", options, previous, tpu)
                    elif tpu is not None:
                        raise UsageError(f"--tpu {tpu}: row {row} trains with the hf engine (torchrun on GPUs); "
                                         "TPU slices train rows whose training spec says engine: maxtext")
                    else:
                        jobs.append(_train_job(f"{name}-train", options, previous, accelerator, per_node, nodes,
                                               one))
                    previous = [jobs[-1]]
                model = options.out
        job = Job(f"{name}-eval", ["eval", "--model", str(model), "--method", recipe.method, "--row", row, *common,
                                   *(["--gate"] if row == DENSE and dense_gate else [])],
                  after=previous, accelerator=single)
        jobs.append(job)
        evals.append(job)
        if row == DENSE and dense_gate:
            gate = job
    if not jobs:  # every stage is done: a rerun submits nothing (`lpc diff` reads what is there)
        return jobs
    jobs.append(Job(f"{base}-diff", ["diff", recipe.method, "--profile", recipe.profile, "--results-dir",
                                     str(results), "--table", str(recipe.table), "--rows", ",".join(rows)],
                    after=evals, kind="afterany"))
    return jobs


def _job_name(base: str, row: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", f"{base}-{row}")


def _prune_command(request: stages.PruneRequest) -> List[str]:
    import json

    args = ["prune", "--model", request.model, "--method", request.method, "--out", str(request.out),
            "--seed", str(request.seed), "--dtype", request.dtype, "--overwrite"]
    for key, value in (("--revision", request.revision), ("--device", request.device), ("--calib", request.calib),
                       ("--nsamples", request.nsamples), ("--seqlen", request.seqlen),
                       ("--calib-batch", None if request.calib_batch == 1 else request.calib_batch)):
        if value is not None:
            args += [key, str(value)]
    # JSON is YAML, which `lpc prune` reads option values as: every value keeps its type.
    for key, value in request.options.items():
        args += ["--option", f"{key}={json.dumps(value)}"]
    if request.training is not None:  # the training run of a method that prunes by one (one node, --nproc)
        for key, value in stages.pruning_run_options(request).model_dump(
                exclude_defaults=True, exclude={"model", "out", "kind", "recipe", "device", "seed"}).items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + key.replace("_", "-"))
            else:
                args += [flag, json.dumps(value)]
        args[args.index("--seed") + 1] = str(stages.pruning_run_options(request).seed)
    return args


def _train_job(name: str, options, after: List[Job], accelerator: Optional[str], per_node: Optional[int],
               nodes: int, one: Optional[str]) -> Job:
    if options.kind == "lora":  # one process: LoRA recovery is not distributed
        return Job(name, stages.train_command(options), after=after, accelerator=one)
    per_node = per_node or options.nproc
    world = per_node * nodes
    if options.global_batch % (options.micro_batch * world):
        raise UsageError(f"{name}: global batch {options.global_batch} is not divisible by micro batch "
                         f"{options.micro_batch} x {world} processes ({nodes} node(s) x {per_node})")
    return Job(name, stages.train_command(options, worker=True), after=after, torchrun=(nodes, per_node),
               accelerator=accelerator, nodes=nodes)


def _maxtext_jobs(name: str, options, after: List[Job], tpu: Optional[str]) -> List[Job]:
    """MaxText training: one job on one machine; on a TPU slice, three: prepare on one host, MaxText's
    trainer on every host of the slice (SkyPilot runs a TPU job's command on each), export on one host."""
    from training.maxtext.train import resolve_data

    resolve_data(options.data)  # a data location the jobs will not find stops the submission here
    if tpu is None:
        return [Job(name, stages.train_command(options), after=after)]
    prepare = Job(f"{name}-prepare", stages.train_command(options.model_copy(update={"phase": "prepare"})),
                  after=after)
    run = Job(name, stages.train_command(options.model_copy(update={"phase": "run", "tpu": tpu})), after=[prepare],
              accelerator=tpu)
    export = Job(f"{name}-export", stages.train_command(options.model_copy(update={"phase": "export"})), after=[run])
    return [prepare, run, export]


def script(job: Job, python: List[str], title: str) -> str:
    """The job's bash script: the stage command, under torchrun for training."""
    command = " ".join(shlex.quote(a) for a in python)
    if job.torchrun is not None:
        nodes, per_node = job.torchrun
        if nodes == 1:
            launch = "--standalone --nnodes 1"
        else:  # every node runs this line; rank 0's host is the rendezvous point (jobman's variables)
            launch = (f"--nnodes {nodes} --rdzv-backend c10d --rdzv-id \"lpc-$JOBMAN_JOB_ID\" "
                      "--rdzv-endpoint \"$JOBMAN_COORDINATOR_ADDR:${MASTER_PORT:-29500}\"")
        command += f" -m torch.distributed.run {launch} --nproc-per-node {per_node}"
    command += " -m repro.cli " + " ".join(shlex.quote(a) for a in job.command)
    return f"#!/bin/bash\n# {title}: {job.name}\nset -euo pipefail\nexec {command}\n"


def submit(method: str, profile: str, *, backend: str, results_root: Path, rows: Optional[List[str]] = None,
           recipe_path: Optional[Path] = None, dense_gate: bool = True, work_root: Optional[Path] = None,
           gpus: Optional[str] = None, nodes: int = 1, tpu: Optional[str] = None, image: Optional[str] = None,
           eval_batch_size=None, log=print) -> List[Job]:
    from jobman import api
    from jobman.errors import UsageError as JobmanUsageError

    if nodes < 1:
        raise UsageError("--nodes must be at least 1")
    tpu = parse_tpu(tpu, backend=backend, nodes=nodes)
    recipe = load_recipe(method, profile, recipe_path, eval_batch_size=eval_batch_size)
    table = load_profile(recipe.method, profile, recipe.table)
    if backend == "local":
        check_device(recipe)
    selected = select_rows(recipe, rows)
    work = work_dir(results_root, profile, recipe.method, work_root)
    # Local and Slurm jobs see this machine's files (Slurm's home is shared); a SkyPilot node has the
    # kit installed in its image instead.
    python = ["python3"] if backend == "skypilot" else [sys.executable]
    jobs = plan(recipe, table, selected, results_root=results_root, work=work, gpus=gpus, nodes=nodes,
                dense_gate=dense_gate, tpu=tpu, log=log)
    secrets = [name for name in SECRETS if name in os.environ]
    title = f"lpc repro {recipe.method} --profile {profile}"
    for job in jobs:
        spec = api.JobSpec(argv=[f"{job.name}.sh"], script=script(job, python, title), script_name=f"{job.name}.sh",
                           name=job.name, backend=backend, accelerator=job.accelerator, nodes=job.nodes,
                           secrets=secrets, image=image, workdir=os.getcwd() if backend != "skypilot" else None,
                           env={name: os.environ[name] for name in FORWARDED if name in os.environ},
                           dependencies=[(job.kind, str(dep.id)) for dep in job.after])
        try:
            job.id = api.submit(spec)[0]
        except JobmanUsageError as exc:
            raise UsageError(f"jobman refused {job.name}: {exc}") from None
        after = ", ".join(f"{job.kind}:{dep.id}" for dep in job.after)
        log(f"submitted job {job.id} {job.name}" + (f" ({after})" if after else ""))
    log(f"{len(jobs)} jobs submitted to {backend}; `jobman queue` shows them")
    return jobs
