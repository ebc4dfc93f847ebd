"""kd: logit distillation from --teacher (Minitron): alpha * T^2 * KL(teacher || student) at temperature T,
plus (1 - alpha) * cross-entropy. The teacher is loaded beside the student and sharded like it."""
from __future__ import annotations

from methods.core.errors import UsageError
from training.kinds.base import Extension, Kind


class Distilling(Kind):
    def check_options(self, options) -> None:
        super().check_options(options)
        if not options.teacher:
            raise ValueError(f"kind {self.name} needs --teacher")

    def check_inputs(self, options, config, model_path: str) -> None:
        """Logit distillation compares the two distributions token id by token id, so any two
        architectures may distil into each other as long as the ids mean the same tokens: the same
        vocabulary size and, where both checkpoints carry a tokenizer, the same token for every id
        (Llama-2 and Mistral-7B both have 32000 ids, not the same tokens)."""
        from methods.core.models import checked_path, read_config

        teacher_path = checked_path(options.teacher, "--teacher")
        teacher = read_config(teacher_path, "--teacher")
        if teacher.vocab_size != config.vocab_size:
            raise UsageError(f"the teacher's vocabulary ({teacher.vocab_size} tokens) is not the student's "
                             f"({config.vocab_size}): logit distillation needs the same tokenizer")
        vocabularies = [_vocabulary(path) for path in (model_path, teacher_path)]
        if None not in vocabularies and vocabularies[0] != vocabularies[1]:
            differ = sum(1 for token, index in vocabularies[1].items() if vocabularies[0].get(token) != index)
            raise UsageError(f"the teacher's tokenizer maps {differ} of its {len(vocabularies[1])} tokens to other "
                             "ids than the student's: logit distillation needs the same tokenizer")

    def extension(self, model, options, run) -> Extension:
        from methods.core.models import checked_path

        return Teacher(checked_path(options.teacher, "--teacher"), options.kd_temperature, options.kd_alpha)


class Teacher(Extension):
    """The teacher is loaded once the student is: built like it (empty on a sharded run), sharded like
    it, and only then read, so that each rank holds its own shards of both and no more."""

    def __init__(self, path: str, temperature: float, alpha: float):
        self.path, self.temperature, self.alpha = path, temperature, alpha
        self.teacher = None

    def sharded(self, model, run, shard) -> None:
        from training import loading

        self.teacher = loading.skeleton(self.path, run)
        self.teacher.requires_grad_(False)
        shard(self.teacher, run)
        loading.fill(self.teacher, self.path, run)

    def loss(self, model, ids):
        import torch

        from training.losses import kd_loss

        logits = model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            target = self.teacher(input_ids=ids, use_cache=False).logits
        return kd_loss(logits, target, ids, temperature=self.temperature, alpha=self.alpha)


def _vocabulary(path: str):
    """The checkpoint's token -> id map, or None where it carries no tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError, TypeError, KeyError):
        return None


KIND = Distilling("kd", "distillation from --teacher", takes_teacher=True)
