"""Process helpers: liveness that survives pid reuse, process-group signals, detached spawns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def pid_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (clock ticks since boot, Linux), or None if unknown/gone.
    Together with the pid it names one process even after the pid is reused."""
    try:
        data = Path("/proc/%d/stat" % pid).read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2:].split()
    if len(rest) < 20:
        return None
    if rest[0] == "Z":  # a zombie has finished
        return None
    return rest[19]


def alive(pid: Optional[int], start: Optional[str]) -> bool:
    """Whether the process `pid` that started at `start` still runs (not a zombie, not reused)."""
    if not pid:
        return False
    if Path("/proc").is_dir() and Path("/proc/self/stat").exists():
        now = pid_start(pid)
        if now is None:
            return False
        return start is None or now == start
    try:  # no /proc (macOS): best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pid: Optional[int], start: Optional[str], sig: int) -> bool:
    """Send `sig` to the process group led by `pid` if that very process is still alive."""
    if not pid or not alive(pid, start):
        return False
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(pid: Optional[int], start: Optional[str]) -> None:
    signal_group(pid, start, signal.SIGKILL)


def _pythonpath_env(env: Dict[str, str]) -> Dict[str, str]:
    """Make sure ``python -m jobman.runner`` finds this very jobman package in the child."""
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        parts.insert(0, root)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def spawn_detached(argv: List[str], log_path: Path, cwd: Optional[str] = None) -> Tuple[int, Optional[str]]:
    """Start a process in its own session (so killing the caller, or its terminal, leaves it
    running), with stdin closed and stdout/stderr appended to `log_path`."""
    env = _pythonpath_env(dict(os.environ))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=cwd if cwd and os.path.isdir(cwd) else None, env=env,
                             start_new_session=True, close_fds=True)
    return p.pid, pid_start(p.pid)


def runner_argv(home: Path, job_ids: List[int], token: str, parent_pid: int, parent_start: Optional[str]) -> List[str]:
    return [sys.executable, "-m", "jobman.runner", "--home", str(home), "--token", token,
            "--parent", "%d:%s" % (parent_pid, parent_start or "")] + [str(i) for i in job_ids]
