"""`lpc repro <method> --submit local|slurm|skypilot`: the plan of the rows (repro/plan.py) as jobman jobs.

Every step of the plan becomes one job running its stage's command on the request file the step's
request was written to (`lpc prune --request FILE`, the train stage under torchrun, `lpc eval
--request FILE`), and the jobs are chained with afterok dependencies as the steps depend:

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
from typing import Dict, List, Optional, Tuple

from methods.core.errors import UsageError
from repro import plan as planner
from repro.plan import Step, check_device, select_rows, work_dir
from repro.recipe import Recipe, load_recipe
from repro.requests import write_request
from repro.tables import load_profile

# Passed to every job by name: jobman reads its value where the job runs and stores it nowhere.
SECRETS = ("HF_TOKEN",)
# Passed to every job by value when the submitting shell sets them: where the jobs find their data.
FORWARDED = ("LPC_DCLM_ARRAY_RECORD",)


@dataclass
class Job:
    name: str
    command: List[str]                    # the stage's python arguments (after the interpreter)
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


def plan_jobs(recipe: Recipe, table, rows: List[str], *, results_root: Path, work: Path, gpus: Optional[str],
              nodes: int, dense_gate: bool, tpu: Optional[str] = None, log=print) -> List[Job]:
    """The plan of `rows` (repro/plan.py) as jobs, their request files written; a training left in a
    row's own folder by other inputs is cleared, so that its job starts afresh."""
    steps = planner.plan(recipe, table, rows, results_root=results_root, work=work, dense_gate=dense_gate, log=log)
    for step in steps:
        if step.stale:
            shutil.rmtree(step.request.out)
    return jobs_of(steps, recipe, results_root=results_root, work=work, rows=rows, gpus=gpus, nodes=nodes, tpu=tpu)


def jobs_of(steps: List[Step], recipe: Recipe, *, results_root: Path, work: Path, rows: List[str],
            gpus: Optional[str], nodes: int, tpu: Optional[str] = None) -> List[Job]:
    """The plan's steps as jobs: each runs its stage command on a request file the plan's request was
    written to (`lpc prune|eval --request`, the train stage under torchrun), chained afterok as the
    steps depend, then one diff job after every evaluation, whatever their outcome."""
    if not steps:  # every stage is done: a rerun submits nothing (`lpc diff` reads what is there)
        return []
    accelerator, per_node = parse_gpus(gpus)
    one = None if accelerator is None else accelerator.split(":")[0] + ":1"
    single = one if recipe.config.get("device", "cpu").startswith("cuda") else None
    base = f"lpc-{recipe.method}"
    jobs: Dict[int, Job] = {}
    out: List[Job] = []
    for step in steps:
        name = _job_name(base, step.row) + f"-{step.stage}"
        after = [jobs[id(dep)] for dep in step.after]
        request = work / step.row / f"{step.stage}.request.json"
        if step.stage == "train":
            made = _train_jobs(name, step.request, after, request, accelerator, per_node, nodes, one, tpu, step.row)
        else:
            write_request(step.request, request)
            made = [Job(name, ["-m", "repro.cli", step.stage, "--request", str(request)], after=after,
                        accelerator=single)]
        out += made
        jobs[id(step)] = made[-1]
    evals = [jobs[id(s)] for s in steps if s.stage == "eval"]
    out.append(Job(f"{base}-diff", ["-m", "repro.cli", "diff", recipe.method, "--profile", recipe.profile,
                                    "--results-dir", str(Path(results_root).resolve()), "--table", str(recipe.table),
                                    "--rows", ",".join(rows)], after=evals, kind="afterany"))
    return out


def _job_name(base: str, row: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", f"{base}-{row}")


def _train_jobs(name: str, options, after: List[Job], request: Path, accelerator: Optional[str],
                per_node: Optional[int], nodes: int, one: Optional[str], tpu: Optional[str], row: str) -> List[Job]:
    from methods.core.batching import accumulation_steps
    from training import kinds
    from training.stage import worker_command

    if options.engine == "maxtext":
        return _maxtext_jobs(name, options, after, request, tpu)
    if tpu is not None:
        raise UsageError(f"--tpu {tpu}: row {row} trains with the hf engine (torchrun on GPUs); "
                         "TPU slices train rows whose training spec says engine: maxtext")
    if not kinds.get(options.kind).distributed:  # one process, the kind's own loop
        write_request(options, request)
        return [Job(name, worker_command(request), after=after, accelerator=one)]
    per_node = per_node or options.nproc
    try:
        accumulation_steps(options.global_batch, options.micro_batch, per_node * nodes)
    except UsageError as exc:
        raise UsageError(f"{name}: {exc} ({nodes} node(s) x {per_node})") from None
    # torchrun sets the world size: the workers' request leaves out nproc.
    write_request(options.model_copy(update={"nproc": 1}), request)
    return [Job(name, worker_command(request), after=after, torchrun=(nodes, per_node), accelerator=accelerator,
                nodes=nodes)]


def _maxtext_jobs(name: str, options, after: List[Job], request: Path, tpu: Optional[str]) -> List[Job]:
    """MaxText training: one job on one machine; on a TPU slice, three: prepare on one host, MaxText's
    trainer on every host of the slice (SkyPilot runs a TPU job's command on each), export on one host."""
    from training.maxtext.train import resolve_data
    from training.stage import worker_command

    resolve_data(options.data)  # a data location the jobs will not find stops the submission here
    if tpu is None:
        write_request(options, request)
        return [Job(name, worker_command(request), after=after)]
    phases = []
    for phase, accelerator in (("prepare", None), ("run", tpu), ("export", None)):
        file = request.with_name(f"train-{phase}.request.json")
        write_request(options.model_copy(update={"phase": phase, **({"tpu": tpu} if phase == "run" else {})}), file)
        job = Job(name if phase == "run" else f"{name}-{phase}", worker_command(file),
                  after=phases[-1:] or after, accelerator=accelerator)
        phases.append(job)
    return phases


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
    command += " " + " ".join(shlex.quote(a) for a in job.command)
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
    jobs = plan_jobs(recipe, table, selected, results_root=results_root, work=work, gpus=gpus, nodes=nodes,
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
