"""repro.data: the samplers against literal re-statements of the upstream loops, token files, assets."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from methods.core.errors import UsageError
from repro import data

WORDS = ("the a river house boat man woman walked rowed looked saw quiet green old new by under over "
         "and then morning evening water bridge garden tree trees . ,").split()


def word_tokenizer():
    """A real fast tokenizer over a small word vocabulary that, like Llama's, prepends BOS by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_document(rng: random.Random, nwords: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(nwords))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture
def corpus_dir(tmp_path):
    """Twelve documents of 3..60 words, so seqlen 16 rejects some and accepts others."""
    rng = random.Random(7)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(12):
        (folder / f"doc{index:02d}.txt").write_text(random_document(rng, rng.randint(3, 60)))
    (folder / "README").write_text("not a document " * 50)
    return folder


# ----------------------------------------------------------------------------- literal re-statements

def c4_reference(docs, tokenizer, nsamples, seqlen, seed):
    """locuslab/wanda lib/data.py get_c4, restated loop for loop."""
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        rows.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(rows, dim=0)


def bookcorpus_reference(docs, tokenizer, nsamples, seqlen, seed):
    """horseee/LLM-Pruner LLMPruner/datasets/example_samples.py get_bookcorpus, restated."""
    random.seed(seed)
    rows, history = [], []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] >= seqlen and i not in history:
                history.append(i)
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen)
        rows.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(rows, dim=0)


def stream_reference(text, tokenizer, nsamples, seqlen, seed):
    """locuslab/wanda lib/data.py get_wikitext2's sampling, restated."""
    enc = tokenizer(text, return_tensors="pt")
    random.seed(seed)
    rows = []
    for _ in range(nsamples):
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        rows.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(rows, dim=0)


# ----------------------------------------------------------------------------- samplers

def test_directory_calibration_follows_the_c4_algorithm(tok, corpus_dir):
    docs = [p.read_text() for p in sorted(corpus_dir.glob("doc*.txt"))]
    for seed in (0, 1, 42):
        got = data.calibration(str(corpus_dir), tokenizer=tok, nsamples=9, seqlen=16, seed=seed)
        assert got.dtype == torch.long and got.shape == (9, 16)
        assert torch.equal(got, c4_reference(docs, tok, 9, 16, seed))


def test_calibration_is_deterministic_per_seed(tok, corpus_dir):
    first = data.calibration(str(corpus_dir), tokenizer=tok, nsamples=6, seqlen=16, seed=3)
    again = data.calibration(str(corpus_dir), tokenizer=tok, nsamples=6, seqlen=16, seed=3)
    other = data.calibration(str(corpus_dir), tokenizer=tok, nsamples=6, seqlen=16, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_single_file_documents_are_paragraphs(tok, tmp_path):
    rng = random.Random(3)
    paragraphs = [random_document(rng, rng.randint(5, 40)) for _ in range(10)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs[:5]) + "\n  \n\n" + "\n\n".join(paragraphs[5:]) + "\n")
    assert data.read_documents(path) == paragraphs
    got = data.calibration(str(path), tokenizer=tok, nsamples=5, seqlen=12, seed=0)
    assert torch.equal(got, c4_reference(paragraphs, tok, 5, 12, 0))


def test_text_stream_uses_the_wikitext2_sampler(tok, corpus_dir):
    docs = [p.read_text() for p in sorted(corpus_dir.glob("doc*.txt"))]
    got = data.calibration(f"text-stream:{corpus_dir}", tokenizer=tok, nsamples=7, seqlen=40, seed=5)
    assert torch.equal(got, stream_reference("\n\n".join(docs), tok, 7, 40, 5))


def test_bookcorpus_sampler_matches_llm_pruner(tok):
    rng = random.Random(11)
    docs = [random_document(rng, rng.randint(2, 30)) for _ in range(40)]
    encode = lambda text: tok(text)["input_ids"]  # noqa: E731
    for seqlen in (8, 20):
        got = data.sample_documents_llmpruner(len(docs), docs.__getitem__, encode, nsamples=6, seqlen=seqlen, seed=42)
        assert torch.equal(got, bookcorpus_reference(docs, tok, 6, seqlen, 42))


def test_bookcorpus_sampler_accepts_exactly_seqlen_tokens_and_never_repeats(tok):
    # Every document is exactly 8 tokens with BOS: accepted at seqlen 8 (>=), each at most once.
    docs = [" ".join([w] * 7) for w in WORDS[:10]]
    encode = lambda text: tok(text)["input_ids"]  # noqa: E731
    rows = data.sample_documents_llmpruner(len(docs), docs.__getitem__, encode, nsamples=10, seqlen=8, seed=0)
    assert rows.shape == (10, 8)
    assert len({tuple(r.tolist()) for r in rows}) == 10
    assert (rows[:, 0] == tok.bos_token_id).all()


def test_corpus_without_a_long_document_is_refused(tok, tmp_path):
    (tmp_path / "a.txt").write_text("the river")
    (tmp_path / "b.txt").write_text("the old bridge by the river")
    with pytest.raises(UsageError, match=r"longest: 7\b"):
        data.calibration(str(tmp_path), tokenizer=tok, nsamples=2, seqlen=7, seed=0)
    # The stream variant concatenates, and then there is enough.
    assert data.calibration(f"text-stream:{tmp_path}", tokenizer=tok, nsamples=2, seqlen=7, seed=0).shape == (2, 7)


def test_text_needs_a_tokenizer(corpus_dir):
    with pytest.raises(UsageError, match="tokenizer"):
        data.calibration(str(corpus_dir), nsamples=1, seqlen=4)


@pytest.mark.parametrize("spec,pattern", [
    ("c5", "unknown data spec 'c5'.*c4, wikitext2, bookcorpus"),
    ("/nonexistent/corpus", "not found"),
    ("missing.txt", "not found"),
    ("text-stream:/nonexistent", "not found"),
])
def test_bad_specs(tok, spec, pattern):
    with pytest.raises(UsageError, match=pattern):
        data.calibration(spec, tokenizer=tok, nsamples=1, seqlen=4)


@pytest.mark.parametrize("nsamples,seqlen", [(0, 4), (2, -1), (1.5, 4), (True, 4)])
def test_bad_sizes(tok, corpus_dir, nsamples, seqlen):
    with pytest.raises(UsageError, match="positive integer"):
        data.calibration(str(corpus_dir), tokenizer=tok, nsamples=nsamples, seqlen=seqlen)


# ----------------------------------------------------------------------------- token files

def test_token_files_pt_and_npy(tmp_path):
    ids = torch.arange(40).reshape(5, 8)
    torch.save(ids.to(torch.int32), tmp_path / "calib.pt")
    np.save(tmp_path / "calib.npy", ids.numpy().astype(np.uint16))
    for name in ("calib.pt", "calib.npy"):
        path = str(tmp_path / name)
        loaded = data.load_token_file(path)
        assert loaded.dtype == torch.long and torch.equal(loaded, ids)
        assert torch.equal(data.calibration(path, nsamples=3, seqlen=8), ids[:3])
        assert torch.equal(data.eval_tokens(path), ids.reshape(1, -1))


@pytest.mark.parametrize("content,pattern", [
    (torch.arange(8), "2-D"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "2-D"),
    (torch.rand(2, 8), "integer"),
    (torch.tensor([[1, -2], [3, 4]]), "negative"),
    ({"ids": torch.zeros(2, 2, dtype=torch.long)}, "one tensor"),
    (torch.zeros(0, 8, dtype=torch.long), "empty"),
])
def test_token_file_validation(tmp_path, content, pattern):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(UsageError, match=pattern):
        data.load_token_file(path)


def test_token_file_npy_float_and_garbage(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(UsageError, match="integer"):
        data.load_token_file(tmp_path / "f.npy")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="cannot load"):
        data.load_token_file(tmp_path / "junk.pt")


def test_token_file_shape_against_request(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(torch.zeros(4, 16, dtype=torch.long), path)
    with pytest.raises(UsageError, match="4 rows, fewer than the 5"):
        data.calibration(str(path), nsamples=5, seqlen=16)
    with pytest.raises(UsageError, match="seqlen 16, but seqlen 32"):
        data.calibration(str(path), nsamples=2, seqlen=32)
    with pytest.raises(UsageError, match="not found"):
        data.calibration(str(tmp_path / "absent.pt"), nsamples=1, seqlen=16)


# ----------------------------------------------------------------------------- evaluation streams

def test_eval_tokens_of_a_directory(tok, corpus_dir):
    docs = [p.read_text() for p in sorted(corpus_dir.glob("doc*.txt"))]
    got = data.eval_tokens(str(corpus_dir), tokenizer=tok)
    expected = tok("\n\n".join(docs))["input_ids"]
    assert got.shape == (1, len(expected)) and got[0].tolist() == expected
    assert (got == tok.bos_token_id).sum() == 1 and got[0, 0] == tok.bos_token_id
    no_bos = data.eval_tokens(str(corpus_dir), tokenizer=tok, add_special_tokens=False)
    assert no_bos[0].tolist() == expected[1:]


# ----------------------------------------------------------------------------- shipped text

def test_shipped_smoke_text():
    calib_files = sorted(data.SMOKE_CALIB_TEXT.glob("*.txt"))
    assert len(calib_files) >= 10
    calib_size = sum(p.stat().st_size for p in calib_files)
    eval_size = data.SMOKE_EVAL_TEXT.stat().st_size
    assert 100_000 <= calib_size + eval_size <= 300_000
    calib_paragraphs = {p for f in calib_files for p in data.read_documents(f) if len(p) > 60}
    eval_paragraphs = {p for p in data.read_documents(data.SMOKE_EVAL_TEXT) if len(p) > 60}
    assert calib_paragraphs and eval_paragraphs and not calib_paragraphs & eval_paragraphs
    readme = (data.SMOKE_CALIB_TEXT.parent / "README").read_text()
    assert re.search(r"public domain", readme, re.IGNORECASE)


def test_smoke_spec_samples_whole_chapters(tok):
    rows = data.calibration("smoke", tokenizer=tok, nsamples=4, seqlen=64, seed=0)
    assert rows.shape == (4, 64)
    assert data.eval_tokens("smoke", tokenizer=tok).shape[1] > 5_000
