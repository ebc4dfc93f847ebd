"""Static checks of the kit itself: Python 3.9 syntax, and every public make target resolves."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("methods", "repro", "training", "jobman")
METHODS = ("magnitude", "wanda", "sparsegpt")
PUBLIC_TARGETS = ["help", "setup", "test", "test-tf443", "test-jobman", "test-all", "test-container", "smoke", "bench",
                  "report", "diff-committed", *(f"{verb}-{m}" for verb in ("repro", "image", "pull") for m in METHODS)]


def _python39_runs() -> bool:
    if shutil.which("python3.9") is None:
        return False
    return subprocess.run(["python3.9", "--version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _python39_runs(), reason="no working python3.9 on PATH")
def test_kit_compiles_under_python39():
    """The images run the kit on Python 3.9: no syntax from later versions may creep in."""
    files = [str(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    code = "import sys, ast\nfor f in sys.argv[1:]: ast.parse(open(f).read(), f, feature_version=(3, 9))"
    proc = subprocess.run(["python3.9", "-c", code, *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_module_defers_annotations():
    """`X | None` in annotations is fine on 3.9 only when annotations are not evaluated."""
    missing = [str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if "def " in p.read_text() and "from __future__ import annotations" not in p.read_text()]
    assert not missing


@pytest.mark.parametrize("target", PUBLIC_TARGETS)
def test_make_dry_run_resolves(target):
    proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "No rule to make target" not in proc.stderr
