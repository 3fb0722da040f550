"""Self-distillation data for drafters: the target's own continuations of a prompt set.

Speculative decoding accepts what the target would have said, so a drafter learns best from text
the target wrote itself. Prompts are cut from the Python standard library (split by file: the
held-out files give the evaluation set; Spec-Bench is a test set and never used), made as chat
requests (train/instructions.py) for a target with a chat template, or read from a user's JSONL
file; the target continues them in batches, half greedily and half sampled.

Rows are (S, T) long tensors right-padded with PAD (-1): chat answers end at the target's EOS, so
rows differ in length. Right padding keeps every real token's position and causal context as they
are when the target serves; losses skip the padding.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from outrider.models import eos_ids_of
from outrider.sampling import SamplingParams
from outrider.train.config import TrainSettings
from outrider.train.rowgen import RowWriter


PAD = -1  # row padding; never a token id


def _read_prompts_file(path: str) -> list[str]:
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path}: line {lineno} needs a non-empty 'prompt' or 'text'")
        rows.append(text)
    return rows


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """One user turn through the tokenizer's chat template, the assistant's turn opened."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def uses_chat(tokenizer: Any, recipe: Any) -> bool:
    """recipe.chat None: chat when the target's tokenizer has a chat template (an instruction model)."""
    return bool(getattr(tokenizer, "chat_template", None)) if recipe.chat is None else recipe.chat


def prompt_windows(tokenizer: Any, recipe: Any, heldout: bool, n: int, seed: int,
                   target: Any = None, skip: int = 0) -> list[list[int]]:
    """Prompts skip..n-1 of a set of n: chat requests (at most prompt_len tokens each; see
    `chat_requests`) for an instruction model; else random prompt_len-token windows of stdlib files
    (train or held-out split); or the user's prompts (the last `heldout_prompts` of the file are
    held out), through the chat template when chatting. Made prompts are drawn afresh from `seed`
    (n - skip of them): a run extending its data passes a new seed; a file's are its rows."""
    chat = uses_chat(tokenizer, recipe)
    if recipe.prompts_file is not None:
        texts = _read_prompts_file(recipe.prompts_file)
        cut = len(texts) - min(recipe.heldout_prompts, len(texts) // 5)
        texts = (texts[cut:] if heldout else texts[:cut])[skip:n]
        return [(chat_prompt_ids(tokenizer, t) if chat else list(tokenizer(t)["input_ids"]))[: recipe.prompt_len]
                for t in texts]
    n -= skip
    if chat:
        return chat_requests(tokenizer, recipe, heldout, n, seed, target)
    from outrider.train.corpus import split_files
    from outrider.train.data import tokenize_files

    split = split_files()
    files = split.heldout if heldout else split.train
    stream = tokenize_files(tokenizer, files)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - recipe.prompt_len - 1, size=n)
    return [stream[s : s + recipe.prompt_len].astype(np.int64).tolist() for s in starts]


def chat_requests(tokenizer: Any, recipe: Any, heldout: bool, n: int, seed: int, target: Any = None) -> list[list[int]]:
    """n chat prompts of at most recipe.prompt_len tokens: a `self_requests` share written by the
    target itself (train/selfrequests.py; when a target is given), a `long_requests` share carrying
    a long passage (those that fit prompt_len), the rest from the offline templates
    (train/instructions.py), in a seeded order. The held-out set uses another seed
    stream (and the templates' held-out stdlib files)."""
    from outrider.train.instructions import make_instructions

    def fitting(texts: list[str]) -> list[list[int]]:
        return [ids for ids in (chat_prompt_ids(tokenizer, t) for t in texts) if len(ids) <= recipe.prompt_len]

    own: list[list[int]] = []
    wanted = round(n * recipe.self_requests) if target is not None else 0
    if wanted:
        from outrider.train.selfrequests import target_requests

        own = fitting(target_requests(target, tokenizer, wanted, 2 * seed + int(heldout),
                                      eos_ids_of(target, tokenizer), batch=recipe.gen_batch))
    long: list[list[int]] = []
    wanted_long = round(n * recipe.long_requests)
    if wanted_long:
        from outrider.train.instructions import make_long_instructions

        long = fitting(make_long_instructions(2 * wanted_long, heldout, seed))[:wanted_long]
    rest = n - len(own) - len(long)
    rows = own + long + fitting(make_instructions(2 * rest, heldout, seed))[:rest]
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


@torch.inference_mode()
def self_distill(model: Any, prompts: list[list[int]], gen_len: int, batch: int, seed: int,
                 eos: tuple[int, ...] = ()) -> torch.Tensor:
    """The target's continuations: (S, T) long, right-padded with PAD. Even batches are greedy, odd
    ones sampled at temperature 0.8 (the head should also see text off the greedy path). With `eos`
    an answer ends at its first EOS (kept); without, every row gets gen_len new tokens."""
    rows: list[list[int]] = []
    torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    write = RowWriter(model, max((len(p) for p in prompts), default=0) + gen_len)
    starts = range(0, len(order), batch)
    for b, i in enumerate(tqdm(starts, desc="self-distilling", unit="batch", disable=len(starts) < 4)):
        group = [prompts[j] for j in order[i : i + batch]]
        params = SamplingParams(temperature=0.0 if b % 2 == 0 else 0.8)
        rows += [p + new for p, new in zip(group, write(group, gen_len, params, seed + b, eos))]
    T = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (T - len(r)) for r in rows], dtype=torch.long)


def answer_starts(prompts: list[list[int]]) -> torch.Tensor:
    """(S,) long: where each row of `self_distill(prompts)` begins the target's answer (its prompt's
    length), in the rows' order (self_distill sorts them by prompt length, stably)."""
    return torch.tensor(sorted(len(p) for p in prompts), dtype=torch.long)


def chat_answer_starts(rows: torch.Tensor, tokenizer: Any) -> torch.Tensor | None:
    """(S,) long: for rows of one chat request and its answer, where the answer begins: just after
    the template's cue that opens the assistant's turn (found by rendering a turn with and without
    it). None when the template has no such cue. For data saved before the starts were kept."""
    turn = [{"role": "user", "content": "x"}]
    cued = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    if not cued.startswith(plain) or len(cued) == len(plain):
        return None
    cue = tokenizer(cued[len(plain):], add_special_tokens=False)["input_ids"]
    starts = []
    for row in rows.tolist():
        at = next((i + len(cue) for i in range(len(row) - len(cue) + 1) if row[i : i + len(cue)] == cue), 0)
        starts.append(at)
    return torch.tensor(starts, dtype=torch.long)


def scored(batch: torch.Tensor, ahead: int, length: int) -> torch.Tensor:
    """(B, length) bool: position j has a real (unpadded) token at j + ahead to learn, for rows
    (B, T) right-padded with PAD. Losses and metrics weight by it, so padding never counts."""
    real = batch[:, ahead:] >= 0
    pad = torch.zeros(batch.shape[0], max(0, length - real.shape[1]), dtype=torch.bool, device=batch.device)
    return torch.cat([real, pad], dim=1)[:, :length]


def frequent_tokens(sequences: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """d2t: the n most frequent token ids in the sequences (ties: lower id first), ascending."""
    flat = sequences.flatten()
    counts = torch.bincount(flat[flat >= 0], minlength=vocab).double()
    counts -= torch.arange(vocab, dtype=torch.float64) * 1e-9  # stable tie-break
    return torch.topk(counts, min(n, vocab)).indices.sort().values


class RowSampler:
    """Seeded random rows of a (S, L) tensor: the loop's sampler interface (generator, batch_size,
    next_batch) over whole self-distilled sequences."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        pick = torch.randint(0, self.rows.shape[0], (self.batch_size,), generator=self.generator)
        return self.rows[pick]


GEN_CHUNK_BATCHES = 4  # generation batches per saved chunk: a stopped run loses at most one chunk


def load_or_generate(target: Any, tokenizer: Any, recipe: Any, path: Path) -> dict[str, Any]:
    """{"train": (S, L), "heldout": (S', L'), "train_starts", "heldout_starts", "generate_s"} (the
    starts: where each row's answer begins): read from `path` when
    an earlier run saved it there (a resumed run trains on the same data), else generated. Rows are
    generated and saved (atomically) in chunks of GEN_CHUNK_BATCHES batches, so a run stopped while
    generating resumes from its last chunk. A rerun asking for more prompts than `path` holds
    generates only the missing ones and appends them: a finished run is extended with data, not
    redone."""
    data = torch.load(path) if path.exists() else None
    eos = eos_ids_of(target, tokenizer) if uses_chat(tokenizer, recipe) else ()
    chunk = GEN_CHUNK_BATCHES * recipe.gen_batch
    while True:
        have = 0 if data is None else int(data["train"].shape[0])
        if data is not None and have >= recipe.prompts:
            return data
        t0 = time.monotonic()
        n = min(recipe.prompts, have + chunk)
        # recipe.seed + 1 is the held-out set's stream; a chunk after `have` rows takes its own.
        seed = recipe.seed if data is None else recipe.seed + 2 + have
        prompts = prompt_windows(tokenizer, recipe, False, n, seed, target, skip=have)
        new_rows = self_distill(target, prompts, recipe.gen_len, recipe.gen_batch, seed, eos)
        if data is None:
            held_prompts = prompt_windows(tokenizer, recipe, True, recipe.heldout_prompts, recipe.seed + 1, target)
            held_rows = self_distill(target, held_prompts, recipe.gen_len, recipe.gen_batch, recipe.seed + 1, eos)
            data = {"train": new_rows, "heldout": held_rows, "generate_s": 0.0,
                    "heldout_starts": answer_starts(held_prompts), "train_starts": answer_starts(prompts)}
        else:
            data["train"] = cat_rows(data["train"], new_rows)
            if "train_starts" in data:  # data saved before they were kept has none (see train/datastore.py)
                data["train_starts"] = torch.cat([data["train_starts"], answer_starts(prompts)])
        data["generate_s"] = float(data["generate_s"]) + time.monotonic() - t0
        tmp = path.with_name(path.name + ".tmp")
        torch.save(data, tmp)
        tmp.replace(path)


def cat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two right-padded (S, T) row sets as one, padded to the longer width."""
    T = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(x, (0, T - x.shape[1]), value=PAD) for x in (a, b)])


@dataclass
class Run:
    """What every drafter recipe starts from: the frozen float32 target, its tokenizer and
    embeddings, the self-distilled data and the reduced vocabulary `d2t` (N,) chosen from it."""

    target: Any
    tokenizer: Any
    embed: torch.Tensor  # (V, D_t)
    data: dict[str, Any]
    d2t: torch.Tensor
    out: Path
    work: Path  # checkpoints and the data cache
    started: float  # time.monotonic() when the run began


def start_run(recipe: Any, device: torch.device) -> Run:
    """Check the recipe, load the target, and load or generate the data (train/eagle.py, medusa.py)."""
    from transformers import AutoTokenizer

    from outrider.models import load_transformers_model, parse_dtype

    recipe.check()
    out = Path(recipe.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    dtype = parse_dtype(recipe.dtype)
    target = load_transformers_model(Path(recipe.target), dtype).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(recipe.target)
    embed = target.get_input_embeddings().weight.detach()
    data = load_or_generate(target, tokenizer, recipe, work / "data.pt")
    if "heldout_starts" not in data and uses_chat(tokenizer, recipe):  # data saved before starts were kept
        starts = chat_answer_starts(data["heldout"], tokenizer)
        if starts is not None:
            data["heldout_starts"] = starts
    # A resumed head keeps the vocabulary it was trained on, even when its data grew since.
    d2t = saved_d2t(work)
    if d2t is None:
        d2t = frequent_tokens(data["train"], recipe.draft_vocab, embed.shape[0])
    return Run(target, tokenizer, embed, data, d2t, out, work, started)


def saved_d2t(work: Path) -> torch.Tensor | None:
    """The reduced vocabulary of the head checkpointed in `work` (train/loop.py), if one is."""
    from outrider.train.checkpoint import load_checkpoint

    for name in ("head.ckpt", "heads.ckpt"):  # EAGLE's, Medusa's
        state = load_checkpoint(work / name)
        if state is not None:
            return state["model"]["d2t"].long()
    return None


def head_settings(recipe: Any, data: dict[str, Any]) -> TrainSettings:
    """Optimiser settings of a head: whole self-distilled rows, a short warm-up, no weight decay."""
    return TrainSettings(seq_len=int(data["train"].shape[1]), batch_size=recipe.batch_size, lr=recipe.lr,
                         warmup_steps=20, weight_decay=0.0, checkpoint_minutes=5.0)
