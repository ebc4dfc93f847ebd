"""repro.evaluate: the perplexity protocols against direct computations, and lm-eval on the shipped task."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from methods.errors import UsageError
from repro import evaluate
from repro.evaluate import TaskSpec
from tests.conftest import GOLDEN, tiny_llama


def direct_window_ppl(model, stream, seqlen, bos=None):
    """exp(mean over windows of mean NLL), written out with log_softmax in float64."""
    nwin = stream.numel() // seqlen
    means = []
    for w in range(nwin):
        window = stream[w * seqlen:(w + 1) * seqlen]
        if bos is not None:
            window = torch.cat([torch.tensor([bos]), window])
        with torch.no_grad():
            logits = model(window[None], use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        means.append(-logp.gather(1, window[1:, None]).mean().item())
    return math.exp(sum(means) / len(means))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_position_embeddings=128)


@pytest.fixture(scope="module")
def stream():
    torch.manual_seed(1)
    return torch.randint(0, 128, (1, 100))


def test_windows_match_a_direct_computation(model, stream):
    for seqlen in (16, 25, 32):
        assert evaluate.perplexity_windows(model, stream, seqlen) == pytest.approx(
            direct_window_ppl(model, stream[0], seqlen), rel=1e-6)


def test_remainder_is_dropped(model, stream):
    # 100 tokens at 32 -> three windows; the last 4 tokens never count.
    whole = evaluate.perplexity_windows(model, stream, 32)
    assert whole == pytest.approx(evaluate.perplexity_windows(model, stream[:, :96], 32), rel=1e-7)
    changed = stream.clone()
    changed[0, 96:] = (changed[0, 96:] + 1) % 128
    assert evaluate.perplexity_windows(model, changed, 32) == pytest.approx(whole, rel=1e-7)


def test_batching_does_not_change_the_number(model, stream):
    one = evaluate.perplexity_windows(model, stream, 16)
    assert evaluate.perplexity_windows(model, stream, 16, batch_size=4) == pytest.approx(one, rel=1e-5)


def test_bos_per_window(model, stream):
    got = evaluate.perplexity_windows(model, stream, 20, bos_per_window=1)
    assert got == pytest.approx(direct_window_ppl(model, stream[0], 20, bos=1), rel=1e-6)


def test_protocol_wrappers(model):
    torch.manual_seed(2)
    tokens = torch.randint(0, 128, (1, 300))
    assert evaluate.model_seqlen(model) == 128
    assert evaluate.ppl_wanda(model, tokens) == pytest.approx(evaluate.perplexity_windows(model, tokens, 128))
    assert evaluate.ppl_128(model, tokens) == pytest.approx(evaluate.perplexity_windows(model, tokens, 128))
    assert evaluate.ppl_wanda(model, tokens, 64) == pytest.approx(evaluate.perplexity_windows(model, tokens, 64))


def test_stream_shorter_than_a_window_is_refused(model):
    with pytest.raises(UsageError, match="20 tokens, fewer than one window of 32"):
        evaluate.perplexity_windows(model, torch.zeros(1, 20, dtype=torch.long), 32)


@pytest.mark.parametrize("tokens,seqlen,pattern", [
    (torch.zeros(2, 40, dtype=torch.long), 8, r"\[1, N\]"),
    (torch.zeros(40, dtype=torch.long), 8, r"\[1, N\]"),
    (torch.zeros(1, 40), 8, "integers"),
    (torch.zeros(1, 40, dtype=torch.long), 1, "seqlen"),
])
def test_bad_inputs(model, tokens, seqlen, pattern):
    with pytest.raises(UsageError, match=pattern):
        evaluate.perplexity_windows(model, tokens, seqlen)


def test_rows_formula(model):
    torch.manual_seed(3)
    rows = torch.randint(0, 128, (3, 17))
    total = 0.0
    for row in rows:
        with torch.no_grad():
            logp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), dim=-1)
        total += -logp.gather(1, row[1:, None]).sum().item()
    assert evaluate.perplexity_rows(model, rows) == pytest.approx(math.exp(total / (3 * 16)), rel=1e-6)


def test_half_precision_logits_are_scored_in_float32(model, stream):
    full = evaluate.perplexity_windows(model, stream, 25)
    half = tiny_llama(max_position_embeddings=128).to(torch.bfloat16)
    assert evaluate.perplexity_windows(half, stream, 25) == pytest.approx(full, rel=2e-2)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_training_mode_is_restored(stream):
    m = tiny_llama(max_position_embeddings=128).train()
    evaluate.perplexity_windows(m, stream, 25)
    assert m.training


def test_golden_dense_ppl():
    manifest = GOLDEN / "fixtures_manifest.json"
    if not manifest.exists():
        pytest.skip(f"golden fixtures not found at {GOLDEN}")
    from transformers import AutoModelForCausalLM

    expected = json.loads(manifest.read_text())["models"]["tiny-llama-mha"]["dense_eval_ppl"]
    golden = AutoModelForCausalLM.from_pretrained(str(GOLDEN / "tiny-llama-mha"), torch_dtype=torch.float32).eval()
    rows = torch.load(GOLDEN / "eval.pt", weights_only=True)
    assert evaluate.perplexity_rows(golden, rows) == pytest.approx(expected, rel=1e-5)
    # Equal-length windows: the window protocol over the flattened rows is the same number.
    assert evaluate.perplexity_windows(golden, rows.reshape(1, -1), rows.shape[1]) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- lm-eval

def task_tokenizer():
    """A word-level fast tokenizer covering the shipped task, adding BOS by default like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for line in (evaluate.SMOKE_TASK_DIR / "lpc_smoke_mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        for text in ["Question: " + doc["question"] + "\nAnswer:"] + doc["choices"]:
            for word in re.findall(r"\w+|[^\w\s]", text):
                vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("lm_eval")
    import lm_eval

    tokenizer = task_tokenizer()
    assert tokenizer("Answer:")["input_ids"][0] == tokenizer.bos_token_id  # so the no-BOS check means something
    lm = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    first_tokens = []
    lm.register_forward_pre_hook(lambda module, args, kwargs: first_tokens.extend(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0])[:, 0].tolist()),
        with_kwargs=True)
    calls = []
    real = lm_eval.simple_evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("num_fewshot"))
        return real(*args, **kwargs)

    specs = [TaskSpec(evaluate.SMOKE_TASK, 0, "acc"), TaskSpec(evaluate.SMOKE_TASK, 0, "acc_norm"),
             TaskSpec(evaluate.SMOKE_TASK, 1, "acc")]
    patch = pytest.MonkeyPatch()
    # Run from elsewhere: the task's relative data file must still be found.
    patch.chdir(tmp_path_factory.mktemp("elsewhere"))
    patch.setattr(lm_eval, "simple_evaluate", counting)
    try:
        results = evaluate.run_tasks(lm, tokenizer, specs, limit=6, seed=1234)
    finally:
        patch.undo()
    return results, calls, first_tokens, tokenizer


def test_smoke_task_runs_through_lm_eval(smoke_run):
    results, calls, _, _ = smoke_run
    zero = results[evaluate.SMOKE_TASK]
    assert zero["metric"] == "acc" and 0.0 <= zero["value"] <= 1.0
    assert zero["n"] == 6 and zero["num_fewshot"] == 0
    assert set(zero["metrics"]) == {"acc", "acc_norm"}
    assert zero["task_version"] is not None
    assert results[f"{evaluate.SMOKE_TASK}@1"]["num_fewshot"] == 1
    assert sorted(calls) == [0, 1]  # acc and acc_norm of the 0-shot task came from one run
    harness = results["harness"]
    assert harness["lm_eval"] and harness["add_bos_token"] is False
    assert evaluate.SMOKE_TASK in harness["task_versions"]
    assert evaluate.cell_value(results, TaskSpec(evaluate.SMOKE_TASK, 0, "acc_norm")) == zero["metrics"]["acc_norm"]["value"]


def test_contexts_get_no_bos(smoke_run):
    _, _, first_tokens, tokenizer = smoke_run
    assert first_tokens and tokenizer.bos_token_id not in first_tokens


def test_unknown_task_and_metric(smoke_run):
    results, _, _, _ = smoke_run
    with pytest.raises(UsageError, match="no metric 'f1'"):
        evaluate.cell_value(results, TaskSpec(evaluate.SMOKE_TASK, 0, "f1"))
    with pytest.raises(UsageError, match="unknown lm-eval task.*no_such_task_xyz"):
        evaluate.run_tasks(None, None, [TaskSpec("no_such_task_xyz")])
