"""cpt: continued pre-training, next-token cross-entropy (the collection's FMS-FSDP and MaxText runs)."""
from __future__ import annotations

from training.kinds.base import Kind

KIND = Kind("cpt", "next-token cross-entropy", engines=("hf", "maxtext"))
