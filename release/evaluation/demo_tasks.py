"""The demo's evaluation tasks: next-line questions over the tiny model's held-out code.

The demo model is trained on Python standard-library modules (`release/tiny.py`), so the
questions it can be scored on are about code it never saw: given the lines before, which line
comes next (multiple choice, scored by log-likelihood), and how a line half written goes on
(generated, exact match). They are written from the corpus' held-out split, deterministically, into
`release/data/eval/` as JSON beside the lm-eval task YAMLs that read them; a test checks the
shipped files equal what this module writes. The tiny model's scores say nothing about
quality: they exercise the path from lm-eval through vLLM to the cards.

    python -m release.evaluation.demo_tasks   # rewrite release/data/eval/*.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..tiny import corpus_texts

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "eval"
MC_FILE, GEN_FILE = "demo_next_line_mc.json", "demo_rest_of_line.json"
CONTEXT_LINES = 6
MIN_CHARS = 8  # a line shorter than this (blank, ")", "else:") is too easy or too ambiguous
MC_ITEMS, GEN_ITEMS, CHOICES = 40, 24, 4
SEED = 0


def _candidates(texts: list[str]) -> list[tuple[int, int]]:
    """(text, line) of every line worth asking about: long enough, with enough lines before."""
    out = []
    for t, text in enumerate(texts):
        lines = text.split("\n")[:-1]  # the last line of a 2,000-character cut may be cut too
        for i in range(CONTEXT_LINES, len(lines)):
            if len(lines[i].strip()) >= MIN_CHARS:
                out.append((t, i))
    return out


def _context(lines: list[str], i: int) -> str:
    return "\n".join(lines[i - CONTEXT_LINES : i]) + "\n"


def _cut(line: str) -> int:
    """Where a line is cut for the generation task: after the last space before its middle
    (so the model completes whole words), or at the middle."""
    half = len(line) // 2
    space = line.rfind(" ", len(line) - len(line.lstrip()) + 1, half + 1)
    return space + 1 if space > 0 else half


def build() -> dict[str, list[dict]]:
    """The two tasks' documents, the same on every run."""
    texts = corpus_texts()[1]
    split = [t.split("\n") for t in texts]
    rng = random.Random(SEED)
    cands = _candidates(texts)
    picked = rng.sample(cands, MC_ITEMS + GEN_ITEMS)
    pool = sorted({split[t][i] for t, i in cands})
    mc = []
    for t, i in picked[:MC_ITEMS]:
        answer = split[t][i]
        others = rng.sample([line for line in pool if line != answer], CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices = others[:gold] + [answer] + others[gold:]
        mc.append({"context": _context(split[t], i), "choices": choices, "gold": gold})
    gen = []
    for t, i in picked[MC_ITEMS:]:
        line = split[t][i]
        cut = _cut(line)
        gen.append({"context": _context(split[t], i) + line[:cut], "answer": line[cut:]})
    return {MC_FILE: mc, GEN_FILE: gen}


def render() -> dict[str, str]:
    return {name: json.dumps(docs, indent=1, ensure_ascii=False) + "\n" for name, docs in build().items()}


def main() -> None:
    for name, text in render().items():
        (TASK_DIR / name).write_text(text)
        print(f"wrote {TASK_DIR / name}")


if __name__ == "__main__":
    main()
