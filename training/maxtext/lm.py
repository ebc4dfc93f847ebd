"""lm-eval over MaxText parameters (JAX): batched loglikelihood with length buckets, rolling perplexity.

The collection's TPU backend (`orbax_lm`) runs one request at a time and compiles once per task at
its longest length. Here requests are sorted by length, cut into batches, and each batch is
right-padded to the next power of two (at least MIN_BUCKET tokens), so a task compiles a handful of
shapes and every forward carries `batch_size` requests; the log-softmax, the gather of the
continuation's log-probabilities and the greedy check run on the device inside the same jitted
function. Causal attention makes right padding invisible to the real tokens.

Encoding is lm-eval's own (`TemplateLM._encode_pair`), and, like the kit's HF path, no BOS is added
to a request (the collection's backend prepended one: a systematic difference between its GPU and
TPU numbers). `batch_size=1, buckets=False` is the one-request-at-a-time path `make bench` compares against.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Tuple

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from training.maxtext import convert
from training.maxtext import model as mt_model

MIN_BUCKET = 16


def bucket(length: int, limit: int) -> int:
    """The padded length of a batch whose longest request has `length` tokens."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, limit)


class MaxTextLM(TemplateLM):
    def __init__(self, checkpoint: str, batch_size: int = 8, max_length: int = 2048, buckets: bool = True,
                 dtype: str = "float32", model: Optional[mt_model.MaxTextModel] = None, tokenizer=None):
        super().__init__()
        from transformers import AutoTokenizer

        folder = Path(checkpoint)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(folder / convert.HF_SUBDIR))
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.buckets = buckets
        self.model = model or mt_model.load(folder, seqlen=self.max_length, batch=self.batch_size, dtype=dtype)
        self._scores = self._score_fn()
        self.compiled_shapes = set()

    # ------------------------------------------------------------------ lm-eval's tokenizer hooks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: an empty context is conditioned on BOS when the tokenizer has one, else on EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _score_fn(self):
        import jax
        import jax.numpy as jnp

        apply = self.model.apply_fn()

        @jax.jit
        def scores(params, tokens, targets):
            logits = apply(params, tokens, jnp.ones_like(tokens))
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets

        return scores

    def _run(self, rows: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(input tokens, continuation tokens) rows of one batch -> (sum log p, greedy) per row."""
        longest = max(len(inp) for inp, _ in rows)
        width = bucket(longest, self.max_length) if self.buckets else longest
        height = self.batch_size if self.buckets else len(rows)
        tokens = np.zeros((height, width), np.int32)
        targets = np.zeros((height, width), np.int32)
        for i, (inp, cont) in enumerate(rows):
            tokens[i, :len(inp)] = inp
            targets[i, :len(inp) - 1] = inp[1:]
            targets[i, len(inp) - 1] = cont[-1]
        self.compiled_shapes.add(tokens.shape)
        with self.model.mesh:
            picked, greedy = self._scores(self.model.params, tokens, targets)
        picked, greedy = np.asarray(picked), np.asarray(greedy)
        out = []
        for i, (inp, cont) in enumerate(rows):
            span = slice(len(inp) - len(cont), len(inp))
            out.append((float(picked[i, span].astype(np.float64).sum()), bool(greedy[i, span].all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], list(continuation)))
        # Longest first, as HFLM: a batch's padding is then its own length's bucket.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, result in zip(chunk, self._run([rows[i] for i in chunk])):
                results[index] = result
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        for request in requests:
            (string,) = request.args
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scored = self._loglikelihood_tokens([(None,) + w for w in windows])
            out.append(sum(logp for logp, _ in scored))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the MaxText backend scores loglikelihoods; generation is not implemented")


class MaxTextEvalModel:
    """A MaxText checkpoint as `lpc eval --backend maxtext` loads it.

    repro/evaluate.py scores perplexities through a model's forward (input_ids in, `.logits` out) and
    accuracies through lm-eval; this object answers the first with MaxText's JAX forward (logits back
    as a CPU torch tensor, so the kit's perplexity arithmetic is the HF path's) and the second with
    `lm_eval_model`, which methods/scoring.py uses instead of wrapping the model in HFLM. The JAX model
    is loaded once and shared by both.
    """

    training = False

    def __init__(self, checkpoint: str, *, dtype: str = "float32"):
        from transformers import AutoConfig, AutoTokenizer

        self.folder = Path(checkpoint)
        hf_dir = self.folder / convert.HF_SUBDIR
        self.config = AutoConfig.from_pretrained(str(hf_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        # lm-eval's HFLM takes its max_length from the model config the same way.
        self.max_length = int(getattr(self.config, "max_position_embeddings", None) or 2048)
        self.mt = mt_model.load(self.folder, seqlen=self.max_length, dtype=dtype)

    def to(self, device) -> "MaxTextEvalModel":
        return self  # JAX places the parameters on its own devices; `device` is a torch setting

    def eval(self) -> "MaxTextEvalModel":
        return self

    def train(self, mode: bool = True) -> "MaxTextEvalModel":
        return self

    def get_input_embeddings(self):
        import torch

        # Only the device is read (where input ids go): the logits come back on the CPU.
        return SimpleNamespace(weight=torch.empty(0))

    def __call__(self, input_ids, use_cache: bool = False, **_):
        import torch

        logits = self.mt.logits(input_ids.cpu().numpy())
        return SimpleNamespace(logits=torch.from_numpy(np.array(logits)))  # a writable copy: torch refuses read-only arrays

    def lm_eval_model(self, *, batch_size: int) -> MaxTextLM:
        return MaxTextLM(str(self.folder), batch_size=batch_size, max_length=self.max_length, model=self.mt,
                         tokenizer=self.tokenizer)


def load_for_eval(checkpoint: str, *, dtype: str = "float32") -> Tuple[MaxTextEvalModel, object]:
    model = MaxTextEvalModel(checkpoint, dtype=dtype)
    return model, model.tokenizer
