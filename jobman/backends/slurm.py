"""The Slurm backend: ``sbatch`` / ``squeue`` + ``sacct`` / ``scancel`` / ``scontrol requeue``.

Every call is an argument vector (no shell). The batch script jobman generates:

* carries ``#SBATCH`` lines for name, output, nodes (one task per node), GPUs, partition, time,
  array (``--array=0-3%2``) and dependencies (``--dependency=afterok:<slurm ids>``, used when every
  dependency is itself a Slurm job; otherwise jobman's launcher waits and submits later);
* exports ``--env`` values with shell quoting; secrets are not in the script: Slurm's default
  ``--export=ALL`` hands the submitting shell's environment to the job when it starts;
* runs the command on every node with ``srun --ntasks-per-node=1``, through a fixed prelude that
  sets JOBMAN_NODE_RANK / JOBMAN_NODE_IPS / ... from SLURM_NODEID and SLURM_JOB_NODELIST and then
  ``exec "$@"`` with the user's argument vector (a script is stored under ``$JOBMAN_HOME/jobs`` and
  run by path, so ``$JOBMAN_HOME`` must be on a filesystem the compute nodes share, as Slurm
  already assumes for ``--output``);
* re-runs the srun step up to ``--retries`` times after a non-zero exit.

States come from two places, because each is wrong at some moment: squeue is slurmctld's live
view (a job requeued after a node failure is PENDING there while accounting still holds the
attempt that ended NODE_FAIL), sacct outlives slurmctld's memory and a slurmctld restart, and
alone has exit codes and the steps (an ``srun`` step killed for memory leaves the job itself
FAILED; jobman reports OUT_OF_MEMORY).
"""

from __future__ import annotations

import datetime as _dt
import re
import shlex
import subprocess
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from jobman.accelerators import parse_accelerator
from jobman.backends import Backend
from jobman.errors import BackendError, UsageError
from jobman.spec import JobSpec
from jobman.store import (CANCELLED, COMPLETED, FAILED, NODE_FAIL, OUT_OF_MEMORY, PENDING, RUNNING, TERMINAL_STATES,
                          TIMEOUT, row_spec)

# Slurm job state (squeue(1) "JOB STATE CODES") -> jobman state
STATE_MAP = {
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_FED": PENDING, "REQUEUE_HOLD": PENDING,
    "CONFIGURING": PENDING, "RESV_DEL_HOLD": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "RESIZING": RUNNING, "SIGNALING": RUNNING, "STAGE_OUT": RUNNING,
    "COMPLETED": COMPLETED, "FAILED": FAILED, "SPECIAL_EXIT": FAILED,
    "CANCELLED": CANCELLED, "REVOKED": CANCELLED, "PREEMPTED": CANCELLED,
    "TIMEOUT": TIMEOUT, "DEADLINE": TIMEOUT, "OUT_OF_MEMORY": OUT_OF_MEMORY,
    "NODE_FAIL": NODE_FAIL, "BOOT_FAIL": NODE_FAIL,
}

SACCT_FORMAT = "JobID,State,ExitCode,Start,End,Reason"
SQUEUE_FORMAT = "%i|%T|%r|%e"
# How long slurmctld's word that a job ended may run ahead of accounting before it is taken alone.
ACCOUNTING_LAG_S = 60.0

PRELUDE = (
    'export JOBMAN_NODE_RANK="${SLURM_NODEID:-0}"\n'
    'export JOBMAN_NODE_IPS="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null'
    ' || hostname)"\n'
    'export JOBMAN_NUM_NODES="${SLURM_JOB_NUM_NODES:-1}"\n'
    'export JOBMAN_COORDINATOR_ADDR="$(printf \'%s\\n\' "$JOBMAN_NODE_IPS" | head -n1)"\n'
    'export MASTER_ADDR="${MASTER_ADDR:-$JOBMAN_COORDINATOR_ADDR}" MASTER_PORT="${MASTER_PORT:-29500}"\n'
    'export NODE_RANK="$JOBMAN_NODE_RANK" NNODES="$JOBMAN_NUM_NODES"\n'
    'exec "$@"\n'
)


# ----------------------------------------------------------------------------------------------
# Slurm's machine-readable output


def parse_sbatch_parsable(text: str) -> str:
    """``sbatch --parsable`` prints ``<jobid>`` or ``<jobid>;<cluster>``."""
    line = text.strip().splitlines()[-1].strip() if text.strip() else ""
    jid = line.split(";", 1)[0]
    if not jid.isdigit():
        raise BackendError("unexpected sbatch output: %r" % text.strip()[:200])
    return jid


def parse_slurm_time(text: str) -> Optional[float]:
    try:
        return _dt.datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:  # Unknown, None, N/A
        return None


def _expand_jobid(jobid: str) -> List[str]:
    """``123_[1-3,7%2]`` (pending array tasks, aggregated) -> 123_1, 123_2, 123_3, 123_7."""
    m = re.match(r"^(\d+)_\[([^\]]+)\]$", jobid)
    if not m:
        return [jobid]
    out: List[str] = []
    for part in m.group(2).split("%")[0].split(","):
        a, _, rest = part.partition("-")
        b, _, step = rest.partition(":")
        out += ["%s_%d" % (m.group(1), i) for i in range(int(a), int(b or a) + 1, int(step or 1))]
    return out


def _state(text: str) -> Tuple[Optional[str], Optional[str]]:
    """``CANCELLED by 0`` -> (CANCELLED, 'CANCELLED by 0'): the jobman state and, where Slurm said
    more than the state's name or named another state, that text as the reason."""
    raw = text.strip()
    name = raw.split()[0].rstrip("+") if raw else ""
    state = STATE_MAP.get(name)
    return state, (raw if raw and (raw != name or name != state) else None)


def parse_sacct(text: str) -> Dict[str, Dict[str, Any]]:
    """``sacct --parsable2 --noheader --duplicates --format=JobID,State,ExitCode,Start,End,Reason``
    -> {job id: record of its latest attempt}. Step lines (``12.batch``, ``12.0``) mark the record
    they follow OUT_OF_MEMORY when Slurm killed one for memory; ``attempts`` counts the job's
    records that started (a requeue starts a new one)."""
    out: Dict[str, Dict[str, Any]] = {}
    current: List[Dict[str, Any]] = []
    for line in text.splitlines():
        f = line.split("|")
        if len(f) < 6 or f[0] in ("JobID", ""):
            continue
        state, why = _state(f[1])
        if "." in f[0]:
            if state == OUT_OF_MEMORY:
                for rec in current:
                    rec["oom"] = True
            continue
        code, _, sig = f[2].partition(":")
        start = parse_slurm_time(f[3])
        reason = f[5].strip() if f[5].strip() not in ("", "None") else why
        current = []
        for j in _expand_jobid(f[0]):
            started = out.get(j, {}).get("attempts", 0) + (start is not None)
            rec = {"state": state, "reason": reason, "start_time": start, "end_time": parse_slurm_time(f[4]),
                   "exit_code": int(code) if code.isdigit() else None, "signal": int(sig) if sig.isdigit() else None,
                   "attempts": started}
            out[j] = rec
            current.append(rec)
    return out


def parse_squeue(text: str) -> Dict[str, Dict[str, Any]]:
    """``squeue --noheader --states=all --format=%i|%T|%r|%e`` (id, long state, reason, end)."""
    out: Dict[str, Dict[str, Any]] = {}
    for line in text.splitlines():
        f = line.strip().split("|")
        if len(f) < 4 or f[0] in ("JOBID", ""):
            continue
        rec = {"state": STATE_MAP.get(f[1]), "reason": None if f[2] in ("None", "") else f[2],
               "end_time": parse_slurm_time(f[3])}
        for j in _expand_jobid(f[0]):
            out[j] = dict(rec)
    return out


def merge_views(live: Optional[Dict[str, Dict[str, Any]]], acct: Optional[Dict[str, Dict[str, Any]]],
                bids: List[str], now: Optional[float] = None,
                running: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """One record per engine id from squeue's view (`live`) and sacct's (`acct`); None for a view
    that could not be read. A job slurmctld says has ended waits for accounting to say so too
    (its exit code and steps are there), for at most ACCOUNTING_LAG_S. Accounting alone (slurmctld
    away) may not have heard yet that a job started: it never moves one of `running` (the ids
    jobman last saw running) back to PENDING, since nothing is requeued while slurmctld is away."""
    now = time.time() if now is None else now
    out: Dict[str, Dict[str, Any]] = {}
    for bid in bids:
        q, a = (live or {}).get(bid), (acct or {}).get(bid)
        if live is None and bid in running and a is not None and a["state"] == PENDING:
            continue
        rec = dict(a or {})
        if q is not None and q["state"] is not None:
            lagging = acct is not None and (a is None or a["state"] not in TERMINAL_STATES)
            if q["state"] in TERMINAL_STATES and lagging and now - (q["end_time"] or now) < ACCOUNTING_LAG_S:
                continue
            rec.update(state=q["state"], reason=q["reason"] or rec.get("reason"))
        if rec.get("state") is None:
            continue
        if rec["state"] == FAILED and rec.pop("oom", False):
            rec.update(state=OUT_OF_MEMORY, reason="a step ran out of memory")
        rec.pop("oom", None)
        out[bid] = rec
    return out


# ----------------------------------------------------------------------------------------------


def _run(argv: List[str], stdin: Optional[str] = None, timeout: float = 120.0) -> str:
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BackendError("%s not found on PATH: the slurm backend runs on a Slurm login node" % argv[0])
    except subprocess.TimeoutExpired:
        raise BackendError("%s timed out after %ds" % (argv[0], timeout))
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise BackendError("%s failed (exit %d): %s" % (argv[0], p.returncode, msg[-1] if msg else ""))
    return p.stdout


def batch_script(spec: Any, name: str, output: str, script_path: Optional[str] = None,
                 dependency: Optional[str] = None) -> str:
    acc = parse_accelerator(spec.accelerator)
    lines = ["#!/bin/bash", "#SBATCH --job-name=%s" % shlex.quote(name), "#SBATCH --output=%s" % output,
             "#SBATCH --nodes=%d" % (spec.nodes or 1), "#SBATCH --ntasks-per-node=1"]
    if acc is not None:
        lines.append("#SBATCH --gpus-per-node=%s:%d" % (acc.name.lower(), acc.count))
    for flag, value in (("partition", spec.partition), ("time", spec.time_limit),
                        ("chdir", spec.workdir or spec.submit_dir), ("array", spec.array_spec),
                        ("dependency", dependency)):
        if value:
            lines.append("#SBATCH --%s=%s" % (flag, value))
    lines.append("")
    for k, v in sorted((spec.env or {}).items()):
        lines.append("export %s=%s" % (k, shlex.quote(v)))
    lines.append('export JOBMAN_JOB_ID="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"')
    lines.append('export JOBMAN_JOB_ID="${JOBMAN_JOB_ID:-$SLURM_JOB_ID}"')
    lines.append('export JOBMAN_ARRAY_TASK_ID="${SLURM_ARRAY_TASK_ID:-}"')
    for s in spec.secrets or []:
        lines.append('if [ -z "${%s+x}" ]; then echo "jobman: secret %s is not set" >&2; exit 1; fi' % (s, s))
    cmd = spec.command(script_path)
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if spec.image:
        srun.append("--container-image=%s" % spec.image)  # pyxis/enroot
    srun += ["/bin/bash", "-c", PRELUDE, "jobman"] + cmd
    lines += [
        "attempt=0",
        "while :; do",
        "  attempt=$((attempt + 1)); export JOBMAN_ATTEMPT=$attempt",
        "  " + " ".join(shlex.quote(a) for a in srun),
        "  rc=$?",
        "  if [ $rc -eq 0 ] || [ $attempt -gt %d ]; then exit $rc; fi" % int(spec.retries or 0),
        '  echo "[jobman] attempt $attempt exited with $rc; retrying" >&2',
        "done",
        "",
    ]
    return "\n".join(lines)


def _engine_fields(store: Any, row: Any, sid: str) -> Dict[str, Any]:
    bid = sid if row["array_task"] is None else "%s_%d" % (sid, row["array_task"])
    return {"backend_id": bid, "log_path": str(store.home / "logs" / ("slurm-%s.out" % bid))}


def _marker(row: Any) -> str:
    """Put on sbatch's command line, where squeue (the comment) and sacct (SubmitLine) keep it, so
    that a job accepted by Slurm can be found again if jobman died before recording its id."""
    return "jobman:" + row["token"]


class SlurmBackend(Backend):
    name = "slurm"
    requeues_in_place = True

    def validate(self, spec: Any) -> None:
        acc = parse_accelerator(spec.accelerator)
        if acc is not None and acc.is_tpu:
            raise UsageError("the slurm backend schedules GPUs; for TPU %s use --backend skypilot" % acc)

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        return batch_script(spec, spec.name or "job", "slurm-%j.out",
                            "<JOBMAN_HOME>/jobs/%d/script" % job_id if spec.script is not None else None)

    def _dependency(self, store: Any, spec: Any) -> Optional[str]:
        """Slurm's own --dependency, when every dependency is a job Slurm knows; else None (then
        jobman's launcher has waited for them before launching)."""
        clauses: Dict[str, List[str]] = {}
        for kind, ref in spec.dependencies:
            for r in store.resolve(ref):
                if r["backend"] != "slurm" or not r["backend_id"]:
                    return None
                whole_array = r["array_id"] is not None and "_" not in ref
                clauses.setdefault(kind, []).append(r["backend_id"].split("_")[0] if whole_array else r["backend_id"])
        return ",".join("%s:%s" % (k, ":".join(sorted(set(v)))) for k, v in clauses.items()) or None

    def launch(self, store: Any, rows: List[Any]) -> Iterator[Tuple[int, Dict[str, Any]]]:
        first = rows[0]
        spec = JobSpec.from_dict(row_spec(first))
        script_path = str(store.write_script(first["id"], spec.script)) if spec.script is not None else None
        array = first["array_id"] is not None
        output = str(store.home / "logs" / ("slurm-%A_%a.out" if array else "slurm-%j.out"))
        text = batch_script(spec, first["name"], output, script_path, self._dependency(store, spec))
        sid = parse_sbatch_parsable(_run(["sbatch", "--parsable", "--comment=" + _marker(first)], stdin=text))
        for r in rows:
            yield r["id"], _engine_fields(store, r, sid)

    def poll(self, rows: List[Any]) -> Dict[str, Dict[str, Any]]:
        bids = sorted({r["backend_id"] for r in rows if r["backend_id"]})
        jobs = "--jobs=" + ",".join(sorted({b.split("_")[0] for b in bids}))
        views: List[Optional[Dict[str, Dict[str, Any]]]] = []
        errors = []
        for argv, parse in ((["squeue", "--noheader", "--states=all", "--format=" + SQUEUE_FORMAT, jobs], parse_squeue),
                            (["sacct", "--parsable2", "--noheader", "--duplicates", "--format=" + SACCT_FORMAT, jobs],
                             parse_sacct)):
            try:
                views.append(parse(_run(argv)))
            except BackendError as e:  # slurmctld restarting, accounting down or disabled
                views.append({} if "Invalid job id" in str(e) else None)
                errors.append(str(e))
        if views[0] is None and views[1] is None:
            raise BackendError("; ".join(errors))
        running = [r["backend_id"] for r in rows if r["state"] == RUNNING]
        return merge_views(views[0], views[1], bids, running=running)

    def cancel(self, row: Any) -> None:
        _run(["scancel", row["backend_id"]])

    def requeue(self, row: Any) -> None:
        _run(["scontrol", "requeue", row["backend_id"]])

    def adopt(self, store: Any, row: Any) -> Optional[Dict[str, Any]]:
        marker = _marker(row)
        found, unsure = None, None
        try:
            for line in _run(["squeue", "--noheader", "--states=all", "--format=%F|%k"]).splitlines():
                sid, _, comment = line.strip().partition("|")
                if comment == marker:
                    found = sid
        except BackendError as e:  # accounting alone may not have the job's SubmitLine yet
            unsure = e
        if found is None:
            since = _dt.datetime.fromtimestamp(row["submit_time"] - 60).strftime("%Y-%m-%dT%H:%M:%S")
            for line in _run(["sacct", "--parsable2", "--noheader", "--allocations", "--starttime=" + since,
                              "--format=JobID,SubmitLine"]).splitlines():
                sid, _, submit_line = line.partition("|")
                if "--comment=" + marker in submit_line.split():
                    found = sid.split("_")[0]
        if found is None and unsure is not None:
            raise unsure
        return None if found is None else _engine_fields(store, row, found)
