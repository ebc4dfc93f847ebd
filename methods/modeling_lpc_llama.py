"""Where the Llama per-layer format (`lpc_llama`) used to live; every architecture's format is now
generated from its declaration in methods/modeling_lpc.py. Checkpoints saved before carry their own
copy of the old file and still load, inside the kit and out; this module keeps the old import path."""
from __future__ import annotations

from methods.modeling_lpc import LpcLlamaConfig, LpcLlamaForCausalLM, LpcLlamaModel, register  # noqa: F401
