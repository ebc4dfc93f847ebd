"""Build smoke_instructions.jsonl from the shipped calibration chapters (see README).

Deterministic: run `python methods/core/assets/recovery/make_smoke_instructions.py` from the repository root
and the file comes out byte-identical. Only methods/core/assets/text/calib is read, never eval.txt.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALIB = HERE.parent / "text" / "calib"
OUT = HERE / "smoke_instructions.jsonl"

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before a space
# and a capital letter or an opening quote.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"'(]?[A-Z])")
MAX_WORDS = 60  # keeps prompt + response well inside the 256-token cutoff


def sentences(paragraph: str):
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()]


def usable(sentence: str) -> bool:
    return 4 <= len(sentence.split()) <= MAX_WORDS


def records():
    for path in sorted(CALIB.glob("chapter*.txt")):
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        for number, paragraph in enumerate(paragraphs[1:], start=1):  # paragraph 0 is the chapter title
            every = sentences(paragraph)
            parts = [s for s in every if usable(s)]
            for first, second in zip(every, every[1:]):  # adjacent sentences only
                if usable(first) and usable(second):
                    yield {"instruction": "Continue the passage with its next sentence.", "input": first,
                           "output": second}
            if number % 3 == 0 and parts:
                words = parts[0].split()
                cut = len(words) // 2
                yield {"instruction": "Complete the sentence.", "input": " ".join(words[:cut]),
                       "output": " ".join(words[cut:])}


def main() -> None:
    with open(OUT, "w", encoding="utf-8") as handle:
        for record in records():
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
