"""Bench questions: Spec-Bench JSONL files and a built-in code-completion set, and the prompts
built from them.

A *question* has one or more *turns* (user messages). Turn t's prompt holds turns 0..t and the
model's own answers to turns 0..t-1 (Spec-Bench's multi-turn protocol), rendered with the
tokenizer's chat template when it has one, else a plain "User: ... / Assistant: ..." template.
Questions marked `raw` (code completion) are fed as plain text with no template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]
    raw: bool = False  # True: a completion prompt fed as is (no chat template)


CODE_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):\n",
    "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "def flatten(nested):\n    \"\"\"Flatten a list of lists into one list.\"\"\"\n",
    "import json\n\n\ndef load_json(path):\n",
    "def word_count(text):\n    counts = {}\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n",
    "def parse_args(argv=None):\n    import argparse\n\n    parser = argparse.ArgumentParser()\n",
)


def builtin_code() -> list[Question]:
    """The default set: short Python completion prompts (category "code")."""
    return [Question(f"code-{i:02d}", "code", (p,), raw=True) for i, p in enumerate(CODE_PROMPTS)]


def load_spec_bench(path: str | Path) -> list[Question]:
    """Read a Spec-Bench question.jsonl: one object per line with question_id, category, turns (and
    optionally "raw": true for a one-turn completion prompt fed as is, with no chat template)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset {str(path)!r} does not exist: pass a Spec-Bench question.jsonl")
    out: list[Question] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where} is not a JSON object")
            for name in ("question_id", "category", "turns"):
                if name not in obj:
                    raise ValueError(f"{where}: field {name!r} is missing")
            qid, cat, turns = obj["question_id"], obj["category"], obj["turns"]
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise ValueError(f"{where}: field 'question_id' must be an int or a string, got {qid!r}")
            if not isinstance(cat, str) or not cat:
                raise ValueError(f"{where}: field 'category' must be a non-empty string, got {cat!r}")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
            raw = obj.get("raw", False)
            if not isinstance(raw, bool) or (raw and len(turns) != 1):
                raise ValueError(f"{where}: field 'raw' must be true (for a one-turn prompt) or false, got {raw!r}")
            if str(qid) in seen:
                raise ValueError(f"{where}: field 'question_id' {qid!r} repeats an earlier line")
            seen.add(str(qid))
            out.append(Question(str(qid), cat, tuple(turns), raw=raw))
    if not out:
        raise ValueError(f"dataset {str(path)!r} holds no questions")
    return out


def select(questions: Sequence[Question], categories: Sequence[str] | None = None,
           limit_per_category: int | None = None) -> list[Question]:
    """Keep the given categories (all when None), at most limit_per_category of each, file order."""
    if categories:
        known = sorted({q.category for q in questions})
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"categories {unknown} are not in the dataset: use some of {known}")
    if limit_per_category is not None and limit_per_category < 1:
        raise ValueError(f"limit_per_category={limit_per_category} is invalid: use an integer >= 1")
    taken: dict[str, int] = {}
    out = []
    for q in questions:
        if categories and q.category not in categories:
            continue
        if limit_per_category is not None and taken.get(q.category, 0) >= limit_per_category:
            continue
        taken[q.category] = taken.get(q.category, 0) + 1
        out.append(q)
    return out


def render_prompt(tokenizer: Any, question: Question, turn: int, answers: Sequence[str]) -> list[int]:
    """Token ids of turn `turn`'s prompt, given the model's own answers to the earlier turns."""
    assert len(answers) == turn, (len(answers), turn)
    if question.raw:
        assert turn == 0, "raw (completion) questions have one turn"
        return list(tokenizer(question.turns[0])["input_ids"])
    messages = []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": question.turns[t]})
        if t < turn:
            messages.append({"role": "assistant", "content": answers[t]})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(
        f"User: {m['content']}\n" if m["role"] == "user" else f"Assistant: {m['content']}\n" for m in messages
    ) + "Assistant:"
    return list(tokenizer(text)["input_ids"])
