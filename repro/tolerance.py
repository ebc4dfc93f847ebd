"""The tolerance policy: how far a reproduced number may sit from its reference and still pass.

Written once, applied to every table:

* Accuracy (percent): the benchmark's own sampling error. A split of n examples measured at p has
  binomial standard error sqrt(p(1-p)/n); a cell passes within Z_ACCURACY = 2 standard errors of the
  reference (about a 95% band for an independent re-measurement). n is the size of the split the
  paper evaluated (stored with each metric in the table), p is the reference value.
* Perplexity: a relative band, because perplexity is a ratio scale: the profile's `ppl_rel`
  (PPL_REL_DEFAULT unless the table's profile sets it).
* Structure (parameter counts, hidden size, layers): exact; pruning is deterministic arithmetic.
* Overrides: a table may widen or narrow the band for chosen rows/metrics, and every override must
  carry its reason (for example SparseGPT's sensitivity to floating-point reordering).
"""
from __future__ import annotations

import math
from typing import Optional

Z_ACCURACY = 2.0
PPL_REL_DEFAULT = 0.03


def accuracy_band(reference_percent: float, n: int, z: float = Z_ACCURACY) -> float:
    """Half-width of the accepted band, in percentage points."""
    p = min(max(reference_percent / 100.0, 0.0), 1.0)
    # At p = 0 or 1 the binomial error vanishes; one example's worth keeps the band non-degenerate.
    stderr = max(math.sqrt(p * (1 - p) / n), 1.0 / n)
    return 100.0 * z * stderr


def perplexity_band(reference: float, rel: float) -> float:
    return abs(reference) * rel


def band(kind: str, reference: float, *, n: Optional[int] = None, ppl_rel: float = PPL_REL_DEFAULT,
         override: Optional[dict] = None) -> float:
    """Absolute half-width for one cell, after any override (`abs`, `rel`, or `z`)."""
    override = override or {}
    if "abs" in override:
        return float(override["abs"])
    if kind == "perplexity":
        return perplexity_band(reference, float(override.get("rel", ppl_rel)))
    if kind == "structure":  # shapes and parameter counts are exact unless the metric says otherwise
        return abs(reference) * float(override.get("rel", 0.0))
    if kind == "accuracy":
        if "rel" in override:
            return abs(reference) * float(override["rel"])
        return accuracy_band(reference, int(n), float(override.get("z", Z_ACCURACY)))
    raise ValueError(f"unknown metric kind {kind!r}")
