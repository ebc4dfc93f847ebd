"""The Slurm backend: ``sbatch --parsable`` / ``sacct --parsable2`` / ``squeue`` / ``scancel``.

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
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import subprocess
from typing import Any, Dict, List, Optional, TextIO, Tuple

from jobman.accelerators import parse_accelerator
from jobman.backends import Backend
from jobman.errors import BackendError, UsageError
from jobman.store import (ACTIVE_STATES, CANCELLED, COMPLETED, FAILED, NODE_FAIL, PENDING, RECOVERING, RUNNING,
                          TERMINAL_STATES, row_spec)

# Slurm job state (squeue/sacct long names, see squeue(1) "JOB STATE CODES") -> jobman state
STATE_MAP = {
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_FED": PENDING, "REQUEUE_HOLD": PENDING,
    "CONFIGURING": PENDING, "RESV_DEL_HOLD": PENDING,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "RESIZING": RUNNING, "SIGNALING": RUNNING, "STAGE_OUT": RUNNING,
    "PREEMPTED": RECOVERING,
    "COMPLETED": COMPLETED,
    "CANCELLED": CANCELLED, "REVOKED": CANCELLED, "DEADLINE": FAILED,
    "FAILED": FAILED, "TIMEOUT": FAILED, "OUT_OF_MEMORY": FAILED, "SPECIAL_EXIT": FAILED,
    "NODE_FAIL": NODE_FAIL, "BOOT_FAIL": NODE_FAIL,
}

SACCT_FORMAT = "JobID,JobName,State,ExitCode,Start,End,Elapsed"

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
# parsing Slurm's machine-readable output


def parse_sbatch_parsable(text: str) -> str:
    """``sbatch --parsable`` prints ``<jobid>`` or ``<jobid>;<cluster>``."""
    line = text.strip().splitlines()[-1].strip() if text.strip() else ""
    jid = line.split(";", 1)[0]
    if not re.match(r"^\d+$", jid):
        raise BackendError("unexpected sbatch output: %r" % text.strip()[:200])
    return jid


def parse_exit_code(text: str) -> Tuple[Optional[int], Optional[int]]:
    """sacct's ExitCode ``code:signal``."""
    m = re.match(r"^(\d+):(\d+)$", text.strip())
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2))


def parse_slurm_time(text: str) -> Optional[float]:
    text = text.strip()
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def _expand_jobid(jobid: str) -> List[str]:
    """``123_[1-3,7%2]`` (pending array tasks, aggregated) -> 123_1, 123_2, 123_3, 123_7."""
    m = re.match(r"^(\d+)_\[([^\]]+)\]$", jobid)
    if not m:
        return [jobid]
    base, body = m.group(1), m.group(2).split("%")[0]
    out: List[str] = []
    for part in body.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            step = 1
            if ":" in b:
                b, s = b.split(":", 1)
                step = int(s)
            out += ["%s_%d" % (base, i) for i in range(int(a), int(b) + 1, step)]
        elif part:
            out.append("%s_%s" % (base, part))
    return out


def parse_sacct(text: str) -> Dict[str, Dict[str, Any]]:
    """Parse ``sacct --parsable2 --noheader --format=JobID,JobName,State,ExitCode,Start,End,Elapsed``
    (a header line is skipped if present). Steps (``123.batch``, ``123.0``) are skipped; the job's
    own line carries its state and exit code. Returns {job id: record}."""
    out: Dict[str, Dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|")
        if f[0] == "JobID" or len(f) < 7:
            continue
        jobid = f[0].strip()
        if "." in jobid:
            continue
        raw_state = f[2].strip().split()[0] if f[2].strip() else ""
        code, sig = parse_exit_code(f[3])
        rec = {"name": f[1], "slurm_state": raw_state, "state": STATE_MAP.get(raw_state.rstrip("+")),
               "exit_code": code, "signal": sig, "start": parse_slurm_time(f[4]), "end": parse_slurm_time(f[5]),
               "elapsed": f[6].strip(), "reason": f[2].strip()}
        for j in _expand_jobid(jobid):
            out[j] = dict(rec)
    return out


def parse_squeue(text: str) -> Dict[str, Dict[str, Any]]:
    """Parse ``squeue --noheader --format=%i|%T|%r`` (job id, long state, reason)."""
    out: Dict[str, Dict[str, Any]] = {}
    for line in text.splitlines():
        f = line.strip().split("|")
        if len(f) < 3 or f[0] in ("JOBID", ""):
            continue
        rec = {"slurm_state": f[1], "state": STATE_MAP.get(f[1]), "reason": f[2]}
        for j in _expand_jobid(f[0]):
            out[j] = dict(rec)
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
        raise BackendError("%s failed (exit %d): %s" % (argv[0], p.returncode, msg[0] if msg else ""))
    return p.stdout


def batch_script(spec: Any, name: str, output: str, script_path: Optional[str] = None,
                 dependency: Optional[str] = None) -> str:
    acc = parse_accelerator(spec.accelerator)
    lines = ["#!/bin/bash", "#SBATCH --job-name=%s" % shlex.quote(name), "#SBATCH --output=%s" % output,
             "#SBATCH --nodes=%d" % (spec.nodes or 1), "#SBATCH --ntasks-per-node=1"]
    if acc is not None:
        lines.append("#SBATCH --gpus-per-node=%s:%d" % (acc.name.lower(), acc.count))
    if spec.partition:
        lines.append("#SBATCH --partition=%s" % spec.partition)
    if spec.time_limit:
        lines.append("#SBATCH --time=%s" % spec.time_limit)
    if spec.workdir:
        lines.append("#SBATCH --chdir=%s" % spec.workdir)
    elif spec.submit_dir:
        lines.append("#SBATCH --chdir=%s" % spec.submit_dir)
    if spec.array_spec:
        lines.append("#SBATCH --array=%s" % spec.array_spec)
    if dependency:
        lines.append("#SBATCH --dependency=%s" % dependency)
    lines.append("")
    for k, v in sorted((spec.env or {}).items()):
        lines.append("export %s=%s" % (k, shlex.quote(v)))
    lines.append('export JOBMAN_JOB_ID="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"')
    lines.append('export JOBMAN_JOB_ID="${JOBMAN_JOB_ID:-$SLURM_JOB_ID}"')
    lines.append('export JOBMAN_ARRAY_TASK_ID="${SLURM_ARRAY_TASK_ID:-}"')
    for s in spec.secrets or []:
        lines.append('if [ -z "${%s+x}" ]; then echo "jobman: secret %s is not set" >&2; exit 1; fi' % (s, s))
    if script_path is not None:
        shebang = (spec.script or "").startswith("#!")
        cmd = ([script_path] if shebang else ["/bin/sh", script_path]) + list(spec.argv[1:])
    else:
        cmd = list(spec.argv)
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


class SlurmBackend(Backend):
    name = "slurm"

    def validate(self, spec: Any) -> None:
        acc = parse_accelerator(spec.accelerator)
        if acc is not None and acc.is_tpu:
            raise UsageError("the slurm backend schedules GPUs; for TPU %s use --backend skypilot" % acc)

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        return batch_script(spec, spec.name or "job", "slurm-%j.out",
                            "<JOBMAN_HOME>/jobs/%d/script" % job_id if spec.script is not None else None)

    def _dependency(self, store: Any, spec: Any) -> Optional[str]:
        if not spec.dependencies:
            return None
        clauses: Dict[str, List[str]] = {}
        for kind, ref in spec.dependencies:
            rows = store.resolve(ref)
            ids = sorted({r["backend_id"].split("_")[0] if r["array_id"] is not None and "_" not in ref
                          else r["backend_id"] for r in rows})
            clauses.setdefault(kind, []).extend(ids)
        return ",".join("%s:%s" % (k, ":".join(v)) for k, v in clauses.items())

    def launch(self, store: Any, rows: List[Any]) -> None:
        from jobman.spec import JobSpec

        first = rows[0]
        spec = JobSpec.from_dict(row_spec(first))
        missing = [k for k in spec.secrets if k not in os.environ]
        if missing:
            raise UsageError("secret %s is not set in this shell's environment" % missing[0])
        script_path = None
        if spec.script is not None:
            d = store.home / "jobs" / str(first["id"])
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            p = d / "script"
            p.write_text(spec.script)
            os.chmod(p, 0o700)
            script_path = str(p)
        array = first["array_id"] is not None
        output = str(store.home / "logs" / ("slurm-%A_%a.out" if array else "slurm-%j.out"))
        deps = None
        if all(r["backend"] == "slurm" and r["backend_id"] for _, ref in spec.dependencies
               for r in store.resolve(ref)):
            deps = self._dependency(store, spec)
        text = batch_script(spec, first["name"], output, script_path, deps)
        sid = parse_sbatch_parsable(_run(["sbatch", "--parsable"], stdin=text))
        with store.tx() as conn:
            for r in rows:
                bid = "%s_%d" % (sid, r["array_task"]) if array else sid
                log = str(store.home / "logs" / ("slurm-%s.out" % bid))
                store.update(conn, r["id"], backend_id=bid, log_path=log)

    def refresh(self, store: Any, rows: List[Any]) -> None:
        ids = sorted({r["backend_id"].split("_")[0] for r in rows if r["backend_id"]})
        if not ids:
            return
        try:
            recs = parse_sacct(_run(["sacct", "--parsable2", "--noheader", "--allocations",
                                     "--format=" + SACCT_FORMAT, "--jobs=" + ",".join(ids)]))
        except BackendError:  # accounting disabled: squeue knows live jobs only
            recs = parse_squeue(_run(["squeue", "--noheader", "--format=%i|%T|%r", "--jobs=" + ",".join(ids)]))
        self.apply_records(store, rows, recs)

    @staticmethod
    def apply_records(store: Any, rows: List[Any], recs: Dict[str, Dict[str, Any]]) -> None:
        for row in rows:
            rec = recs.get(row["backend_id"])
            if rec is None or rec.get("state") is None:
                continue
            fields: Dict[str, Any] = {}
            if rec.get("start"):
                fields["start_time"] = rec["start"]
            if rec.get("end") and rec["state"] in TERMINAL_STATES:
                fields["end_time"] = rec["end"]
            if rec.get("exit_code") is not None:
                fields["exit_code"] = rec["exit_code"]
                fields["signal"] = rec["signal"] or None
            reason = rec.get("reason") if rec["state"] not in (COMPLETED, RUNNING) else None
            with store.tx() as conn:
                if row["state"] != rec["state"]:
                    store.set_state(conn, row["id"], rec["state"], reason=reason, only_from=ACTIVE_STATES, **fields)
                elif fields:
                    store.update(conn, row["id"], **fields)

    def cancel(self, store: Any, row: Any) -> None:
        _run(["scancel", row["backend_id"]])

    def requeue(self, store: Any, row: Any) -> None:
        _run(["scontrol", "requeue", row["backend_id"]])

    def logs(self, store: Any, row: Any, follow: bool, out: TextIO) -> int:
        from jobman.backends.local import follow_file

        return follow_file(store, row, follow, out, refresh_every=15.0)
