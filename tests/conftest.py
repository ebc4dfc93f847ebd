"""Shared fixtures: where the golden files are, and small models built in the test."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The golden fixtures live in shared/ beside the checkout (CI lays a copy there too).
GOLDEN = Path(os.environ.get("LPC_GOLDEN", REPO.parent / "shared" / "golden"))

try:  # jobman's tests run in a venv without torch
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
except ImportError:
    torch = None


def golden_path(*parts: str) -> Path:
    path = GOLDEN.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"golden fixture missing: {path} (set LPC_GOLDEN)")
    return path


class MissingGolden(str):
    """A parameter standing in for golden fixtures that are not there; a test given it fails."""


def golden_manifests(pattern: str, folder: str = "expected"):
    """The manifests under the golden folder's `folder` that match `pattern`, sorted."""
    return sorted((GOLDEN / folder).glob(pattern))


def golden_params(cases, pattern: str, folder: str = "expected") -> list:
    """Parameters of a golden test: `cases`, read from the manifests matching `pattern`. Where no
    manifest matches (the fixture folder is missing or incomplete), one case that fails instead:
    an empty parameter set would only be reported as skipped."""
    if golden_manifests(pattern, folder):
        return list(cases)
    return [pytest.param(MissingGolden(f"no golden manifest {pattern} under {GOLDEN / folder} (set LPC_GOLDEN)"),
                         id="golden-fixtures-missing")]


@pytest.fixture(autouse=True)
def _fail_without_golden_fixtures(request):
    callspec = getattr(request.node, "callspec", None)
    for value in callspec.params.values() if callspec else ():
        if isinstance(value, MissingGolden):
            pytest.fail(value)


def tiny_llama(num_kv_heads: int = 2, seed: int = 0, **overrides):
    """A randomly initialised Llama small enough for unit tests (GQA by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                  tie_word_embeddings=False)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# What sets each architecture apart, at a size a unit test affords: Qwen2's q/k/v biases and tied
# embeddings, Qwen3's q/k norms and head_dim 16 != 32 / 4, Mistral's sliding window, Gemma 2's
# offset norms, post-norms, sqrt(hidden) embedding, soft-capping, query_pre_attn_scalar and
# alternating sliding layers, Phi-3's fused projections.
TINY_EXTRA = {"llama": {}, "qwen2": dict(tie_word_embeddings=True), "qwen3": dict(head_dim=16),
              "mistral": dict(sliding_window=5, head_dim=8),
              "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=12, tie_word_embeddings=True),
              "phi3": dict()}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A random tiny model of one declared architecture, every parameter drawn at random (biases and
    norm scales too, so a cut in the wrong place shows in the logits). Qwen3 needs transformers >= 4.51."""
    import torch
    import transformers

    from methods.architectures import ARCHITECTURES as DECLARED

    prefix = DECLARED[arch].prefix
    if not hasattr(transformers, f"{prefix}Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix} (Qwen3 arrived in 4.51)")
    config = getattr(transformers, f"{prefix}Config")(**{**TINY, **TINY_EXTRA[arch], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    offset = DECLARED[arch].norm_offset
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.1 if "norm" in name else 0.15
            param.normal_(0.0, scale)
            if "norm" in name:
                param.add_(1.0 - offset)
    return model


def char_tokenizer(swap=()):
    """A real (fast) tokenizer with one id per character and a BOS in front: token boundaries are
    obvious, so label masks can be checked exactly, and transformers' collator can pad with it.
    `swap`: two characters whose ids trade places (a tokenizer of the same size, not the same tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: 4 + i for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"])})
    if swap:
        first, second = swap
        vocab[first], vocab[second] = vocab[second], vocab[first]
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def one_thread():
    """Tiny models: with two OpenMP threads on a shared CPU every op spin-waits (about 30x slower);
    one thread gives the same numbers well within the tolerances. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest_runs(pattern: str):
    """(model, run name, run entry, the manifest's .npz name or None) for every run of the golden
    manifests matching `pattern` (ShortGPT and Minitron files: dict[model][run])."""
    import json

    for manifest in golden_manifests(pattern):
        data = json.loads(manifest.read_text())
        npz = [name for name in data["files"] if name.endswith(".npz")]
        for model, model_runs in data["results"].items():
            for name, run in model_runs.items():
                yield model, name, run, npz[0] if npz else None


# ----------------------------------------------------------------------------- lpc in a subprocess

def lpc_env(**extra) -> dict:
    """The environment of an `lpc` subprocess: this checkout's code, no hub, one thread."""
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def lpc(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repro.cli", *args], cwd=REPO, env=env or lpc_env(),
                          capture_output=True, text=True, timeout=600, **kwargs)


def kill_lpc_at(args, marker: str, env=None, timeout: int = 300) -> str:
    """Run `lpc` and SIGKILL its whole process group (torchrun's workers too) once `marker` appears
    on its output; return what it printed."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "repro.cli", *args], cwd=REPO, env=env or lpc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if marker in text:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return "".join(seen)
