"""What differs between the transformers versions the kit supports (4.43 to 5.x), said once."""
from __future__ import annotations


def dtype_kwarg(dtype) -> dict:
    """`dtype=` on transformers >= 4.56, `torch_dtype=` before (the new name warns on old, and vice versa)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
