"""The target's own answers as a datastore (drafters/datastore.py) for the suffix drafter.

Self-distillation (train/selfdistill.py) has the target answer thousands of requests to train a
head; those answers are also what the target tends to say, so `outrider train drafter` keeps them
beside the head (`datastore.npy`), and `outrider train datastore` gathers the answers of several
runs into one file; `--method suffix --datastore FILE_OR_HEAD_DIR` drafts from either.
Only answers go in, never prompts: the prompts are made by templates or by the target playing the
user, and the request's own prompt is already in the request trie at decode time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from outrider.drafters.datastore import DATASTORE_NAME, Datastore


def train_answers(data: dict[str, Any], tokenizer: Any, chat: bool, prompt_len: int) -> list[list[int]]:
    """The answer of each training row of self-distillation data (load_or_generate's dict): the
    tokens after its prompt, padding dropped. Data saved before "train_starts" was kept finds the
    answer after the chat template's assistant cue, or after the prompt_len-token code window."""
    from outrider.train.selfdistill import chat_answer_starts

    rows = data["train"]
    starts = data.get("train_starts")
    if starts is None and chat:
        starts = chat_answer_starts(rows, tokenizer)
    if starts is None:
        starts = torch.full((rows.shape[0],), prompt_len, dtype=torch.long)
    answers = []
    for row, start in zip(rows.tolist(), starts.tolist()):
        answer = [t for t in row[start:] if t >= 0]
        if answer:
            answers.append(answer)
    return answers


def within_budget(answers: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first answers whose tokens add up to at most max_tokens (None: all): a file's size budget
    (2 bytes a token). Whole answers only, so no draft ends where a cut answer would have."""
    if max_tokens is None:
        return answers
    kept, total = [], 0
    for answer in answers:
        if total + len(answer) > max_tokens:
            break
        kept.append(answer)
        total += len(answer)
    return kept


def write_datastore(path: Path, answers: list[list[int]]) -> int:
    """The answers as a datastore file at `path`; returns its token count."""
    store = Datastore.from_sequences(answers)
    store.save(path)
    return len(store)


def build_parser(parser: Any) -> Any:
    parser.add_argument("--target", required=True, help="the target model folder the runs distilled")
    parser.add_argument("--runs", nargs="+", required=True,
                        help="`outrider train drafter --out` folders: their work/data.pt answers go in")
    parser.add_argument("--out", required=True, help=f"the datastore file to write (or a folder: {DATASTORE_NAME} in it)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="the runs' rows are chat requests (default: when the target has a chat template)")
    parser.add_argument("--prompt-len", type=int, default=48, help="code runs: the prompt window the runs used")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="keep the runs' first answers up to this many tokens (2 bytes each; default: all)")
    return parser


def run_from_args(args: Any) -> int:
    from transformers import AutoTokenizer

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} is invalid: use a token count >= 1, or leave it out for all")
    paths = [Path(r) / "work" / "data.pt" for r in args.runs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no self-distillation data at {', '.join(missing)}: pass folders written by "
                         "`outrider train drafter --out DIR` (their data is in DIR/work/data.pt)")
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    chat = bool(getattr(tokenizer, "chat_template", None)) if args.chat is None else args.chat
    answers: list[list[int]] = []
    for path in paths:
        answers += train_answers(torch.load(path), tokenizer, chat, args.prompt_len)
        if args.max_tokens is not None and sum(map(len, answers)) > args.max_tokens:
            break  # the budget is full: later runs' answers would all be dropped, so none is read
    answers = within_budget(answers, args.max_tokens)
    out = Path(args.out)
    if out.is_dir():
        out = out / DATASTORE_NAME
    tokens = write_datastore(out, answers)
    print(f"{out}: {len(answers)} answers, {tokens} tokens, from {', '.join(args.runs)}")
    return 0
