"""methods.scoring: the perplexity protocols against direct computations, and lm-eval on the shipped
task; repro.evaluate: a table's metrics read off a model."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from methods import scoring
from methods.core.errors import UsageError
from methods.scoring import TaskSpec, perplexity
from repro import evaluate
from tests.conftest import golden_path, tiny_llama


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


def direct_row_nll(model, row):
    """-log p of tokens 1..L-1 of one row fed alone, in float64."""
    with torch.no_grad():
        logp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), dim=-1)
    return -logp.gather(1, row[1:, None])[:, 0]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(max_position_embeddings=128)


@pytest.fixture(scope="module")
def stream():
    torch.manual_seed(1)
    return torch.randint(0, 128, (1, 100))


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(3)
    return torch.randint(0, 128, (3, 17))


def test_windows_match_a_direct_computation(model, stream):
    for seqlen in (16, 25, 32):
        assert perplexity(model, stream, "windows", seqlen=seqlen) == pytest.approx(
            direct_window_ppl(model, stream[0], seqlen), rel=1e-6)


def test_windows_is_the_default_protocol(model, stream):
    assert perplexity(model, stream, seqlen=25) == perplexity(model, stream, "windows", seqlen=25)


def test_remainder_is_dropped(model, stream):
    # 100 tokens at 32 -> three windows; the last 4 tokens never count.
    whole = perplexity(model, stream, seqlen=32)
    assert whole == pytest.approx(perplexity(model, stream[:, :96], seqlen=32), rel=1e-7)
    changed = stream.clone()
    changed[0, 96:] = (changed[0, 96:] + 1) % 128
    assert perplexity(model, changed, seqlen=32) == pytest.approx(whole, rel=1e-7)


def test_batching_does_not_change_the_number(model, stream):
    one = perplexity(model, stream, seqlen=16)
    assert perplexity(model, stream, seqlen=16, batch_size=4) == pytest.approx(one, rel=1e-5)


def test_bos_per_window(model, stream):
    got = perplexity(model, stream, seqlen=20, bos_per_window=1)
    assert got == pytest.approx(direct_window_ppl(model, stream[0], 20, bos=1), rel=1e-6)


def test_model_seqlen_is_the_context_capped_at_8192(model):
    assert evaluate.model_seqlen(model) == 128
    big = tiny_llama(max_position_embeddings=131072)
    assert evaluate.model_seqlen(big) == 8192


def test_stream_shorter_than_a_window_is_refused(model):
    with pytest.raises(UsageError, match="20 tokens, fewer than one window of 32"):
        perplexity(model, torch.zeros(1, 20, dtype=torch.long), seqlen=32)


@pytest.mark.parametrize("tokens,protocol,kwargs,pattern", [
    (torch.zeros(2, 40, dtype=torch.long), "windows", {"seqlen": 8}, r"\[1, N\]"),
    (torch.zeros(40, dtype=torch.long), "windows", {"seqlen": 8}, r"\[1, N\]"),
    (torch.zeros(1, 40), "windows", {"seqlen": 8}, "integers"),
    (torch.zeros(1, 40, dtype=torch.long), "windows", {"seqlen": 1}, "seqlen"),
    (torch.zeros(1, 40, dtype=torch.long), "windows", {}, "seqlen must be an integer"),
    (torch.zeros(1, 40, dtype=torch.long), "windows", {"seqlen": 8, "batch_size": 0}, "batch_size"),
    (torch.zeros(1, 40, dtype=torch.long), "bpc", {}, "protocol must be one of windows, rows, minitron"),
    (torch.zeros(40, dtype=torch.long), "rows", {}, r"\[n, L\]"),
    (torch.zeros(3, 1, dtype=torch.long), "minitron", {}, r"\[n, L\] token tensor with L >= 2"),
    (torch.zeros(3, 8), "rows", {}, "integers"),
    (torch.zeros(3, 8, dtype=torch.long), "rows", {"seqlen": 8}, "seqlen applies to the windows protocol only"),
    (torch.zeros(3, 8, dtype=torch.long), "minitron", {"batch_size": 2}, "batch_size applies"),
    (torch.zeros(3, 8, dtype=torch.long), "rows", {"bos_per_window": 1}, "bos_per_window applies"),
])
def test_bad_inputs(model, tokens, protocol, kwargs, pattern):
    with pytest.raises(UsageError, match=pattern):
        perplexity(model, tokens, protocol, **kwargs)


def test_rows_formula(model, rows):
    nll = torch.cat([direct_row_nll(model, row) for row in rows])
    assert nll.numel() == 3 * 16
    assert perplexity(model, rows, "rows") == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)


def test_minitron_weights_each_row_mean_by_its_length_and_has_float32_precision(model, rows):
    means = [direct_row_nll(model, row).mean().item() for row in rows]
    want = math.exp(sum(m * 17 for m in means) / (3 * 17))
    got = perplexity(model, rows, "minitron")
    assert got == pytest.approx(want, rel=1e-6)
    # The exponential is taken in float32, as the collection did: the value is a float32 number.
    assert got == torch.tensor(got, dtype=torch.float32).item()


def test_equal_rows_make_every_protocol_agree_up_to_rounding(model, rows):
    rows_ppl = perplexity(model, rows, "rows")
    assert perplexity(model, rows, "minitron") == pytest.approx(rows_ppl, rel=1e-6)
    assert perplexity(model, rows.reshape(1, -1), seqlen=rows.shape[1]) == pytest.approx(rows_ppl, rel=1e-6)


def test_half_precision_logits_are_scored_in_float32(model, stream):
    full = perplexity(model, stream, seqlen=25)
    half = tiny_llama(max_position_embeddings=128).to(torch.bfloat16)
    assert perplexity(half, stream, seqlen=25) == pytest.approx(full, rel=2e-2)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("protocol", scoring.PROTOCOLS)
def test_training_mode_is_restored(stream, protocol):
    m = tiny_llama(max_position_embeddings=128).train()
    tokens = stream if protocol == "windows" else stream[:, :50].reshape(2, 25)
    kwargs = {"seqlen": 25} if protocol == "windows" else {}
    ppl = perplexity(m, tokens, protocol, **kwargs)
    assert m.training
    # the number does not depend on the mode the model came in
    assert ppl == perplexity(m.eval(), tokens, protocol, **kwargs)


def test_golden_dense_ppl():
    from transformers import AutoModelForCausalLM

    manifest = golden_path("fixtures_manifest.json")
    expected = json.loads(manifest.read_text())["models"]["tiny-llama-mha"]["dense_eval_ppl"]
    golden = AutoModelForCausalLM.from_pretrained(str(golden_path("tiny-llama-mha")), torch_dtype=torch.float32).eval()
    rows = torch.load(golden_path("eval.pt"), weights_only=True)
    assert perplexity(golden, rows, "rows") == pytest.approx(expected, rel=1e-5)
    # Equal-length windows: the window protocol over the flattened rows is the same number.
    assert perplexity(golden, rows.reshape(1, -1), seqlen=rows.shape[1]) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- lm-eval

def task_tokenizer():
    """A word-level fast tokenizer covering the shipped task, adding BOS by default like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for line in (scoring.SMOKE_TASK_DIR / "lpc_smoke_mc.jsonl").read_text().splitlines():
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

    specs = [TaskSpec(scoring.SMOKE_TASK, 0, "acc"), TaskSpec(scoring.SMOKE_TASK, 0, "acc_norm"),
             TaskSpec(scoring.SMOKE_TASK, 1, "acc")]
    patch = pytest.MonkeyPatch()
    # Run from elsewhere: the task's relative data file must still be found.
    patch.chdir(tmp_path_factory.mktemp("elsewhere"))
    patch.setattr(lm_eval, "simple_evaluate", counting)
    try:
        results = scoring.run_tasks(lm, tokenizer, specs, limit=6, seed=1234)
    finally:
        patch.undo()
    return results, calls, first_tokens, tokenizer


def test_smoke_task_runs_through_lm_eval(smoke_run):
    results, calls, _, _ = smoke_run
    zero = results[scoring.SMOKE_TASK]
    assert zero["metric"] == "acc" and 0.0 <= zero["value"] <= 1.0
    assert zero["n"] == 6 and zero["num_fewshot"] == 0
    assert set(zero["metrics"]) == {"acc", "acc_norm"}
    assert zero["task_version"] is not None
    assert results[f"{scoring.SMOKE_TASK}@1"]["num_fewshot"] == 1
    assert sorted(calls) == [0, 1]  # acc and acc_norm of the 0-shot task came from one run
    harness = results["harness"]
    assert harness["lm_eval"] and harness["add_bos_token"] is False
    assert scoring.SMOKE_TASK in harness["task_versions"]
    assert scoring.cell_value(results, TaskSpec(scoring.SMOKE_TASK, 0, "acc_norm")) == zero["metrics"]["acc_norm"]["value"]


def test_contexts_get_no_bos(smoke_run):
    _, _, first_tokens, tokenizer = smoke_run
    assert first_tokens and tokenizer.bos_token_id not in first_tokens


def test_unknown_task_and_metric(smoke_run):
    results, _, _, _ = smoke_run
    with pytest.raises(UsageError, match="no metric 'f1'"):
        scoring.cell_value(results, TaskSpec(scoring.SMOKE_TASK, 0, "f1"))
    with pytest.raises(UsageError, match="unknown lm-eval task.*no_such_task_xyz"):
        scoring.run_tasks(None, None, [TaskSpec("no_such_task_xyz")])
