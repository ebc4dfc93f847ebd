"""Training after pruning, a layer of its own: `lpc train` is `training.stage.train`, and nothing here
imports the reproduction layer above it (repro/).

    options.py     TrainOptions: what a stage is asked (the common fields; each kind checks its own)
    kinds/         cpt, kd, sparse, lora, sheared: one file each, a registry like the methods'
    sources.py     what --data reads; data.py: the stateful streams of global batches
    engine.py      the loop: FSDP2 under torchrun, the kind's hooks
    checkpoint.py  resumable sharded states and the final Hugging Face export
    lora.py        LoRA's own loop (peft), merged back into the weights
    stage.py       the stage: validate, prepare OUT, relaunch under torchrun, train, write train.json
    maxtext/       the TPU engine: MaxText's trainer and converters

A recipe row asks for a stage with `train: <spec>`, naming one of its profile's `training:` specs.
"""
from __future__ import annotations
