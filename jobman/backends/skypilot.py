"""The SkyPilot backend: each job becomes a SkyPilot *managed job* (``sky jobs launch``).

Translation (`task_config`), validated by SkyPilot's own loader ``sky.Task.from_yaml_config``:

* accelerator: TPU ``v4-32`` -> ``resources.accelerators: tpu-v4-32`` with the generation's
  runtime version in ``accelerator_args`` (``gcp_queued_resource: true`` with ``--queued``); the
  pod is one SkyPilot node and SkyPilot runs setup and run on every host of it. GPUs
  ``H100:8`` -> ``accelerators: {H100: 8}`` and ``num_nodes: --nodes``.
* ``--spot`` -> ``use_spot``; ``--image`` -> ``image_id: docker:<image>``; ``--retries N`` ->
  ``job_recovery.max_restarts_on_errors: N`` (preemptions are recovered by SkyPilot regardless).
* ``--env`` -> ``envs``; ``--secret NAME`` -> ``secrets: {NAME: null}``, whose value is taken
  from the submitting shell's environment at launch and handed to SkyPilot as a secret (redacted
  by SkyPilot; never written to jobman's database, logs or ``--dry-run`` output).
* ``run``: exports the host's rank and the host list under jobman's names (JOBMAN_NODE_RANK,
  JOBMAN_NODE_IPS, JOBMAN_NUM_NODES, JOBMAN_COORDINATOR_ADDR, and torchrun's MASTER_ADDR,
  MASTER_PORT, NODE_RANK, NNODES) from SKYPILOT_NODE_RANK / SKYPILOT_NODE_IPS, then ``exec``s the
  command as a shell-quoted argument vector, or writes the script through a quoted here-document
  and runs it. Nothing is ever pasted unquoted into the shell text.
"""

from __future__ import annotations

import copy
import os
import shlex
import uuid
from typing import Any, Dict, Iterator, List, Optional, TextIO, Tuple

from jobman.accelerators import TPU_RUNTIME_VERSIONS, parse_accelerator
from jobman.backends import Backend
from jobman.errors import BackendError, UsageError
from jobman.spec import JobSpec
from jobman.store import CANCELLED, COMPLETED, FAILED, NODE_FAIL, PENDING, RECOVERING, RUNNING, row_spec

# SkyPilot ManagedJobStatus -> jobman state
STATE_MAP = {
    "PENDING": PENDING, "SUBMITTED": PENDING, "STARTING": PENDING,
    "RUNNING": RUNNING, "WINDING_DOWN": RUNNING, "CANCELLING": RUNNING,
    "RECOVERING": RECOVERING,
    "SUCCEEDED": COMPLETED,
    "CANCELLED": CANCELLED,
    "FAILED": FAILED, "FAILED_SETUP": FAILED, "FAILED_PRECHECKS": FAILED, "FAILED_NO_RESOURCE": FAILED,
    "FAILED_CONTROLLER": NODE_FAIL,
}

RANK_PRELUDE = """\
# jobman: map SkyPilot's host rank and host list to the names the training code reads
export JOBMAN_NODE_RANK="${SKYPILOT_NODE_RANK:-0}"
export JOBMAN_NODE_IPS="${SKYPILOT_NODE_IPS:-127.0.0.1}"
export JOBMAN_NUM_NODES="$(printf '%s\\n' "$JOBMAN_NODE_IPS" | grep -c .)"
export JOBMAN_COORDINATOR_ADDR="$(printf '%s\\n' "$JOBMAN_NODE_IPS" | head -n1)"
export MASTER_ADDR="${MASTER_ADDR:-$JOBMAN_COORDINATOR_ADDR}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export NODE_RANK="$JOBMAN_NODE_RANK"
export NNODES="$JOBMAN_NUM_NODES"
"""


def sky_job_name(job_id: int, name: str, array_task: Optional[int] = None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "job"
    tag = "%d" % job_id if array_task is None else "%d-%d" % (job_id, array_task)
    return ("jm-%s-%s" % (tag, safe))[:60]


def _check_image(image: Optional[str]) -> None:
    if not image:
        return
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        raise UsageError("container image %r is not pinned: give a tag or @sha256 digest, not :latest" % image)


def run_script(spec: Any, job_id: int, array_task: Optional[int]) -> str:
    """The ``run:`` text: rank prelude, then the user's command as quoted argv or script."""
    lines = [RANK_PRELUDE]
    if spec.script is not None:
        delim = "JOBMAN_SCRIPT_%s" % uuid.uuid4().hex[:12].upper()
        while delim in spec.script:
            delim = "JOBMAN_SCRIPT_%s" % uuid.uuid4().hex[:12].upper()
        path = '"${TMPDIR:-/tmp}/jobman-%d%s.sh"' % (job_id, "" if array_task is None else "-%d" % array_task)
        body = spec.script if spec.script.endswith("\n") else spec.script + "\n"
        lines.append("cat > %s <<'%s'\n%s%s\n" % (path, delim, body, delim))
        lines.append("chmod 700 %s\n" % path)
        args = " ".join(shlex.quote(a) for a in spec.argv[1:])
        runner = path if spec.script.startswith("#!") else "/bin/sh " + path
        lines.append(("exec %s %s" % (runner, args)).rstrip() + "\n")
    else:
        lines.append("exec %s\n" % " ".join(shlex.quote(a) for a in spec.argv))
    return "".join(lines)


def task_config(spec: Any, job_id: int = 0, array_task: Optional[int] = None, name: Optional[str] = None,
                ) -> Dict[str, Any]:
    """The SkyPilot task YAML (as a dict) for one job or one array task. Holds no secret value."""
    acc = parse_accelerator(spec.accelerator)
    res: Dict[str, Any] = {}
    num_nodes = spec.nodes or 1
    if acc is not None and acc.is_tpu:
        if num_nodes != 1:
            raise UsageError("a TPU slice's hosts come from its type (%s has %d); do not pass --nodes"
                             % (acc.name, acc.hosts))
        res["accelerators"] = acc.sky_name
        args: Dict[str, Any] = {"runtime_version": TPU_RUNTIME_VERSIONS[acc.generation]}
        if spec.queued:
            args["gcp_queued_resource"] = True
        res["accelerator_args"] = args
    elif acc is not None:
        res["accelerators"] = {acc.name: acc.count}
    if spec.infra:
        res["infra"] = spec.infra
    if spec.spot:
        res["use_spot"] = True
    if spec.image:
        res["image_id"] = "docker:" + spec.image
    if spec.retries:
        res["job_recovery"] = {"max_restarts_on_errors": int(spec.retries)}
    envs: Dict[str, str] = dict(spec.env or {})
    envs["JOBMAN_JOB_ID"] = str(job_id) if array_task is None else "%d_%d" % (job_id, array_task)
    envs["JOBMAN_JOB_NAME"] = name or spec.name or "job"
    if array_task is not None:
        envs["JOBMAN_ARRAY_JOB_ID"] = str(job_id)
        envs["JOBMAN_ARRAY_TASK_ID"] = str(array_task)
    cfg: Dict[str, Any] = {
        "name": sky_job_name(job_id, name or spec.name or "job", array_task),
        "resources": res,
        "num_nodes": num_nodes,
        "envs": envs,
        "run": run_script(spec, job_id, array_task),
    }
    if spec.secrets:
        cfg["secrets"] = {k: None for k in spec.secrets}
    if spec.setup:
        cfg["setup"] = spec.setup
    if spec.workdir:
        cfg["workdir"] = spec.workdir
    return cfg


def load_task(cfg: Dict[str, Any], secrets: Optional[Dict[str, str]] = None) -> Any:
    """Validate `cfg` with SkyPilot's own task loader (no cloud access) and return the sky.Task."""
    import sky  # imported lazily: jobman works without SkyPilot for the other backends

    overrides = list((secrets or {}).items()) or None
    return sky.Task.from_yaml_config(copy.deepcopy(cfg), secrets_overrides=overrides)


def to_yaml(cfg: Dict[str, Any]) -> str:
    """YAML text of a task config, multi-line strings as literal blocks (readable ``run: |``)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: Any, data: str) -> Any:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


class SkyPilotBackend(Backend):
    name = "skypilot"

    def validate(self, spec: Any) -> None:
        _check_image(spec.image)
        task_config(spec)  # raises UsageError for e.g. --nodes with a TPU
        if spec.workdir and os.path.realpath(os.path.expanduser(spec.workdir)) in (
                os.path.realpath(os.path.expanduser("~")), os.path.realpath(os.path.expanduser("~/.ssh"))):
            raise UsageError("refusing to sync %s to the workers (it holds credentials); "
                             "use the project directory" % spec.workdir)

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        return to_yaml(task_config(spec, job_id, array_task, name=spec.name))

    def _sky(self) -> Any:
        try:
            import sky
        except ImportError as e:  # pragma: no cover - depends on the install
            raise BackendError("the skypilot backend needs SkyPilot: pip install -r requirements/jobman.txt (%s)" % e)
        return sky

    def launch(self, store: Any, rows: List[Any]) -> Iterator[Tuple[int, Dict[str, Any]]]:
        sky = self._sky()
        for row in rows:
            spec = JobSpec.from_dict(row_spec(row))
            job_id = row["array_id"] if row["array_id"] is not None else row["id"]
            cfg = task_config(spec, job_id, row["array_task"], name=row["name"])
            task = load_task(cfg, {k: os.environ[k] for k in spec.secrets})
            result = sky.get(sky.jobs.launch(task, name=cfg["name"]))
            ids = result[0] if isinstance(result, tuple) else result
            if isinstance(ids, list):
                ids = ids[0] if ids else None
            if ids is None:
                raise BackendError("SkyPilot accepted job %d but returned no managed job id" % row["id"])
            yield row["id"], {"backend_id": str(ids)}

    def poll(self, rows: List[Any]) -> Dict[str, Dict[str, Any]]:
        sky = self._sky()
        ids = [int(r["backend_id"]) for r in rows]
        records = sky.get(sky.jobs.queue(refresh=False, skip_finished=False, all_users=True, job_ids=ids))
        return parse_queue(records[0] if isinstance(records, tuple) else records)

    def cancel(self, row: Any) -> None:
        sky = self._sky()
        sky.get(sky.jobs.cancel(job_ids=[int(row["backend_id"])]))

    def stream_logs(self, row: Any, follow: bool, out: TextIO) -> int:
        if not row["backend_id"]:
            out.write("job %d has not reached SkyPilot yet (state %s)\n" % (row["id"], row["state"]))
            return 0
        rc = self._sky().jobs.tail_logs(job_id=int(row["backend_id"]), follow=follow, output_stream=out)
        return int(rc) if isinstance(rc, int) else 0


def parse_queue(records: Any) -> Dict[str, Dict[str, Any]]:
    """``sky jobs queue`` records (dicts or objects) -> {managed job id: jobman record}. A record of
    a multi-task job repeats the id; the last one wins."""
    out: Dict[str, Dict[str, Any]] = {}
    for rec in records or []:
        get = rec.get if isinstance(rec, dict) else (lambda k, r=rec: getattr(r, k, None))
        status = get("status")
        status = str(getattr(status, "value", status)).split(".")[-1]
        state = STATE_MAP.get(status)
        if state is None:
            continue
        rc = get("recovery_count")
        out[str(get("job_id"))] = {
            "state": state, "start_time": get("start_at"), "end_time": get("end_at"),
            "attempts": None if rc is None else int(rc) + 1,
            "reason": get("failure_reason") or (status if state in (FAILED, NODE_FAIL) else None)}
    return out
