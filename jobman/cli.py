"""``jobman``: Slurm-style commands over the local, SkyPilot and Slurm backends.

    jobman submit [options] SCRIPT [ARGS...]     like sbatch (reads #JOBMAN directives)
    jobman submit [options] -- COMMAND [ARGS...] a command, run as an argument vector
    jobman submit [options] --wrap 'shell text'  like sbatch --wrap (run by /bin/sh -c)
    jobman queue | show | acct | cancel | logs [-f] | requeue | tpu

Bad input prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jobman import __version__, api
from jobman.errors import BackendError, UsageError
from jobman.spec import BACKENDS, RaisingParser, add_submit_options, build_spec, merge_options, parse_directives
from jobman.store import ALL_STATES, TERMINAL_STATES, Store, display_id, row_deps, row_spec

SUBMIT_DESTS = ("name", "accelerator", "nodes", "env", "secrets", "image", "setup", "workdir", "retries",
                "array", "dependency", "backend", "spot", "queued", "infra", "partition", "time_limit")


def _build_parser() -> argparse.ArgumentParser:
    p = RaisingParser(prog="jobman", description="Slurm-style jobs on local processes, SkyPilot or Slurm.")
    p.add_argument("--version", action="version", version="jobman " + __version__)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=RaisingParser)

    s = sub.add_parser("submit", help="submit a script or a command (sbatch)")
    add_submit_options(s)
    s.add_argument("-W", "--wait", action="store_true", help="wait for the job; exit with its exit status")
    s.add_argument("--parsable", action="store_true", help="print only the job id")
    s.add_argument("--wrap", help="run this shell text with /bin/sh -c")
    s.add_argument("--dry-run", action="store_true", help="print what the backend would receive; submit nothing")
    s.add_argument("script", nargs="?", help="batch script (its #JOBMAN lines are read)")
    s.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    q = sub.add_parser("queue", help="list active jobs (squeue)")
    _filters(q)
    q.add_argument("--all", action="store_true", help="include finished jobs")

    sh = sub.add_parser("show", help="everything about one job (scontrol show job)")
    sh.add_argument("job")
    sh.add_argument("--json", action="store_true")

    a = sub.add_parser("acct", help="job history: state, exit code, start, end, attempts (sacct)")
    _filters(a)
    a.add_argument("--attempts", action="store_true", help="one line per attempt too")
    a.add_argument("--parsable", action="store_true", help="'|'-separated, no padding (sacct --parsable2)")

    c = sub.add_parser("cancel", help="cancel jobs (scancel)")
    c.add_argument("jobs", nargs="+")

    lg = sub.add_parser("logs", help="print a job's output")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")

    r = sub.add_parser("requeue", help="run finished jobs again (scontrol requeue)")
    r.add_argument("jobs", nargs="+")

    t = sub.add_parser("tpu", help="hosts and chips of a TPU accelerator type")
    t.add_argument("types", nargs="+")
    return p


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--jobs", help="comma-separated job ids")
    p.add_argument("-u", "--user", help="only this user's jobs")
    p.add_argument("-n", "--name", help="only jobs with this name")
    p.add_argument("-t", "--states", "--state", dest="states", help="comma-separated states, e.g. RUNNING,PENDING")
    p.add_argument("-b", "--backend", choices=BACKENDS)
    p.add_argument("--json", action="store_true", help="machine-readable output")


# ----------------------------------------------------------------------------------------------


def _split_dashdash(argv: List[str]) -> Tuple[List[str], Optional[List[str]]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def cmd_submit(ns: argparse.Namespace, command: Optional[List[str]]) -> int:
    cli_opts = {k: getattr(ns, k, None) for k in SUBMIT_DESTS}
    script_text, script_name, argv = None, None, []  # type: Optional[str], Optional[str], List[str]
    sources = sum(x is not None for x in (command, ns.wrap, ns.script))
    if sources == 0:
        raise UsageError("nothing to run: give a script, a command after --, or --wrap")
    if sources > 1:
        raise UsageError("give one of: a script, a command after --, or --wrap")
    directives: Dict[str, Any] = {}
    if command is not None:
        if not command:
            raise UsageError("empty command after --")
        argv = list(command)
    elif ns.wrap is not None:
        argv = ["/bin/sh", "-c", ns.wrap]
    else:
        path = Path(ns.script)
        if not path.is_file():
            raise UsageError("script not found: %s (to run a command, put it after --)" % ns.script)
        try:
            script_text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError("cannot read script %s: %s" % (ns.script, e))
        script_name = str(path)
        argv = [str(path)] + list(ns.script_args or [])
        directives = parse_directives(script_text, source=str(ns.script))
    opts = merge_options(directives, cli_opts)
    spec = build_spec(opts, argv, script=script_text, script_name=script_name)
    if ns.dry_run:
        spec.backend = api.default_backend(spec)
        spec.submit_dir = os.getcwd()
        b = api.get_backend(spec.backend)
        b.validate(spec)
        sys.stdout.write(b.render(spec, 0, spec.array[0] if spec.array else None))
        return 0
    ids = api.submit(spec)
    first = ids[0]
    if ns.parsable:
        print(first, flush=True)
    elif spec.array is not None:
        print("Submitted array job %d (%d tasks, %s backend)" % (first, len(ids), spec.backend), flush=True)
    else:
        print("Submitted job %d (%s backend)" % (first, spec.backend), flush=True)
    if ns.wait:
        return api.wait(ids)
    return 0


def _select(store: Store, ns: argparse.Namespace, active_only: bool) -> List[Any]:
    where, params = ["1"], []  # type: List[str], List[Any]
    if ns.jobs:
        rows = api.resolve_refs(store, [j for j in ns.jobs.split(",") if j.strip()])
        where.append("id IN (%s)" % ",".join("?" * len(rows)))
        params += [r["id"] for r in rows]
    if ns.user:
        where.append("user=?")
        params.append(ns.user)
    if ns.name:
        where.append("name=?")
        params.append(ns.name)
    if ns.backend:
        where.append("backend=?")
        params.append(ns.backend)
    if ns.states:
        states = [s.strip().upper() for s in ns.states.split(",") if s.strip()]
        bad = [s for s in states if s not in ALL_STATES]
        if bad:
            raise UsageError("unknown state %s (states: %s)" % (bad[0], ", ".join(ALL_STATES)))
        where.append("state IN (%s)" % ",".join("?" * len(states)))
        params += states
    elif active_only:
        where.append("state NOT IN (%s)" % ",".join("?" * len(TERMINAL_STATES)))
        params += list(TERMINAL_STATES)
    return store.jobs(" AND ".join(where), params)


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "Unknown"
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%dT%H:%M:%S")


def _fmt_elapsed(start: Optional[float], end: Optional[float]) -> str:
    if start is None:
        return "00:00:00"
    secs = int((end if end is not None else time.time()) - start)
    d, rem = divmod(max(secs, 0), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return ("%d-" % d if d else "") + "%02d:%02d:%02d" % (h, m, s)


def _fmt_exit(row: Any) -> str:
    """Slurm's ExitCode column: ``code:signal``."""
    code = row["exit_code"] if row["exit_code"] is not None else 0
    return "%d:%d" % (code, row["signal"] or 0)


def _table(headers: Sequence[str], rows: List[Sequence[str]], out: Any = None) -> None:
    out = out or sys.stdout
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, r)]
    fmt = "  ".join("%%-%ds" % w for w in widths)
    out.write(fmt % tuple(headers) + "\n")
    for r in rows:
        out.write((fmt % tuple(str(c) for c in r)).rstrip() + "\n")


def _describe(row: Any, store: Store) -> Dict[str, Any]:
    """A JSON-able view of one job for ``show``/``acct --json`` (no secret values exist to leak)."""
    d = {k: row[k] for k in row.keys() if k not in ("token", "spec", "deps")}
    d["spec"] = row_spec(row)
    d["dependencies"] = row_deps(row)
    d["attempt_list"] = [dict(a) for a in store.attempts(row["id"])]
    return d


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def cmd_queue(ns: argparse.Namespace) -> int:
    with Store() as store:
        api.refresh_or_warn(store)
        rows = _select(store, ns, active_only=not ns.all)
        if ns.json:
            print(_dumps([_describe(r, store) for r in rows]))
            return 0
        _table(["JOBID", "NAME", "USER", "BACKEND", "STATE", "TIME", "ACCEL", "ENGINE_ID", "REASON"],
               [[display_id(r), r["name"][:24], r["user"], r["backend"], r["state"],
                 _fmt_elapsed(r["start_time"], r["end_time"]), json.loads(r["spec"]).get("accelerator") or "-",
                 r["backend_id"] or "-",
                 r["reason"] or "-"] for r in rows])
        return 0


def cmd_show(ns: argparse.Namespace) -> int:
    with Store() as store:
        api.refresh_or_warn(store)
        rows = api.resolve_refs(store, [ns.job])
        views = [_describe(r, store) for r in rows]
        if ns.json:
            print(_dumps(views if len(views) > 1 else views[0]))
            return 0
        for v in views:
            for k in sorted(v):
                if k in ("spec", "attempt_list"):
                    continue
                val = v[k]
                if k.endswith("_time") and val is not None:
                    val = _fmt_time(val)
                print("%s=%s" % (k, val))
            for k in sorted(v["spec"]):
                if k == "script":
                    continue
                print("spec.%s=%s" % (k, json.dumps(v["spec"][k])))
            for a in v["attempt_list"]:
                print("attempt.%d start=%s end=%s exit=%s:%s%s" % (
                    a["attempt"], _fmt_time(a["start_time"]), _fmt_time(a["end_time"]),
                    a["exit_code"] if a["exit_code"] is not None else "-", a["signal"] or 0,
                    (" note=" + a["note"]) if a["note"] else ""))
            print()
        return 0


def cmd_acct(ns: argparse.Namespace) -> int:
    with Store() as store:
        api.refresh_or_warn(store)
        rows = _select(store, ns, active_only=False)
        if ns.json:
            print(_dumps([_describe(r, store) for r in rows]))
            return 0
        headers = ["JobID", "JobName", "Backend", "State", "ExitCode", "Start", "End", "Elapsed", "Attempts"]
        lines: List[List[str]] = []
        for r in rows:
            lines.append([display_id(r), r["name"], r["backend"], r["state"], _fmt_exit(r), _fmt_time(r["start_time"]),
                          _fmt_time(r["end_time"]), _fmt_elapsed(r["start_time"], r["end_time"]), str(r["attempts"])])
            if ns.attempts:
                for a in store.attempts(r["id"]):
                    code = a["exit_code"] if a["exit_code"] is not None else 0
                    lines.append(["%s.%d" % (display_id(r), a["attempt"]), "attempt", "", a["note"] or "",
                                  "%d:%d" % (code, a["signal"] or 0), _fmt_time(a["start_time"]),
                                  _fmt_time(a["end_time"]), _fmt_elapsed(a["start_time"], a["end_time"]), ""])
        if ns.parsable:
            print("|".join(headers))
            for ln in lines:
                print("|".join(ln))
        else:
            _table(headers, lines)
        return 0


def cmd_cancel(ns: argparse.Namespace) -> int:
    done = api.cancel(ns.jobs)
    for j in done:
        print("Cancelled job %d" % j)
    return 0


def cmd_logs(ns: argparse.Namespace) -> int:
    return api.logs(ns.job, follow=ns.follow)


def cmd_requeue(ns: argparse.Namespace) -> int:
    for j in api.requeue(ns.jobs):
        print("Requeued job %d" % j)
    return 0


def cmd_tpu(ns: argparse.Namespace) -> int:
    from jobman.accelerators import tpu_slice

    rows = []
    for t in ns.types:
        s = tpu_slice(t)
        rows.append([s.name, s.generation, str(s.hosts), str(s.chips), str(s.chips_per_host), s.sky_name])
    _table(["TYPE", "GENERATION", "HOSTS", "CHIPS", "CHIPS/HOST", "SKYPILOT"], rows)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command: Optional[List[str]] = None
        if args and args[0] == "submit":
            args, command = _split_dashdash(args)
        ns = _build_parser().parse_args(args)
        if ns.cmd is None:
            raise UsageError("missing command (submit, queue, show, acct, cancel, logs, requeue, tpu); see jobman -h")
        handler = {"submit": lambda: cmd_submit(ns, command), "queue": lambda: cmd_queue(ns),
                   "show": lambda: cmd_show(ns), "acct": lambda: cmd_acct(ns), "cancel": lambda: cmd_cancel(ns),
                   "logs": lambda: cmd_logs(ns), "requeue": lambda: cmd_requeue(ns), "tpu": lambda: cmd_tpu(ns)}
        return handler[ns.cmd]()
    except UsageError as e:
        sys.stderr.write("jobman: error: %s\n" % str(e).replace("\n", " "))
        return 2
    except BackendError as e:
        sys.stderr.write("jobman: %s\n" % str(e).replace("\n", " "))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
