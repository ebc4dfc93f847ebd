"""Where a number came from: kit version and commit, image, packages, hardware."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

KIT_VERSION = "0.1.0"
PACKAGES = ("torch", "transformers", "lm_eval", "datasets", "accelerate", "safetensors", "numpy",
            "tokenizers", "peft")
REPO = Path(__file__).resolve().parents[1]


def package_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    versions.update({name: package_version(name) for name in PACKAGES})
    return versions


def git_sha() -> Optional[str]:
    """The kit's commit: baked into images as LPC_GIT_SHA, else asked of the checkout."""
    if os.environ.get("LPC_GIT_SHA"):
        return os.environ["LPC_GIT_SHA"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> Dict[str, object]:
    import torch

    info: Dict[str, object] = {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def provenance() -> Dict[str, object]:
    return {
        "kit_version": KIT_VERSION,
        "git_sha": git_sha(),
        # docker/container.sh passes the exact image reference (by digest) a run executes in.
        "image_digest": os.environ.get("LPC_IMAGE_REF"),
        "packages": package_versions(),
        "hardware": hardware(),
    }
