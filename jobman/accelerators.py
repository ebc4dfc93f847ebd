"""Accelerator names: the TPU slice table and the GPU names jobman accepts.

TPU facts, per generation, from the Cloud TPU documentation (checked 2026; "hosts" below means
TPU VMs, i.e. the workers a multi-host job runs its command on):

* v2 and v3 -- https://cloud.google.com/tpu/docs/v2 , https://cloud.google.com/tpu/docs/v3 :
  the suffix counts TensorCores; 2 TensorCores per chip, 4 chips (8 cores) per host.
  v2-8 / v3-8 is one host; v3-32 is 4 hosts.
* v4 -- https://cloud.google.com/tpu/docs/v4 : the suffix counts TensorCores (2 per chip, one
  megacore), 4 chips per host, so hosts = N / 8 and chips = N / 2. v4-8 is one host, v4-32 is 4.
* v5p -- https://cloud.google.com/tpu/docs/v5p : like v4, the suffix counts TensorCores (2 per
  chip), 4 chips per host: v5p-8 is one host, v5p-16 is 2 hosts (8 chips).
* v5e (accelerator type ``v5litepod-N``) -- https://cloud.google.com/tpu/docs/v5e : the suffix
  counts chips (1 TensorCore per chip). Slices of 1, 4 and 8 chips are a single VM; multi-host
  slices (16..256 chips) use 4-chip VMs, so v5litepod-16 is 4 hosts and v5litepod-256 is 64.
* v6e (Trillium) -- https://cloud.google.com/tpu/docs/v6e : the suffix counts chips; v6e-1,
  v6e-4 and v6e-8 are one VM, v6e-16 .. v6e-256 use 4-chip VMs (v6e-16: 4 VMs, v6e-256: 64).

The original jobman derived worker counts with a regex that got v5p (v5p-16 -> 4) and v5litepod-8
(-> 2) wrong; `tests/jobman/test_jobman_accelerators.py` pins this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from jobman.errors import UsageError


@dataclass(frozen=True)
class Accelerator:
    """A parsed accelerator request."""

    kind: str  # "tpu" or "gpu"
    name: str  # canonical: "v4-32", "H100"
    count: int  # TPU: the suffix N; GPU: GPUs per node
    hosts: int = 1  # TPU VMs in the slice (GPU: 1 per node)
    chips: int = 0  # TPU chips in the slice
    chips_per_host: int = 0
    generation: str = ""

    @property
    def is_tpu(self) -> bool:
        return self.kind == "tpu"

    @property
    def sky_name(self) -> str:
        """The accelerator string SkyPilot expects: ``tpu-v4-32`` or ``H100``."""
        return "tpu-" + self.name if self.is_tpu else self.name

    def __str__(self) -> str:
        return self.name if self.is_tpu else "%s:%d" % (self.name, self.count)


# generation -> (suffix unit, chips per host in multi-host slices, single-VM sizes, allowed sizes)
# "cores": N counts TensorCores (2 per chip); "chips": N counts chips.
_TPU_GENERATIONS = {
    "v2": ("cores", 4, (8,), (8, 32, 128, 256, 512)),
    "v3": ("cores", 4, (8,), (8, 32, 64, 128, 256, 512, 1024, 2048)),
    "v4": ("cores", 4, (8,), None),  # any multiple of 8 up to 8192 (v4-8 .. v4-8192)
    "v5p": ("cores", 4, (8,), None),  # any multiple of 8 up to 12288
    "v5litepod": ("chips", 4, (1, 4, 8), (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": ("chips", 4, (1, 4, 8), (1, 4, 8, 16, 32, 64, 128, 256)),
}
_MAX_CORES = {"v4": 8192, "v5p": 12288}

# Default TPU VM runtime (software) versions, from each generation's page above and
# https://cloud.google.com/tpu/docs/runtimes .
TPU_RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}

# GPU names SkyPilot and Slurm clusters commonly use; matched case-insensitively.
GPU_NAMES = (
    "B200", "B100", "GB200", "H200", "H100", "H100-MEGA", "H100-SXM", "A100", "A100-80GB",
    "A10G", "A10", "A40", "L40S", "L40", "L4", "V100", "V100-32GB", "T4", "P100", "K80",
    "RTX6000", "RTXA6000", "RTX4090", "RTX3090", "MI300X", "MI250X",
)
_GPU_BY_UPPER = {g.upper(): g for g in GPU_NAMES}

_TPU_RE = re.compile(r"^(?:tpu-)?(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)$", re.IGNORECASE)
_GPU_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?::(\d+))?$")


def tpu_slice(name: str) -> Accelerator:
    """Hosts and chips of a TPU accelerator type such as ``v4-32``, ``v5p-16``, ``v6e-8``."""
    m = _TPU_RE.match(name.strip())
    if not m:
        raise UsageError("unknown TPU accelerator type %r (expected e.g. v4-32, v5p-16, v5litepod-8, v6e-8)" % name)
    gen = m.group(1).lower()
    if gen == "v5e":
        gen = "v5litepod"
    n = int(m.group(2))
    unit, per_host, single, allowed = _TPU_GENERATIONS[gen]
    if allowed is not None:
        ok = n in allowed
    else:
        ok = n >= 8 and n % 8 == 0 and n <= _MAX_CORES[gen]
    if not ok:
        raise UsageError("unknown TPU accelerator type %r: %s does not come in size %d" % (name, gen, n))
    chips = n // 2 if unit == "cores" else n
    if n in single:
        hosts, cph = 1, chips
    else:
        hosts, cph = chips // per_host, per_host
    return Accelerator(kind="tpu", name="%s-%d" % (gen, n), count=n, hosts=hosts, chips=chips,
                       chips_per_host=cph, generation=gen)


def parse_accelerator(text: Optional[str]) -> Optional[Accelerator]:
    """Parse ``v4-32`` / ``tpu-v5p-16`` (TPU) or ``H100:8`` / ``A100`` (GPU); None stays None."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    if _TPU_RE.match(text) or text.lower().startswith(("tpu-", "v2-", "v3-", "v4-", "v5", "v6")):
        return tpu_slice(text)
    m = _GPU_RE.match(text)
    if not m or m.group(1).upper() not in _GPU_BY_UPPER:
        raise UsageError("unknown accelerator type %r (TPU: v4-32, v5p-16, v6e-8, ...; GPU: H100:8, A100:4, ...)" % text)
    count = int(m.group(2)) if m.group(2) else 1
    if count < 1:
        raise UsageError("accelerator count must be at least 1 in %r" % text)
    return Accelerator(kind="gpu", name=_GPU_BY_UPPER[m.group(1).upper()], count=count)
