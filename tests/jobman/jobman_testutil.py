"""Helpers shared by the jobman tests (a module name no other test folder uses)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

def jobman(*args, check=None, timeout=120, env=None, input=None):
    """Run the jobman CLI as a real process; returns CompletedProcess (text)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "jobman"] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout, env=e, input=input)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)
