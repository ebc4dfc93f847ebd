"""Static checks of the kit itself: Python 3.9 syntax, and every public make target resolves."""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess

import pytest

from methods.registry import REGISTRY
from tests.conftest import REPO

PACKAGES = ("methods", "repro", "training", "jobman")
METHODS = ("magnitude", "wanda", "sparsegpt")
# Every method has an image (the registry's `family`, an image of docker/images.py): its image and
# pull targets; every image its build, smoke, lock and push targets.
IMAGE_METHODS = tuple(REGISTRY)
IMAGES = subprocess.run(["python3", str(REPO / "docker" / "images.py"), "list"], capture_output=True,
                        text=True).stdout.split()
PUBLIC_TARGETS = ["help", "setup", "smoke-model", "test", "test-tf443", "test-jobman", "test-all", "test-container",
                  "test-cluster", "cluster-collection",
                  "smoke", "bench", "report", "diff-committed", "images", "rehearse-all", "gpu-check",
                  *(f"rehearse-{m}" for m in METHODS), *(f"repro-{m}" for m in METHODS),
                  *(f"{verb}-{m}" for verb in ("image", "pull") for m in IMAGE_METHODS)]
IMAGE_TARGETS = [f"{verb}-{i}" for verb in ("image", "image-smoke", "lock", "push") for i in IMAGES]


def _kit_files():
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


def _python39():
    """A working Python 3.9 interpreter, if this machine has one (pyenv keeps them off PATH)."""
    candidates = [shutil.which("python3.9"), *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


def test_kit_parses_with_python39_grammar():
    """The images run the kit on Python 3.9: no syntax from later versions may creep in."""
    for path in _kit_files():
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))


@pytest.mark.skipif(_python39() is None, reason="no working python3.9 on this machine")
def test_kit_compiles_under_a_real_python39():
    code = "import sys, ast\nfor f in sys.argv[1:]: ast.parse(open(f).read(), f)"
    proc = subprocess.run([_python39(), "-c", code, *map(str, _kit_files())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_module_defers_annotations():
    """`X | None` in annotations is fine on 3.9 only when annotations are not evaluated."""
    missing = [str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if "def " in p.read_text() and "from __future__ import annotations" not in p.read_text()]
    assert not missing


def _make(*args):
    """make as a user runs it: not as a sub-make of `make test` (whose MAKEFLAGS would leak in)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("target", PUBLIC_TARGETS)
def test_make_dry_run_resolves(target):
    proc = _make("-n", target)
    assert proc.returncode == 0, proc.stderr
    assert "No rule to make target" not in proc.stderr


def test_every_image_target_resolves():
    """image-, image-smoke-, lock- and push-<image> for every image of docker/images.py, in one dry run."""
    assert IMAGES, "docker/images.py lists no image"
    proc = _make("-n", *IMAGE_TARGETS)
    assert proc.returncode == 0, proc.stderr
    assert "No rule to make target" not in proc.stderr
    for image in IMAGES:
        for verb in ("build", "smoke", "lock", "push"):
            assert f"container.sh {verb} {image}" in proc.stdout, (verb, image)


def test_every_registered_image_is_in_the_image_table():
    """docker/images.py joins the registry's families to its table and refuses a family it lacks."""
    proc = subprocess.run(["python3", str(REPO / "docker" / "images.py"), "pairs"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"{m.name}:{m.family}" for m in REGISTRY.values()]
    assert {m.family for m in REGISTRY.values()} <= set(IMAGES)


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_image_target_builds_the_method_family(method):
    proc = _make("-n", f"image-{method}")
    assert proc.returncode == 0, proc.stderr
    assert f"container.sh build {REGISTRY[method].family}" in proc.stdout, proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_paper_profile_without_a_gpu_stops_at_once_naming_smoke():
    proc = _make("repro-wanda", "PROFILE=paper")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "PROFILE=smoke" in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing was set up or run
