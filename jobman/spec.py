"""What a user asks for: the submit options, ``#JOBMAN`` directives, array ranges, dependencies.

A job is described by a `JobSpec`. The same option parser reads the command line and the
``#JOBMAN`` directive lines at the top of a script (in the spirit of ``#SBATCH``); command-line
flags override directives. Nothing here runs anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jobman.accelerators import parse_accelerator
from jobman.errors import UsageError

BACKENDS = ("local", "skypilot", "slurm")
DEPENDENCY_TYPES = ("afterok", "afterany", "afternotok")
DIRECTIVE_PREFIX = "#JOBMAN"
MAX_ARRAY_TASKS = 10000

# Environment variable names that look like credentials. Passing these with --env would store the
# value in the database and in the backend's task; they must go through --secret instead.
_SECRET_NAME_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class JobSpec:
    """Everything needed to run one job (or one array of jobs). JSON-able; holds no secret value."""

    argv: List[str] = field(default_factory=list)  # command, or [script path, args...] for scripts
    script: Optional[str] = None  # script text (copied at submit time, like sbatch)
    script_name: Optional[str] = None
    name: Optional[str] = None
    accelerator: Optional[str] = None  # canonical string: "v4-32" or "H100:8"
    nodes: int = 1  # GPU nodes; a TPU slice's hosts come from the accelerator table
    env: Dict[str, str] = field(default_factory=dict)
    secrets: List[str] = field(default_factory=list)  # names only; values read at run time
    image: Optional[str] = None
    setup: Optional[str] = None
    workdir: Optional[str] = None
    retries: int = 0
    array: Optional[List[int]] = None
    array_spec: Optional[str] = None
    array_limit: Optional[int] = None
    dependencies: List[Tuple[str, str]] = field(default_factory=list)  # (type, job id text)
    backend: Optional[str] = None
    spot: bool = False
    queued: bool = False  # GCP queued resources (SkyPilot accelerator_args.gcp_queued_resource)
    infra: Optional[str] = None  # SkyPilot infra, e.g. "gcp/us-central2"
    partition: Optional[str] = None  # Slurm
    time_limit: Optional[str] = None  # Slurm --time
    submit_dir: Optional[str] = None  # where `jobman submit` ran; the default working directory

    def command(self, script_path: Optional[str] = None) -> List[str]:
        """The argument vector to run: the command, or the script's stored copy at `script_path`,
        run by its #! line (``/bin/sh`` without one), with the script's arguments."""
        if self.script is None:
            return list(self.argv)
        return ([script_path] if self.script.startswith("#!") else ["/bin/sh", script_path]) + self.argv[1:]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["dependencies"] = [list(x) for x in self.dependencies]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "JobSpec":
        d = dict(d)
        d["dependencies"] = [tuple(x) for x in d.get("dependencies", [])]
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# argument parsing shared by the CLI and the directives


class RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """Options valid both on the command line and in ``#JOBMAN`` lines. Defaults are None so
    that a later source (the command line) only overrides what it actually sets."""
    p.add_argument("-J", "--job-name", "--name", dest="name", help="job name")
    p.add_argument("--accelerator", "--tpu", "--gpus", "-G", dest="accelerator",
                   help="TPU type (v4-32, v5p-16, v6e-8) or GPUs (H100:8)")
    p.add_argument("-N", "--nodes", type=int, dest="nodes", help="number of GPU nodes (TPU hosts come from the slice)")
    p.add_argument("-e", "--env", action="append", dest="env", metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--secret", action="append", dest="secrets", metavar="NAME",
                   help="pass environment variable NAME to the job; its value is read from the environment "
                        "when the job runs and never stored (repeatable)")
    p.add_argument("--image", dest="image", help="container image (pin a digest or tag, not :latest)")
    p.add_argument("--setup", dest="setup", help="setup command run once per host before the job (skypilot)")
    p.add_argument("-D", "--workdir", "--chdir", dest="workdir", help="working directory of the job")
    p.add_argument("--retries", type=int, dest="retries", help="re-run the user command up to N more times after a non-zero exit")
    p.add_argument("-a", "--array", dest="array", help="array task ids: 0-3, 1,3,5, 0-15:2, 0-99%%8")
    p.add_argument("-d", "--dependency", action="append", dest="dependency",
                   help="afterok:ID[:ID...], afterany:ID, afternotok:ID; comma separated (all must hold)")
    p.add_argument("-b", "--backend", dest="backend", choices=BACKENDS, help="execution backend")
    p.add_argument("--spot", dest="spot", action="store_const", const=True, help="use spot/preemptible capacity")
    p.add_argument("--queued", dest="queued", action="store_const", const=True,
                   help="request TPUs through GCP queued resources (skypilot)")
    p.add_argument("--infra", dest="infra", help="SkyPilot infra, e.g. gcp or gcp/us-central2")
    p.add_argument("-p", "--partition", dest="partition", help="Slurm partition")
    p.add_argument("-t", "--time", dest="time_limit", help="Slurm time limit, e.g. 2-00:00:00")


_DIRECTIVE_PARSER: Optional[argparse.ArgumentParser] = None


def _directive_parser() -> argparse.ArgumentParser:
    global _DIRECTIVE_PARSER
    if _DIRECTIVE_PARSER is None:
        p = RaisingParser(prog="#JOBMAN", add_help=False)
        add_submit_options(p)
        _DIRECTIVE_PARSER = p
    return _DIRECTIVE_PARSER


def parse_directives(script_text: str, source: str = "script") -> Dict[str, Any]:
    """Read the ``#JOBMAN`` lines at the top of a script into option values.

    Like sbatch, directives are read from the comment block at the top (after the shebang) and
    parsing stops at the first line that is neither blank nor a comment. Raises UsageError naming
    the file and line for a malformed directive.
    """
    values: Dict[str, Any] = {}
    for lineno, raw in enumerate(script_text.splitlines(), start=1):
        line = raw.strip()
        if lineno == 1 and line.startswith("#!"):
            continue
        if not line:
            continue
        if not line.startswith("#"):
            break
        if not line.startswith(DIRECTIVE_PREFIX):
            continue
        rest = line[len(DIRECTIVE_PREFIX):]
        if rest and not rest[0].isspace():
            # "#JOBMANX" is not a directive; "#JOBMAN--x" is a typo worth flagging.
            if rest.startswith("-"):
                raise UsageError("%s:%d: malformed #JOBMAN directive (missing space): %s" % (source, lineno, line))
            continue
        try:
            tokens = shlex.split(rest, comments=False)
        except ValueError as e:
            raise UsageError("%s:%d: malformed #JOBMAN directive (%s): %s" % (source, lineno, e, line))
        if not tokens:
            raise UsageError("%s:%d: malformed #JOBMAN directive (empty): %s" % (source, lineno, line))
        try:
            ns, extra = _directive_parser().parse_known_args(tokens)
        except UsageError as e:
            raise UsageError("%s:%d: malformed #JOBMAN directive (%s): %s" % (source, lineno, e, line))
        if extra:
            raise UsageError("%s:%d: malformed #JOBMAN directive (unexpected %r): %s"
                             % (source, lineno, " ".join(extra), line))
        for k, v in vars(ns).items():
            if v is None:
                continue
            if isinstance(v, list):
                values.setdefault(k, []).extend(v)
            else:
                values[k] = v
    return values


def merge_options(directives: Dict[str, Any], cli: Dict[str, Any]) -> Dict[str, Any]:
    """Command-line values win over directive values. ``--env`` and ``--secret`` accumulate
    (directives first, so a command-line ``--env K=...`` wins for the same K)."""
    out = dict(directives)
    for k, v in cli.items():
        if v is None:
            continue
        if k in ("env", "secrets") and isinstance(v, list):
            out[k] = list(directives.get(k, [])) + list(v)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# individual value parsers


def parse_array(text: str) -> Tuple[List[int], Optional[int]]:
    """``0-3`` -> [0,1,2,3]; ``1,3,5``; ``0-15:4`` (step); ``0-99%8`` (at most 8 at once)."""
    original = text
    text = text.strip()
    limit: Optional[int] = None
    if "%" in text:
        text, _, lim = text.partition("%")
        if not lim.isdigit() or int(lim) < 1:
            raise UsageError("invalid array range %r: the %%N limit must be a positive integer" % original)
        limit = int(lim)
    ids: List[int] = []
    if not text:
        raise UsageError("invalid array range %r: empty" % original)
    for part in text.split(","):
        part = part.strip()
        m = re.match(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$", part)
        if not m:
            raise UsageError("invalid array range %r: cannot read %r" % (original, part))
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) is not None else 1
        if end < start:
            raise UsageError("invalid array range %r: end %d is before start %d" % (original, end, start))
        if step < 1:
            raise UsageError("invalid array range %r: step must be at least 1" % original)
        ids.extend(range(start, end + 1, step))
    if len(ids) > MAX_ARRAY_TASKS:
        raise UsageError("invalid array range %r: more than %d tasks" % (original, MAX_ARRAY_TASKS))
    if len(set(ids)) != len(ids):
        raise UsageError("invalid array range %r: repeated task ids" % original)
    return sorted(ids), limit


_JOB_REF_RE = re.compile(r"^\d+(?:_\d+)?$")


def parse_dependencies(items: Sequence[str]) -> List[Tuple[str, str]]:
    """``afterok:12:13,afternotok:14`` -> [("afterok","12"),("afterok","13"),("afternotok","14")].
    A reference is a job id (``12``), an array (its id; all tasks) or one array task (``12_3``)."""
    deps: List[Tuple[str, str]] = []
    for item in items:
        for clause in item.split(","):
            clause = clause.strip()
            if not clause:
                continue
            kind, sep, rest = clause.partition(":")
            if kind not in DEPENDENCY_TYPES or not sep or not rest:
                raise UsageError("invalid dependency %r (expected afterok:ID, afterany:ID or afternotok:ID)" % clause)
            for ref in rest.split(":"):
                ref = ref.strip()
                if not _JOB_REF_RE.match(ref):
                    raise UsageError("invalid dependency %r: %r is not a job id" % (clause, ref))
                deps.append((kind, ref))
    return deps


def parse_env(items: Sequence[str]) -> Dict[str, str]:
    env: Dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError("invalid --env %r (expected KEY=VALUE)" % item)
        if not _ENV_NAME_RE.match(key):
            raise UsageError("invalid environment variable name %r" % key)
        if looks_like_secret(key):
            raise UsageError("%s looks like a credential: pass it with --secret %s so its value is read from the "
                             "environment when the job runs and never stored" % (key, key))
        env[key] = value
    return env


def looks_like_secret(name: str) -> bool:
    return bool(_SECRET_NAME_RE.search(name))


def parse_secrets(items: Sequence[str]) -> List[str]:
    out: List[str] = []
    for name in items:
        if not _ENV_NAME_RE.match(name):
            raise UsageError("invalid --secret %r: expected an environment variable name, not a value" % name)
        if name not in out:
            out.append(name)
    return out


def build_spec(options: Dict[str, Any], argv: List[str], script: Optional[str] = None,
               script_name: Optional[str] = None) -> JobSpec:
    """Validate merged option values into a JobSpec (raises UsageError on bad input)."""
    acc = parse_accelerator(options.get("accelerator"))
    nodes = options.get("nodes")
    if nodes is not None and nodes < 1:
        raise UsageError("--nodes must be at least 1")
    retries = options.get("retries")
    if retries is not None and retries < 0:
        raise UsageError("--retries must be 0 or more")
    array, limit, array_spec = None, None, options.get("array")
    if array_spec is not None:
        array, limit = parse_array(array_spec)
    if not argv and script is None:
        raise UsageError("nothing to run: give a script, or a command after --")
    workdir = options.get("workdir")
    if workdir is not None:
        workdir = os.path.expanduser(workdir)
    image = options.get("image")
    return JobSpec(
        argv=list(argv), script=script, script_name=script_name,
        name=options.get("name"),
        accelerator=str(acc) if acc is not None else None,
        nodes=nodes or 1,
        env=parse_env(options.get("env") or []),
        secrets=parse_secrets(options.get("secrets") or []),
        image=image, setup=options.get("setup"), workdir=workdir,
        retries=retries or 0,
        array=array, array_spec=array_spec, array_limit=limit,
        dependencies=parse_dependencies(options.get("dependency") or []),
        backend=options.get("backend"),
        spot=bool(options.get("spot")), queued=bool(options.get("queued")),
        infra=options.get("infra"), partition=options.get("partition"), time_limit=options.get("time_limit"),
    )
