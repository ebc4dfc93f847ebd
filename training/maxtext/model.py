"""A converted MaxText checkpoint as a callable: token ids in, logits out (JAX, MaxText's own model).

Used by the logits test and by the lm-eval backend. The model is MaxText's `Transformer` built from
the generated config of the checkpoint directory (training/maxtext/convert.py), its parameters
restored from the Orbax checkpoint with MaxText's conversion reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from training.maxtext import convert


@dataclass
class MaxTextModel:
    config: Any
    model: Any
    params: Any
    mesh: Any
    vocab_size: int
    seqlen: int

    def apply_fn(self):
        """(params, tokens [B, S], segment ids [B, S]) -> fp32 logits [B, S, V], to be jitted by the
        caller with the parameters as an argument: closed over, XLA would fold every weight into the
        program as a constant, making each compile slow and each cached program as large as the model."""
        import jax.numpy as jnp

        from maxtext.common.common_types import MODEL_MODE_TRAIN

        model = self.model

        def apply(params, tokens, segments):
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
            out = model.apply(params, tokens, positions, decoder_segment_ids=segments, enable_dropout=False,
                              model_mode=MODEL_MODE_TRAIN)
            return out.astype(jnp.float32)

        return apply

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """fp32 logits of `tokens`; one compile per shape."""
        import jax

        tokens = np.asarray(tokens, dtype=np.int32)
        if not hasattr(self, "_forward"):
            self._forward = jax.jit(self.apply_fn())
        with self.mesh:
            out = self._forward(self.params, tokens, np.ones_like(tokens))
        return np.asarray(out)


def load(mt_dir: Path, *, seqlen: int, batch: int = 1, dtype: str = "float32",
         extra: Optional[dict] = None) -> MaxTextModel:
    """The MaxText model of `mt_dir` for sequences of up to `seqlen` tokens, parameters in fp32."""
    mt_dir = Path(mt_dir)
    manifest = convert.read_manifest(mt_dir)
    items = convert.params_path(mt_dir, manifest)
    import jax

    from maxtext.checkpoint_conversion.utils.utils import load_orbax_checkpoint
    from maxtext.configs import pyconfig
    from maxtext.models import models
    from maxtext.utils import maxtext_utils

    hf_config = convert.hf_config_object(mt_dir / convert.HF_SUBDIR)
    convert.register(hf_config, mt_dir / convert.HF_SUBDIR)
    overrides = {**manifest["maxtext_model"],
                 **convert.runtime_overrides(scan_layers=manifest["scan_layers"], dtype=dtype, seqlen=seqlen),
                 "model_name": convert.MODEL_NAME, "load_parameters_path": str(items),
                 "per_device_batch_size": batch, **(extra or {})}
    config = pyconfig.initialize(["lpc", convert.base_yml(), *convert.maxtext_args(overrides)])
    mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(config), config.mesh_axes)
    model = models.transformer_as_linen(config, mesh, quant=None)
    restored = load_orbax_checkpoint(config)
    return MaxTextModel(config=config, model=model, params=restored["params"], mesh=mesh,
                        vocab_size=manifest["maxtext_model"]["vocab_size"], seqlen=seqlen)
