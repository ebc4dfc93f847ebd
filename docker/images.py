#!/usr/bin/env python3
"""The kit's container images: one table of per-image facts, and the queries everything else makes.

docker/Dockerfile is the one recipe; it builds any image of the table from the image's lock folder
docker/<image>/ (requirements.in and its hashed locks). Which image reproduces which method is not
repeated here: each method names its image in methods/registry.py (`family`), and `pairs` joins the
two, refusing a method whose image is not in the table. docker/images.mk, docker/container.sh, the
release workflow and the tests all read this file. Adding an image: one entry below, one lock folder
(`make lock-<image>` writes the locks from its requirements.in).

Standard library only (build tooling runs it with any python3 >= 3.7, no venv):

  images.py list                      image names, space-separated (images.mk's IMAGE_FAMILIES)
  images.py json                      image names as a JSON list (the release workflow's matrix)
  images.py pairs                     <method>:<image> for every method of methods/registry.py
  images.py get IMAGE FIELD           one fact: python, base, local_base, summary
  images.py build-args IMAGE          KEY=VALUE lines, the build arguments of docker/Dockerfile
  images.py smoke IMAGE               the commands the container tier and the release run inside it
  images.py local-base IMAGE          the local base's facts, KEY=VALUE lines (container.sh local-base)
  images.py check                     every way the table is inconsistent (exit 1 with the reasons)
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REGISTRY_FILE = os.path.join(ROOT, "methods", "registry.py")

# Where a run's results land inside an image (docker/container.sh mounts the host's results there).
RESULTS = "/workspace/results"


@dataclass(frozen=True)
class LocalBase:
    """A base image made on this machine with debootstrap, for building without any registry."""

    distribution: str                 # debian | ubuntu
    mirror: str
    python: str                       # the python3.X its archive carries
    components: str = "main"          # archive areas, as the public base images of that release have
    keyring_url: Optional[str] = None  # a keyring debootstrap does not have (Ubuntu's on Debian)
    keyring_sha256: Optional[str] = None
    keyring_path: Optional[str] = None  # the keyring file inside that package
    # debootstrap script of a suite newer than the host's debootstrap (Debian 12's 1.0.128 has none
    # for Ubuntu after jammy; every Ubuntu suite since gutsy uses gutsy's)
    script: Optional[str] = None


@dataclass(frozen=True)
class Image:
    python: str        # major.minor, from the base's distribution (deadsnakes on Ubuntu without it)
    base: str          # default base, pinned by digest (BASE_IMAGE overrides it at build time)
    local_base: str    # key of LOCAL_BASES: same python, made locally (BASE_IMAGE=local)
    summary: str       # what the image reproduces (its description label)
    smoke: Tuple[str, ...]  # commands run inside the built image; each must exit 0


def repro(method: str, *rows: str) -> str:
    """`lpc repro` of the smoke profile inside an image: exit 0 only when its diff passes."""
    only = " --rows " + ",".join(rows) if rows else ""
    return "lpc repro %s --profile smoke%s --results-dir %s" % (method, only, RESULTS)


# torch 2.5.0's PyPI wheel is the CUDA 12.4 build; 2.1.1's the CUDA 12.1 one. Both digests are the
# multi-arch indexes that independent public projects pin for these tags (no registry is reachable
# from the machines this kit is developed on, so they were not pulled here).
CUDA_12_4 = ("nvidia/cuda:12.4.1-runtime-ubuntu22.04"
             "@sha256:517da2300c184c9999ec203c2665244bdebd3578d12fcc7065e83667932643d9")
CUDA_12_1 = ("nvidia/cuda:12.1.1-runtime-ubuntu22.04"
             "@sha256:8bbc6e304b193e84327fa30d93eea70ec0213b808239a46602a919a479a73b12")

# Ubuntu 24.04 carries python3.12, which maxtext 0.2.5 requires; a TPU VM needs no CUDA base. The
# digest is the one that independent public projects pin as ubuntu:24.04 (one of them as
# ubuntu:noble-20260610), for linux/amd64 and linux/arm64 alike, so the multi-arch index; not
# pulled here either.
NOBLE = "ubuntu:24.04@sha256:4fbb8e6a8395de5a7550b33509421a2bafbc0aab6c06ba2cef9ebffbc7092d90"

LOCAL_BASES: Dict[str, LocalBase] = {
    "bullseye": LocalBase("debian", "http://deb.debian.org/debian", python="3.9"),
    # Debian ships no Ubuntu keyring: take Ubuntu's own package, pinned by its sha256 (it holds the
    # 2018 archive key F6ECB3762474EDA9D21B7022871920D1991BC93C that signs jammy). python3.10-venv
    # is in universe, which Ubuntu's own base images (and so the CUDA ones) enable.
    "jammy": LocalBase(
        "ubuntu", "http://archive.ubuntu.com/ubuntu", python="3.10", components="main,universe",
        keyring_url="http://archive.ubuntu.com/ubuntu/pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb",
        keyring_sha256="0d0e7ed6b112f5d03eabf3c7eb01ebdacf9c57714b279e90495cfc58c8c4520f",
        keyring_path="usr/share/keyrings/ubuntu-archive-keyring.gpg"),
    # Ubuntu 24.04: python3.12 in main, python3.12-venv in universe. Its Release file is signed with
    # the same 2018 archive key, so jammy's keyring package (same sha256) verifies it too.
    "noble": LocalBase(
        "ubuntu", "http://archive.ubuntu.com/ubuntu", python="3.12", components="main,universe",
        keyring_url="http://archive.ubuntu.com/ubuntu/pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb",
        keyring_sha256="0d0e7ed6b112f5d03eabf3c7eb01ebdacf9c57714b279e90495cfc58c8c4520f",
        keyring_path="usr/share/keyrings/ubuntu-archive-keyring.gpg", script="gutsy"),
}

# One entry per image; docker/README.md gives the reasons for each image's pins. Every method an
# image serves runs its whole smoke profile inside it, training rows included (one process on the
# CPU trains without FSDP2, which in torch 2.5 needs CUDA): `RUNTIME=auto` picks an image for
# `make repro-<m> PROFILE=smoke`, so the image must run every row of it.
IMAGES: Dict[str, Image] = {
    "sparse": Image(
        python="3.9", base=CUDA_12_4, local_base="bullseye",
        summary="Magnitude, Wanda and SparseGPT reproductions (the collection's wanda environment)",
        smoke=(repro("magnitude"), repro("wanda"), repro("sparsegpt"))),
    "width": Image(
        python="3.9", base=CUDA_12_4, local_base="bullseye",
        summary="Wanda-sp, FLAP and LLM-Pruner reproductions (the collection's LLM-Pruner environment)",
        smoke=(repro("wanda-sp"), repro("flap"), repro("llm-pruner"))),
    "minitron": Image(
        python="3.9", base=CUDA_12_4, local_base="bullseye",
        summary="Minitron width/depth and ShortGPT reproductions (the collection's pruning/minitron environment)",
        smoke=(repro("shortgpt"), repro("minitron-depth"), repro("minitron-width"))),
    "shortened": Image(
        python="3.9", base=CUDA_12_1, local_base="bullseye",
        summary="Shortened LLaMA reproduction (shortened-llm's environment)",
        smoke=(repro("shortened"),)),
    # The training stage (`lpc train`, `lpc eval`) and Sheared LLaMA: the collection's FMS-FSDP
    # environment, which is also its GPU evaluation environment. Its smoke run passes on a runner
    # without a GPU: one process trains on the CPU without FSDP2 (whose torch 2.5 version needs CUDA
    # streams; `lpc train --nproc 2` is refused there in one line).
    "train": Image(
        python="3.10", base=CUDA_12_4, local_base="jammy",
        summary="Training stage: lpc train (FSDP2 on GPUs, LoRA) and evaluation (the collection's FMS-FSDP environment)",
        smoke=("lpc train --model smoke --kind lora --data smoke --steps 3 --global-batch 4 --micro-batch 2 "
               "--seqlen 128 --lr 1e-4 --option val_set_size=16 --option warmup_steps=1 --option precision=fp32 "
               "--out %s/smoke/train-lora --overwrite" % RESULTS,
               repro("sheared"))),
    # The TPU path: no method runs here, so its smoke commands are the path's own, on the CPU (JAX's
    # TPU wheel falls back to the CPU without a TPU): the smoke model converted to MaxText, scored
    # with MaxText's JAX model against the dense row's smoke references (`--gate` exits 1 when off),
    # and converted back to Hugging Face.
    "maxtext": Image(
        python="3.12", base=NOBLE, local_base="noble",
        summary="TPU path: MaxText conversion, training on TPU and the MaxText lm-eval backend (jax[tpu], libtpu)",
        smoke=("lpc convert --to maxtext --model smoke --out %s/smoke/maxtext --overwrite" % RESULTS,
               "lpc eval --backend maxtext --model %s/smoke/maxtext --method shortgpt --profile smoke --row dense "
               "--results-dir %s --gate" % (RESULTS, RESULTS),
               "lpc convert --to hf --model %s/smoke/maxtext --out %s/smoke/maxtext-hf --overwrite"
               % (RESULTS, RESULTS))),
}

FIELDS = ("python", "base", "local_base", "summary")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def method_registry():
    """methods/registry.py, loaded by path (the `methods` package itself needs torch)."""
    spec = importlib.util.spec_from_file_location("lpc_method_registry", REGISTRY_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module.REGISTRY


def pairs():
    """[(method, image)] in registry order; ValueError when a method names an image not in IMAGES
    or a method shares its name with a different image (make targets take both names)."""
    out = []
    for name, method in method_registry().items():
        if method.family not in IMAGES:
            raise ValueError("method %r names image %r, which docker/images.py does not have (images: %s)"
                             % (name, method.family, ", ".join(IMAGES)))
        if name in IMAGES and name != method.family:
            raise ValueError("method %r runs in image %r but an image of the same name exists"
                             % (name, method.family))
        out.append((name, method.family))
    return out


def build_args(name: str, git_sha: str = "unknown"):
    """The build arguments docker/Dockerfile takes for image `name` (BASE_IMAGE: its default)."""
    image = IMAGES[name]
    return [("BASE_IMAGE", image.base), ("PYTHON_VERSION", image.python), ("IMAGE", name),
            ("IMAGE_SUMMARY", image.summary), ("GIT_SHA", git_sha)]


def problems():
    """Every way the table departs from its rules, as sentences."""
    out = []
    for name, image in IMAGES.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            out.append("image name %r must be lower-case letters, digits and dashes" % name)
        if not DIGEST.search(image.base):
            out.append("%s: base %s is not pinned by @sha256 digest" % (name, image.base))
        local = LOCAL_BASES.get(image.local_base)
        if local is None:
            out.append("%s: local base %r is not in LOCAL_BASES" % (name, image.local_base))
        elif local.python != image.python:
            out.append("%s: python %s but its local base %s carries python %s"
                       % (name, image.python, image.local_base, local.python))
        for lock in ("requirements.in", "requirements.lock", "requirements-bootstrap.in",
                     "requirements-bootstrap.lock"):
            if not os.path.isfile(os.path.join(HERE, name, lock)):
                out.append("%s: docker/%s/%s is missing" % (name, name, lock))
        if not image.smoke:
            out.append("%s: no smoke command" % name)
    try:
        served = {image for _, image in pairs()}
    except ValueError as exc:
        out.append(str(exc))
    else:
        # `RUNTIME=auto` runs a method's whole smoke profile in its image: the image must show it does.
        for method, name in pairs():
            if repro(method) not in IMAGES[name].smoke:
                out.append("%s: serves %s but does not run its whole smoke profile (%s)" % (name, method, repro(method)))
        # An image without a method must say in its smoke commands what it runs instead.
        for name, image in IMAGES.items():
            if name not in served and not any(not cmd.startswith("lpc repro ") for cmd in image.smoke):
                out.append("%s: serves no method of methods/registry.py and has no other smoke command" % name)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])

    def image_arg():
        if len(args) < 1 or args[0] not in IMAGES:
            given = args[0] if args else "(none)"
            print("docker/images.py: unknown image %s (images: %s)" % (given, ", ".join(IMAGES)), file=sys.stderr)
            sys.exit(2)
        return args[0]

    if cmd == "list":
        print(" ".join(IMAGES))
    elif cmd == "json":
        print(json.dumps(list(IMAGES)))
    elif cmd == "pairs":
        try:
            print(" ".join("%s:%s" % p for p in pairs()))
        except ValueError as exc:
            print("docker/images.py: %s" % exc, file=sys.stderr)
            return 2
    elif cmd == "get" and len(args) == 2 and args[1] in FIELDS:
        print(getattr(IMAGES[image_arg()], args[1]))
    elif cmd == "build-args":
        name = image_arg()
        for key, value in build_args(name, args[1] if len(args) > 1 else "unknown"):
            print("%s=%s" % (key, value))
    elif cmd == "smoke":
        print("\n".join(IMAGES[image_arg()].smoke))
    elif cmd == "local-base":
        key = IMAGES[image_arg()].local_base
        local = LOCAL_BASES[key]
        print("SUITE=%s" % key)
        print("REF=localhost/lpc-base:%s-minbase" % key)
        for field in ("distribution", "mirror", "python", "components", "keyring_url", "keyring_sha256",
                      "keyring_path", "script"):
            print("%s=%s" % (field.upper(), getattr(local, field) or ""))
    elif cmd == "check":
        bad = problems()
        for line in bad:
            print("docker/images.py: " + line, file=sys.stderr)
        return 1 if bad else 0
    else:
        print(__doc__.split("\n\n")[-1].rstrip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
