"""Training after pruning: one stage, `lpc train --kind cpt|kd|sparse|lora` (repro/stages.py runs it).

* `cpt`, `kd`, `sparse`: continued pre-training, logit distillation and sparse retraining of a Hugging
  Face checkpoint with PyTorch FSDP2 under torchrun (training/engine.py), stateful data
  (training/data.py), resumable sharded checkpoints (training/checkpoint.py), options declared once
  (training/options.py).
* `lora`: LoRA fine-tuning with peft, merged back into the weights (training/lora.py), so the trained
  checkpoint saves and evaluates like any other.

A recipe row asks for a stage with `train: <spec>`, naming one of its profile's `training:` specs.
"""
from __future__ import annotations
