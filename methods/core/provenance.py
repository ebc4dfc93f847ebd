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
REPO = Path(__file__).resolve().parents[2]


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


# Settings that change which kernels do the float arithmetic (README, "Results across machines"):
# recorded when a run sets them, since they decide rounding as much as the CPU does.
ARITHMETIC_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                  "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# x86-64 micro-architecture levels by the CPU flags each adds (the psABI's v2, v3, v4).
ISA_LEVELS = (("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
              ("x86-64-v3", ("avx2", "bmi2", "fma", "movbe")),
              ("x86-64-v2", ("sse4_2", "popcnt", "ssse3")))


def hardware() -> Dict[str, object]:
    """The machine and the arithmetic it ran: CPU model and ISA level, the kernels torch picked for it,
    the BLAS / oneDNN builds, the thread count, and any setting that overrides them."""
    import torch

    info: Dict[str, object] = {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    info.update(_cpu())
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info.update(_math_libraries(torch.__config__.show()))
    overrides = {name: os.environ[name] for name in ARITHMETIC_ENV if name in os.environ}
    if overrides:
        info["arithmetic_env"] = overrides
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu() -> Dict[str, object]:
    """CPU model and x86-64 level from /proc/cpuinfo (Linux); the machine name elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine()}
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    level = next((name for name, needs in ISA_LEVELS if flags.issuperset(needs)), platform.machine())
    return {"cpu_model": fields.get("model name", platform.machine()), "isa_level": level}


def _math_libraries(config: str) -> Dict[str, Optional[str]]:
    """BLAS and oneDNN versions as torch's build configuration states them."""
    import re

    mkl = re.search(r"Math Kernel Library Version (\S+)", config)
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    return {"blas": f"{blas.group(1)} {mkl.group(1)}" if blas and mkl else (blas.group(1) if blas else None),
            "onednn": onednn.group(1) if onednn else None}


def machine_summary(info: Dict[str, object]) -> str:
    """One line for a results header: what decides a CPU run's rounding."""
    parts = [str(info.get("isa_level", "?")), f"torch CPU {info.get('torch_cpu_capability', '?')}"]
    if info.get("blas"):
        parts.append(str(info["blas"]))
    if info.get("onednn"):
        parts.append(f"oneDNN {info['onednn']}")
    parts.append(f"{info.get('cpu_threads', '?')} threads")
    if info.get("arithmetic_env"):
        parts.append(" ".join(f"{k}={v}" for k, v in info["arithmetic_env"].items()))
    return f"{info.get('cpu_model', 'unknown CPU')} ({', '.join(parts)})"


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss, KiB on Linux): an upper bound for a stage."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def provenance() -> Dict[str, object]:
    return {
        "kit_version": KIT_VERSION,
        "git_sha": git_sha(),
        # docker/container.sh passes the exact image reference (by digest) a run executes in.
        "image_digest": os.environ.get("LPC_IMAGE_REF"),
        "packages": package_versions(),
        "hardware": hardware(),
    }
