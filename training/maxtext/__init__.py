"""The TPU path: MaxText (JAX) conversion, training and evaluation of the kit's checkpoints.

`config` is standard library only (the kit's Python 3.9 side validates with it); the other modules
import MaxText and run in the MaxText environment (Python 3.12: `.venv-maxtext`, the `maxtext` image).
"""
from __future__ import annotations
