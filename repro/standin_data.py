"""Stand-ins of the paper profiles' hub datasets, each in the file format and schema its real loader parses.

The text is sentences of the shipped public-domain chapters, drawn with a fixed seed; the token data
(DCLM, the converted RedPajama domains, MaxText's ArrayRecord) holds ids of the stand-in tokenizer.
Each writer makes what the kit's loader, or lm-eval's task YAML, reads of the real repository:

    allenai/c4               en/c4-train.00000-of-01024.json.gz (JSON lines: text, timestamp, url)
    Salesforce/wikitext      <config>/<split>-00000-of-00001.parquet (text: WikiText's lines), README configs
    emozilla/pg19            data/<split>-00000-of-00001.parquet (short_book_title, publication_date, url, text)
    bookcorpus, ptb_text_only  the hub's parquet conversion, <config>/<split>/0000.parquet
    Zephyr271828/dclm-260b   rank_<k>.arrow (FMS-FSDP: one input_ids list per record)
    yahma/alpaca-cleaned     alpaca_data_cleaned.json (a JSON list of instruction, input, output)
    lm-eval task datasets    <config>/<split>-00000-of-00001.parquet with the fields the task YAML reads
    local: RedPajama domains one folder per domain of flat token files (for_prune/, eval/)
    local: DCLM ArrayRecord  *.array_record of tf.train.Example with an int64 `text` feature (written
                             where array_record is installed: the MaxText environment)

Each object is written once: an existing folder with its marker is left alone.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

from methods.core.errors import UsageError
from repro.standin_models import complete, write_staged

REDPAJAMA_DOMAINS = ("cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4-rp")
# Rows per split of an lm-eval task: enough training documents for 32 shots, a few to score.
TASK_ROWS = {"train": 40, "validation": 8, "test": 8}


class Text:
    """Sentences of the shipped chapters, drawn reproducibly."""

    def __init__(self, seed: str):
        from methods.core.text import SMOKE_CALIB_TEXT, read_documents

        words = " ".join(read_documents(SMOKE_CALIB_TEXT, paragraphs=False)).split()
        text = " ".join(words)
        self.sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s.strip()) <= 240]
        self.rng = random.Random(zlib.crc32(seed.encode()))

    def sentence(self, short: bool = False) -> str:
        while True:
            pick = self.rng.choice(self.sentences)
            if not short or len(pick) < 80:
                return pick

    def paragraph(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def words(self, count: int) -> str:
        return " ".join(self.sentence().split()[:count]).strip(".,;:!?")

    def tokens(self, count: int) -> List[int]:
        from repro.standin_models import tokenizer

        ids: List[int] = []
        while len(ids) < count:
            ids += tokenizer()(self.paragraph(4), add_special_tokens=False)["input_ids"]
        return ids[:count]


# ----------------------------------------------------------------------------- files

def _parquet(path: Path, rows: List[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _readme(folder: Path, configs: Dict[str, Dict[str, str]]) -> None:
    """A dataset card whose `configs` name each config's files per split, as the hub's cards do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [line for split, pattern in splits.items() for line in (f"  - split: {split}", f"    path: {pattern}")]
    lines += ["---", "", "A stand-in written by `lpc mirror rehearsal` (random text, no real data)."]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _split_files(folder: Path, config: str, rows_of: Callable[[str], List[dict]], splits) -> Dict[str, str]:
    patterns = {}
    for split in splits:
        _parquet(folder / config / f"{split}-00000-of-00001.parquet", rows_of(split))
        patterns[split] = f"{config}/{split}-*"
    return patterns


# ----------------------------------------------------------------------------- hub datasets

def c4(folder: Path, text: Text) -> None:
    from methods.core.text import C4_TRAIN_FILE

    path = folder / C4_TRAIN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(128):
            doc = {"text": "\n".join(text.paragraph(text.rng.randint(1, 3)) for _ in range(text.rng.randint(1, 4))),
                   "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
            handle.write(json.dumps(doc) + "\n")
    _readme(folder, {"en": {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"}})


def wikitext(folder: Path, text: Text) -> None:
    def lines(split: str) -> List[dict]:
        out = []
        for section in range(36 if split != "validation" else 4):
            out += [{"text": ""}, {"text": f" = {text.words(4).title()} = \n"}, {"text": ""}]
            out += [{"text": f" {text.paragraph(text.rng.randint(2, 5))} \n"} for _ in range(2)]
        return out

    configs = {name: _split_files(folder, name, lines, ("test", "train", "validation"))
               for name in ("wikitext-103-v1", "wikitext-2-raw-v1")}
    _readme(folder, configs)


def pg19(folder: Path, text: Text) -> None:
    def books(split: str) -> List[dict]:
        return [{"short_book_title": text.words(3).title(), "publication_date": 1890 + i,
                 "url": f"https://example.org/book/{i}", "text": "\n\n".join(text.paragraph(6) for _ in range(12))}
                for i in range(3)]

    _readme(folder, {"default": _split_files(folder, "data", books, ("test", "train", "validation"))})


def bookcorpus(folder: Path, text: Text) -> None:
    rows = [{"text": (text.paragraph(text.rng.randint(4, 8)) if i % 3 == 0 else text.sentence()).lower()}
            for i in range(192)]
    _parquet(folder / "plain_text" / "train" / "0000.parquet", rows)


def ptb(folder: Path, text: Text) -> None:
    def sentence() -> str:
        words = re.sub(r"[^a-z ]", "", text.sentence().lower()).split()
        return " ".join("<unk>" if len(w) > 9 else ("N" if w.isdigit() else w) for w in words)

    for split, count in (("train", 200), ("validation", 60), ("test", 60)):
        _parquet(folder / "penn_treebank" / split / "0000.parquet", [{"sentence": sentence()} for _ in range(count)])


def dclm(folder: Path, text: Text) -> None:
    from training.data import write_arrow

    data = folder / "data"  # [unverified] the branch's folder name; the loader takes any folder of rank files
    data.mkdir(parents=True, exist_ok=True)
    for rank in range(4):
        write_arrow(data / f"rank_{rank}.arrow", [text.tokens(text.rng.randint(60, 300)) for _ in range(24)])


def alpaca(folder: Path, text: Text) -> None:
    records = [{"instruction": text.sentence(short=True), "input": text.sentence() if i % 2 else "",
                "output": text.paragraph(2)} for i in range(64)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "alpaca_data_cleaned.json").write_text(json.dumps(records, indent=1))
    (folder / "README.md").write_text("A stand-in written by `lpc mirror rehearsal` (random text).\n")


HUB_DATASETS: Dict[str, Callable[[Path, Text], None]] = {
    "allenai/c4": c4, "Salesforce/wikitext": wikitext, "emozilla/pg19": pg19, "bookcorpus": bookcorpus,
    "ptb_text_only": ptb, "Zephyr271828/dclm-260b": dclm, "yahma/alpaca-cleaned": alpaca,
}


# ----------------------------------------------------------------------------- lm-eval task datasets

def _choices(text: Text, count: int, letters: bool = True) -> dict:
    return {"text": [text.words(text.rng.randint(2, 5)) for _ in range(count)],
            "label": list("ABCDE"[:count]) if letters else [str(i + 1) for i in range(count)]}


def _task_row(task: str, text: Text, index: int) -> dict:
    """One document of an lm-eval task, with the fields its task YAML (and process_docs) read."""
    r = text.rng
    if task == "boolq":
        return {"question": text.words(6).lower(), "passage": text.sentence(short=True), "idx": index,
                "label": r.randint(0, 1)}
    if task == "rte":
        return {"sentence1": text.sentence(short=True), "sentence2": text.sentence(short=True), "idx": index,
                "label": r.randint(0, 1)}
    if task == "hellaswag":
        return {"ind": index, "activity_label": text.words(2).title(), "ctx_a": text.sentence(short=True),
                "ctx_b": text.words(3).lower(), "ctx": text.sentence(short=True),
                "endings": [text.words(r.randint(3, 6)) for _ in range(4)], "source_id": f"standin~{index}",
                "split": "val", "split_type": "indomain", "label": str(r.randint(0, 3))}
    if task == "winogrande":
        words = text.words(8).split()
        words.insert(r.randint(1, len(words) - 1), "_")
        return {"sentence": " ".join(words) + ".", "option1": text.words(1), "option2": text.words(1),
                "answer": str(r.randint(1, 2))}
    if task in ("arc_easy", "arc_challenge"):
        choices = _choices(text, 4)
        return {"id": f"standin-{index}", "question": text.sentence(short=True), "choices": choices,
                "answerKey": r.choice(choices["label"])}
    if task == "openbookqa":
        choices = _choices(text, 4)
        return {"id": f"standin-{index}", "question_stem": text.sentence(short=True), "choices": choices,
                "answerKey": r.choice(choices["label"])}
    if task == "piqa":
        return {"goal": text.sentence(short=True), "sol1": text.words(5), "sol2": text.words(5),
                "label": r.randint(0, 1)}
    if task == "sciq":
        return {"question": text.sentence(short=True), "distractor1": text.words(2), "distractor2": text.words(2),
                "distractor3": text.words(2), "correct_answer": text.words(2), "support": text.sentence(short=True)}
    raise UsageError(f"no stand-in writer for lm-eval task {task!r} (add its fields to repro/standin_data.py)")


def task_datasets(out: Path, tasks: List[str]) -> List[str]:
    """Every task's dataset, each repository's configs in one README (ARC's two share allenai/ai2_arc)."""
    from repro.hub_objects import task_config, task_dataset, task_yaml

    per_repo: Dict[str, Dict[str, Dict[str, str]]] = {}
    lines = []
    for task in sorted(tasks):
        repo, name = task_dataset(task)
        config = task_config(task_yaml(task))
        splits = [config[k] for k in ("training_split", "validation_split", "test_split", "fewshot_split")
                  if config.get(k)]
        folder = out / "datasets" / repo
        text = Text(task)
        per_repo.setdefault(repo, {})[name or "default"] = _split_files(
            folder, name or "data", lambda split: [_task_row(task, text, i) for i in range(TASK_ROWS.get(split, 8))],
            dict.fromkeys(splits))
        lines.append(f"data    lm-eval {task}: {folder} ({name or 'default'}: {', '.join(dict.fromkeys(splits))})")
    for repo, configs in per_repo.items():
        _readme(out / "datasets" / repo, configs)
    return lines


# ----------------------------------------------------------------------------- local inputs

def redpajama(folder: Path, text: Text) -> None:
    import numpy as np

    for domain in REDPAJAMA_DOMAINS:
        (folder / domain).mkdir(parents=True, exist_ok=True)
        for part in range(2):
            np.save(folder / domain / f"part-{part:05d}.npy", np.asarray(text.tokens(2048), dtype=np.uint32))


def array_record(folder: Path, text: Text) -> Optional[str]:
    try:
        import array_record  # noqa: F401
    except ImportError:
        return "array_record is not installed here: written by the MaxText environment (make rehearse-minitron-width)"
    import numpy as np

    from training.maxtext.train import write_array_record

    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        write_array_record(np.asarray([text.tokens(256) for _ in range(16)]), folder / f"part-{part:05d}.array_record")
    return None


# ----------------------------------------------------------------------------- all of them

def write_all(out: Path, objects) -> List[str]:
    """Every dataset and local input of `objects` (repro/mirror.py's HubObject), once."""
    lines = []
    for obj in objects:
        if obj.task is not None:
            continue
        folder = out / obj.folder
        if complete(folder):
            lines.append(f"data    {obj.repo}: {folder} (there already)")
            continue
        if obj.kind == "dataset":
            writer = HUB_DATASETS.get(obj.repo)
            if writer is None:
                raise UsageError(f"no stand-in writer for hub dataset {obj.repo} (add one to repro/standin_data.py)")
            skipped = write_staged(folder, lambda f: writer(f, Text(obj.repo)))
        elif obj.repo.startswith("$"):
            skipped = write_staged(folder, lambda f: array_record(f, Text(obj.repo)))
        else:
            skipped = write_staged(folder, lambda f: redpajama(f, Text(obj.repo)))
        lines.append(f"data    {obj.repo}: " + (f"skipped: {skipped}" if skipped else str(folder)))
    return lines + task_datasets(out, sorted({o.task for o in objects if o.task is not None}))
