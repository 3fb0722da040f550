"""`outrider train drafter --method eagle`: an EAGLE head trained online on the target it serves.

1. Data, by self-distillation: the target's own continuations (batched generation, half greedy,
   half sampled at temperature 0.8) of prompts cut from the Python standard library (split by
   file: held-out files give the evaluation set) or from a user's JSONL file of prompts.
2. The reduced draft vocabulary: the N most frequent tokens of that data (`d2t`).
3. Training, online: each batch runs the frozen target once for its hidden states and logits (no
   feature store), then the head, unrolled `unroll` steps (EAGLE-3's training-time test): step 1
   reads the target's features; step s reads the head's own outputs of step s-1 in place of the
   features, and attends the way drafting does (the true-feature pairs before its chain, then its
   chain). The loss at each step is KL(p || q) on the reduced vocabulary, p the target's
   distribution of the token the pair predicts.
4. Held-out evaluation per unroll step (the acceptance of a greedy chain at that depth, given the
   earlier ones accepted), the head's files, and a report (md + json).
Runs are seeded, checkpointed (train/loop.py) and resumable; `--minutes` bounds training time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from outrider.drafters.datastore import DATASTORE_NAME
from outrider.drafters.eagle import EagleHead, _rope, default_layers, new_head
from outrider.train.config import Budget
from outrider.train.loop import LoopResult, autocast, train
from outrider.train.selfdistill import head_settings, scored, start_run, uses_chat


@dataclass(frozen=True)
class EagleRecipe:
    """Options of one run. Larger data and unroll cost time; a larger draft vocabulary costs every
    draft step (its output layer) but covers more of what the target says."""

    target: str
    out: str
    minutes: float = 60.0  # training time (data generation and evaluation not counted)
    prompts: int = 1536  # training prompts (self-distillation sequences)
    heldout_prompts: int = 64
    prompt_len: int = 48
    gen_len: int = 144
    draft_vocab: int = 2048
    unroll: int = 3  # training-time test steps (draft depths trained on the head's own outputs)
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    prompts_file: str | None = None  # JSONL of {"prompt": ...} or {"text": ...}; None: built in
    gen_batch: int = 64
    chat: bool | None = None  # prompts as chat requests; None: when the target has a chat template
    dtype: str = "float32"  # the target's, for data and features: bfloat16 is ~2x faster on CPU
    cache_gb: float = 4.0  # RAM for the target's features, computed once (over it: per batch, online)
    # The feature cache in files under OUT/work/features/ (memory-mapped; cache_gb is then a disk
    # budget): a stopped run resumes without recomputing it, and it may exceed the RAM.
    cache_on_disk: bool = False
    # Chat targets: the share of requests the target writes itself (Magpie). They are as varied as
    # its tuning data, where the offline templates are not; each costs a short generation.
    self_requests: float = 0.5
    # Chat targets: the share of requests carrying a long passage (summarize, answer from, extract):
    # they need prompt_len ~1024. 0 keeps the short requests alone.
    long_requests: float = 0.0
    # A head folder to start from (warm start): its weights, layers and reduced vocabulary carry
    # over, so a run adds data or training to a head instead of starting over. None: a new head.
    init: str | None = None

    def check(self) -> None:
        for name in ("prompts", "heldout_prompts", "prompt_len", "gen_len", "draft_vocab", "unroll", "batch_size",
                     "gen_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: use a positive learning rate")
        if not self.minutes > 0:
            raise ValueError(f"minutes={self.minutes!r} is invalid: use a positive number of minutes")
        from outrider.models import parse_dtype

        parse_dtype(self.dtype)  # names the bad value before any work
        for name in ("self_requests", "long_requests"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: use a share between 0 and 1")
        if self.self_requests + self.long_requests > 1.0:
            raise ValueError(f"self_requests + long_requests = {self.self_requests + self.long_requests:g} is over 1: "
                             "lower one of them (the rest of the requests come from the templates)")
        if not self.cache_gb >= 0:
            raise ValueError(f"cache_gb={self.cache_gb!r} is invalid: use a number of GB >= 0 (0: no cache)")
        if self.init is not None and not (Path(self.init) / "eagle_config.json").is_file():
            raise ValueError(f"init={self.init!r} is not an EAGLE head folder (no eagle_config.json): pass a "
                             "folder written by `outrider train drafter --method eagle`")


def unroll_mask(T: int, s: int, device: torch.device) -> torch.Tensor:
    """(T, s*T) bool: at unroll step s, pair j sees the true-feature pairs 0..j-s+1 (step 1's keys)
    and then its own chain: step r's key at pair j-s+r for r = 2..s (the last is itself)."""
    j = torch.arange(T, device=device)
    mask = torch.zeros(T, s * T, dtype=torch.bool, device=device)
    mask[:, :T] = torch.arange(T, device=device)[None, :] <= (j - s + 1)[:, None]
    for r in range(2, s + 1):
        col = j - s + r
        ok = col >= 0
        mask[j[ok], (r - 1) * T + col[ok]] = True
    mask[j, (s - 1) * T + j] = True  # itself, always (rows too early for a chain are not scored)
    return mask


def target_pass(target: Any, batch: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target over batch (B, T) right-padded with PAD: hidden states (L, B, T, D_t) of
    `layers` and logits (B, T, V). Padding is fed as token 0: it only follows real tokens, so
    causal attention keeps it out of every real position (losses skip it)."""
    with torch.no_grad():
        out = target(input_ids=batch.clamp(min=0), output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[i] for i in layers])
    return hidden, out.logits


def feature_key(target: Any, rows: torch.Tensor, layers: tuple[int, ...]) -> str:
    """What a stored feature cache was computed from: the target, its layers, the rows."""
    h = hashlib.sha256(rows.cpu().numpy().tobytes())
    h.update(f"{target.config.name_or_path}|{target.config.num_hidden_layers}|{list(layers)}|{tuple(rows.shape)}".encode())
    return h.hexdigest()[:32]


def open_feature_store(store: Path, key: str, L: int, S: int, T: int, D: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The disk feature cache: hidden (L, S, T, D) and final (S, T, D) bf16 tensors mapped from files
    in `store`, and how many rows of them are already computed (0 for a new store, or one computed
    from other rows, a target or layers: then it starts over)."""
    store.mkdir(parents=True, exist_ok=True)
    saved = json.loads((store / "meta.json").read_text()) if (store / "meta.json").is_file() else {}
    done = int(saved["done"]) if saved.get("key") == key else 0
    mark_stored(store, key, done)
    files = (("hidden.bin", (L, S, T, D)), ("final.bin", (S, T, D)))
    need = (L + 1) * S * T * D * 2 - sum((store / n).stat().st_blocks * 512 for n, _ in files if (store / n).is_file())
    free = shutil.disk_usage(store).free
    if need > free:  # a mapped write past a full disk would kill the run with SIGBUS, not an error
        raise ValueError(f"--cache-on-disk needs {need / 1e9:.1f} GB more in {store}, and the disk has "
                         f"{free / 1e9:.1f} GB free: free some, or leave out --cache-on-disk")
    tensors = []
    for name, shape in files:
        with open(store / name, "ab") as f:  # sized sparse: no disk is written until a row is
            f.truncate(math.prod(shape) * 2)
        tensors.append(torch.from_file(str(store / name), shared=True, size=math.prod(shape),
                                       dtype=torch.bfloat16).view(shape))
    return tensors[0], tensors[1], done


def mark_stored(store: Path, key: str, done: int) -> None:
    """Record that the store's first `done` rows are computed (atomically: a reader sees the old
    count or the new). The mapping is the files' page cache, so a killed run keeps those rows."""
    from outrider.bench.runner import write_atomic

    write_atomic(store / "meta.json", json.dumps({"key": key, "done": done}))


class Features:
    """What one loss needs from the target for rows of data: hidden states of the head's layers and
    logits on the reduced vocabulary. Computed once into RAM when they fit `cache_gb` (the target is
    frozen, so every epoch would recompute the same values), else per batch (online). The cache
    keeps the target's final hidden state, not its logits: the reduced logits are one small matmul
    away (final @ W[d2t].T), and a 49k-vocabulary row would be 10x the size."""

    def __init__(self, target: Any, rows: torch.Tensor, layers: tuple[int, ...], d2t: torch.Tensor,
                 cache_gb: float, batch: int = 16, store: Path | None = None) -> None:
        self.target, self.rows, self.layers, self.d2t = target, rows, layers, d2t
        self.out_rows = target.get_output_embeddings().weight.detach()[d2t].float()  # (N, D_t)
        S, T = rows.shape
        self.cached = S * T * (len(layers) + 1) * target.config.hidden_size * 2 / 1e9 <= cache_gb
        if not self.cached:
            return
        L, D = len(layers), target.config.hidden_size
        if store is None:  # bf16: the precision the target serves in; half the RAM of float32
            self.hidden = torch.zeros(L, S, T, D, dtype=torch.bfloat16, device=rows.device)  # (L, S, T, D_t)
            self.final = torch.zeros(S, T, D, dtype=torch.bfloat16, device=rows.device)  # (S, T, D_t)
            done = 0
        else:
            key = feature_key(target, rows, layers)
            self.hidden, self.final, done = open_feature_store(store, key, L, S, T, D)
        for i in range(done, S, batch):
            chunk = rows[i : i + batch]
            n = int((chunk >= 0).sum(1).max())  # the chunk's longest row: skip its padding columns
            h, f = self._states(chunk[:, :n])
            self.hidden[:, i : i + batch, :n] = h.to(self.hidden.device)
            self.final[i : i + batch, :n] = f.to(self.final.device)
            if store is not None:
                mark_stored(store, key, min(i + batch, S))

    def _states(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = self.target.base_model(input_ids=batch.clamp(min=0), output_hidden_states=True, use_cache=False)
        return torch.stack([out.hidden_states[i] for i in self.layers]), out.last_hidden_state

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B, T), hidden (L, B, T, D_t), reduced logits (B, T, N) of row indices (B,)."""
        batch = self.rows[index]
        # Rows are padded to the longest of all; a batch needs only its own longest (less work).
        T = int((batch >= 0).sum(1).max())
        batch = batch[:, :T]
        if self.cached:
            at = index.to(self.final.device)
            hidden = self.hidden[:, at, :T].to(batch.device).float()
            final = self.final[at, :T].to(batch.device).float()
        else:
            hidden, final = self._states(batch)
        return batch, hidden, final.float() @ self.out_rows.T
class LengthGroupedSampler:
    """Seeded batches of row indices (B,) of similar length, the training loop's sampler interface
    over Features: a random window of rows in length order. A batch costs its longest row's width
    (the rest is padding), so mixing 1,000-token rows (long requests) with 300-token ones would
    spend about half of every step on padding."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows = int(lengths.shape[0])
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.argsort(lengths, stable=True)

    def next_batch(self) -> torch.Tensor:
        start = int(torch.randint(0, max(1, self.rows - self.batch_size + 1), (1,), generator=self.generator))
        return self.order[start : start + self.batch_size]


def unrolled_losses(head: EagleHead, embed: torch.Tensor, batch: torch.Tensor, hidden: torch.Tensor,
                    reduced_logits: torch.Tensor, unroll: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per unroll step: the KL loss over the pairs that step can score, and the hits (B, T-1) bool:
    whether the head's top-1 at pair j is the target's (on the reduced vocabulary; pairs before the
    step's first, j < s - 1, mean nothing). batch (B, T) right-padded with PAD; pairs j = 0..T-2;
    reduced_logits (B, T, N) the target's logits at head.d2t."""
    B, T = batch.shape
    P = T - 1
    real = scored(batch, 2, P)  # (B, P): pair j's target token j+2 exists
    feats = head.fuse_features(hidden[:, :, :P])  # (B, P, D)
    tok = F.embedding(batch[:, 1:].clamp(min=0), embed)  # (B, P, D_t): token j+1 of pair j
    log_p = F.log_softmax(reduced_logits[:, 1:, :].float(), dim=-1)  # (B, P, N): p of token j+2
    target_top = log_p.argmax(-1)
    cos, sin = _rope(torch.arange(P, device=batch.device), head.cfg.head_dim, head.cfg.rope_theta, feats.dtype)
    keys, values, losses, hits = [], [], [], []
    x_feat = feats
    for s in range(1, unroll + 1):
        x = head.pairs(x_feat, tok)
        mask = None if s == 1 else unroll_mask(P, s, batch.device)
        past_k = torch.cat(keys, 2) if keys else None
        past_v = torch.cat(values, 2) if values else None
        out, k, v = head.block(x, cos, sin, past_k, past_v, mask)
        keys.append(k)
        values.append(v)
        log_q = F.log_softmax(head.logits(out).float(), dim=-1)  # (B, P, N)
        valid = slice(s - 1, P)
        weight = real[:, valid].float()
        count = weight.sum().clamp(min=1.0)
        kl = (log_p[:, valid].exp() * (log_p[:, valid] - log_q[:, valid])).sum(-1)
        losses.append((kl * weight).sum() / count)
        hits.append(log_q.argmax(-1) == target_top)
        # Next step: pair j reads the head's own output at pair j-1 in place of the feature.
        x_feat = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    return losses, hits


def draft_hits(head: EagleHead, embed: torch.Tensor, batch: torch.Tensor, hidden: torch.Tensor,
               logits: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """Per unroll step (B, T-1) bool: the head's top-1 at pair j is the target's top-1 over the whole
    vocabulary, as the decoder checks a draft. logits (B, T, V): the target's full logits. Where the
    target's top token is outside the draft vocabulary no draft is right, though the head may match
    its top token on the draft vocabulary (unrolled_losses' hits; counting those flattered the
    reports: depth 1 0.905 -> 0.885 embedded, 0.577 -> 0.571 SmolLM2)."""
    reduced = logits[..., head.d2t]
    _, hits = unrolled_losses(head, embed, batch, hidden, reduced, unroll)
    reachable = head.d2t[reduced[:, 1:].argmax(-1)] == logits[:, 1:].argmax(-1)
    return [h & reachable for h in hits]


def make_loss(features: Features, embed: torch.Tensor, unroll: int):
    def loss_fn(head: torch.nn.Module, index: torch.Tensor) -> torch.Tensor:
        batch, hidden, logits = features(index)
        losses, _ = unrolled_losses(head, embed, batch, hidden, logits, unroll)
        return sum(losses) / len(losses)

    return loss_fn


def chain_counts(hits: list[torch.Tensor], score: torch.Tensor) -> tuple[list[float], list[float]]:
    """A greedy chain drafted from pair i: step 1 at pair i, step s at pair i + s - 1. Per depth s:
    the chains that drafted it with every earlier depth right (the first depth: all chains), and
    those that got it right too. score (B, P) bool: the pairs that count (a real answer token)."""
    tried, right = [], []
    ok = None  # (B, P): the chain ending at pair j has all its depths so far right
    for s, hit in enumerate(hits):
        reach = score.clone()
        reach[:, :s] = False
        if ok is not None:
            reach[:, s:] &= ok[:, s - 1 : -1]  # pair j's chain: right up to pair j - 1
        ok = reach & hit
        tried.append(float(reach.sum()))
        right.append(float(ok.sum()))
    return tried, right


def stepped_counts(hits: list[torch.Tensor], score: torch.Tensor) -> tuple[list[float], list[float]]:
    """Chains of fixed length len(hits), started where greedy decoding starts them: the first at a
    row's first scored pair; after a chain from pair i keeps a tokens, the target's bonus token
    follows and the next chain starts at pair i + a + 1. Per depth: chains that drafted it (all
    that reach it inside the row), and those whose depths through it were all right (accepted: the
    bench's acceptance at that position).
    On rows the target wrote greedily this is the decoder's own walk."""
    k = len(hits)
    tried, right = [0.0] * k, [0.0] * k
    hit = torch.stack(hits).tolist()  # (k, B, P)
    for b, row in enumerate(score.tolist()):
        P = len(row)
        i = next((j for j, ok in enumerate(row) if ok), P)
        while i < P and row[i]:
            a, going = 0, True
            for s in range(k):
                if i + s >= P or not row[i + s]:
                    break
                tried[s] += 1  # drafted, whether or not the depths before it were right
                going = going and bool(hit[s][b][i + s])
                if going:
                    right[s] += 1
                    a += 1
            i += a + 1
    return tried, right


@torch.no_grad()
def evaluate(head: EagleHead, target: Any, embed: torch.Tensor, rows: torch.Tensor, unroll: int,
             batch: int = 16, starts: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Held-out acceptance of greedy chains: drafted from every pair, "by_depth" (depth s right given
    depths 1..s-1 were) and "chain" (depths 1..s all right); "stepped": chains of length `unroll`
    started where greedy decoding starts them (stepped_counts; what the bench's acceptance at
    position s measures for fixed-length chains, where positions after a rejection come first more
    often, so it runs lower than "chain"). Top-1 of the head against the target's over the whole
    vocabulary (a pair whose target token is outside the draft vocabulary is a miss). starts (S,):
    where each row's answer begins; then only answer tokens count (the target writing, not the
    user's prompt)."""
    head.eval()
    tried, right, chains = [0.0] * unroll, [0.0] * unroll, [0.0] * unroll
    walked, kept = [0.0] * unroll, [0.0] * unroll
    for i in range(0, rows.shape[0], batch):
        b = rows[i : i + batch]
        P = b.shape[1] - 1
        score = scored(b, 2, P)  # (b, P): pair j predicts token j+2
        if starts is not None:
            score &= (torch.arange(P, device=b.device)[None, :] + 2) >= starts[i : i + batch, None].to(b.device)
        with autocast(b.device):
            hidden, logits = target_pass(target, b, head.cfg.target_layers)
            hits = draft_hits(head, embed, b, hidden, logits, unroll)
        t, r = chain_counts(hits, score)
        w, c = stepped_counts(hits, score)
        for s in range(unroll):
            walked[s] += w[s]
            kept[s] += c[s]
            tried[s] += t[s]
            right[s] += r[s]
            chains[s] += float((score[:, s:] & score[:, : P - s]).sum())  # chains from an answer pair reaching depth s+1
    head.train()
    return {"by_depth": [round(r / max(t, 1.0), 4) for r, t in zip(right, tried)],
            "chain": [round(r / max(c, 1.0), 4) for r, c in zip(right, chains)],
            "stepped": [round(c / max(w, 1.0), 4) for c, w in zip(kept, walked)]}


def build_parser(parser: Any) -> Any:
    parser.add_argument("--target", required=True, help="target model folder (the model the head will serve)")
    parser.add_argument("--method", default="eagle", choices=["eagle", "medusa"], help="the drafter to train")
    parser.add_argument("--out", required=True, help="folder for the head (config + weights) and its report")
    parser.add_argument("--minutes", type=float, default=EagleRecipe.minutes, help="training time budget")
    parser.add_argument("--prompts", type=int, default=EagleRecipe.prompts, help="self-distillation sequences")
    parser.add_argument("--prompts-file", default=None, help="JSONL of {\"prompt\": ...} (default: stdlib code)")
    parser.add_argument("--gen-len", type=int, default=EagleRecipe.gen_len, help="tokens the target writes per prompt")
    parser.add_argument("--draft-vocab", type=int, default=EagleRecipe.draft_vocab, help="reduced vocabulary size")
    parser.add_argument("--unroll", type=int, default=EagleRecipe.unroll, help="training-time test steps")
    parser.add_argument("--prompt-len", type=int, default=EagleRecipe.prompt_len,
                        help="prompt tokens (code windows), or the longest chat prompt kept")
    parser.add_argument("--batch-size", type=int, default=EagleRecipe.batch_size, help="sequences per step")
    parser.add_argument("--lr", type=float, default=EagleRecipe.lr, help="peak learning rate (lower for --init)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="prompts as chat requests (default: when the target has a chat template)")
    parser.add_argument("--dtype", default=EagleRecipe.dtype,
                        help="the target's dtype for data and features (bfloat16: ~2x faster on CPU)")
    parser.add_argument("--cache-gb", type=float, default=EagleRecipe.cache_gb,
                        help="RAM for the target's features, computed once (0: recompute per batch)")
    parser.add_argument("--cache-on-disk", action="store_true",
                        help="keep the feature cache in OUT/work/features/ (memory-mapped; --cache-gb is then disk): "
                             "a stopped run resumes without recomputing it, and it may exceed the RAM")
    parser.add_argument("--self-requests", type=float, default=EagleRecipe.self_requests,
                        help="chat targets: share of training requests the target writes itself (0: templates only)")
    parser.add_argument("--long-requests", type=float, default=EagleRecipe.long_requests,
                        help="chat targets: share of training requests with a long passage (raise --prompt-len to ~1024)")
    parser.add_argument("--gen-batch", type=int, default=EagleRecipe.gen_batch, help="sequences per generation batch")
    parser.add_argument("--init", default=None,
                        help="eagle: a head folder to start from (its layers and vocabulary carry over)")
    parser.add_argument("--data-only", action="store_true",
                        help="eagle: generate the self-distillation data (resumable) and its datastore, no training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser


def run_from_args(args: Any) -> int:
    if args.init is not None and args.method != "eagle":
        raise ValueError(f"--init {args.init!r} starts an EAGLE head: it does not apply to --method {args.method}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: use an integer >= 1")
        torch.set_num_threads(args.threads)
    recipe = EagleRecipe(target=args.target, out=args.out, minutes=args.minutes, prompts=args.prompts,
                         prompts_file=args.prompts_file, gen_len=args.gen_len, draft_vocab=args.draft_vocab,
                         unroll=args.unroll, seed=args.seed, prompt_len=args.prompt_len, batch_size=args.batch_size,
                         chat=args.chat, dtype=args.dtype, cache_gb=args.cache_gb, cache_on_disk=args.cache_on_disk,
                         self_requests=args.self_requests, gen_batch=args.gen_batch, init=args.init,
                         long_requests=args.long_requests, lr=args.lr)
    from outrider.models import resolve_device

    device = resolve_device(args.device)
    if args.data_only:
        if args.method != "eagle":
            raise ValueError(f"--data-only keeps eagle's data and datastore: it does not apply to --method {args.method}")
        run = start_run(recipe, device)
        tokens = write_run_datastore(run, recipe)
        print(f"{args.out}/work/data.pt: {int(run.data['train'].shape[0])} training rows; "
              f"{args.out}/{DATASTORE_NAME}: {tokens} answer tokens")
        return 0
    if args.method == "medusa":
        from outrider.train.medusa import train_medusa

        report = train_medusa(recipe, device)
        print((Path(args.out) / "report.md").read_text())
    else:
        report = train_eagle(recipe, device)
        print(format_report(report))
    print(f"Written to {args.out}/ (use it with --method {args.method} --draft {args.out})")
    return 0


def warm_head(path: str, embed: torch.Tensor, target_name: str) -> EagleHead:
    """The head in `path` as a float32 starting point for training on this target; refused, naming
    both, when it was trained for another target (its embeddings differ)."""
    from outrider.drafters.heads import refuse_other_target

    head = EagleHead.load(path, dtype=torch.float32)
    refuse_other_target(head.cfg, embed, f"--init {path!r} is a head", target_name,
                        "start from a head trained for this target, or without --init")
    return head


def write_run_datastore(run: Any, recipe: EagleRecipe) -> int:
    """The run's training answers as the head folder's datastore.npy (train/datastore.py); returns
    its token count."""
    from outrider.train.datastore import train_answers, write_datastore

    answers = train_answers(run.data, run.tokenizer, uses_chat(run.tokenizer, recipe), recipe.prompt_len)
    return write_datastore(run.out / DATASTORE_NAME, answers)


def train_eagle(recipe: EagleRecipe, device: torch.device | None = None) -> dict[str, Any]:
    """Run the recipe end to end (resuming a stopped run in recipe.out); returns the report."""
    device = device or torch.device("cpu")
    run = start_run(recipe, device)
    target, embed, data, d2t, out = run.target, run.embed, run.data, run.d2t, run.out
    if recipe.init is not None:
        head = warm_head(recipe.init, embed, str(recipe.target)).to(device)
        layers, d2t = head.cfg.target_layers, head.d2t.long().cpu()
    else:
        layers = default_layers(target.config.num_hidden_layers)
        head = new_head(target.config, embed, str(recipe.target), d2t, layers, seed=recipe.seed).to(device)
    held = data["heldout"]
    coverage = float(torch.isin(held[held >= 0], d2t).float().mean())
    settings = head_settings(recipe, data)
    seq_len = settings.seq_len
    store = run.work / "features" if recipe.cache_on_disk else None
    features = Features(target, data["train"].to(device), layers, d2t.to(device), recipe.cache_gb, store=store)
    sampler = LengthGroupedSampler((data["train"] >= 0).sum(1), recipe.batch_size, recipe.seed)
    result: LoopResult = train(head, make_loss(features, embed.float(), recipe.unroll), sampler, settings,
                               Budget(tokens=None, minutes=recipe.minutes), run.work / "head.ckpt", device, "eagle")
    starts = data.get("heldout_starts")
    acceptance = evaluate(head, target, embed.float(), held.to(device), recipe.unroll, starts=starts)
    export = EagleHead(head.cfg)
    export.load_state_dict(head.state_dict())
    export.to(torch.bfloat16).save(out)  # bf16: half the file, the dtype the CPU drafts fastest in
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    stored = write_run_datastore(run, recipe)
    report = {
        "command": "outrider train drafter --method eagle",
        "recipe": asdict(recipe),
        "target": recipe.target,
        "target_layers": list(layers),
        "data": {
            "train_sequences": int(data["train"].shape[0]), "heldout_sequences": int(data["heldout"].shape[0]),
            "tokens_per_sequence": seq_len, "generate_s": round(float(data["generate_s"]), 1),
            "source": recipe.prompts_file or (f"chat requests, {recipe.self_requests:.0%} written by the target "
                                              f"itself, {recipe.long_requests:.0%} carrying a long passage "
                                              "(pydoc_data topics, module docstrings), the rest made from Python "
                                              "standard library docstrings (train files; held-out files for "
                                              "evaluation)"
                                              if uses_chat(run.tokenizer, recipe)
                                              else "Python standard library (train files; held-out files for evaluation)"),
            "features_cached": features.cached,
        },
        "draft_vocab": int(d2t.shape[0]),
        "init": recipe.init,  # the head this run started from (None: a new head)
        "heldout_coverage": round(coverage, 4),
        "datastore_tokens": stored,  # the training answers kept as a datastore (datastore.npy)
        "parameters": sum(p.numel() for p in head.parameters()),
        "size_mb": round(size_mb, 2),
        "steps": result.progress.step,
        "tokens_seen": result.progress.tokens_seen,
        "train_minutes": round(result.progress.elapsed_s / 60, 2),
        "wall_minutes": round((time.monotonic() - run.started) / 60, 2),
        "loss_history": result.progress.loss_history[-10:],
        "heldout_acceptance_by_depth": acceptance["by_depth"],
        "heldout_chain_acceptance": acceptance["chain"],
        "heldout_stepped_acceptance": acceptance["stepped"],
        "heldout_scored": "answer tokens" if starts is not None else "all tokens",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    return report


def _cell(r: dict[str, Any], key: str, i: int) -> str:
    values = r.get(key)
    return f"{values[i]:.3f}" if values and i < len(values) else "-"


def format_report(r: dict[str, Any]) -> str:
    lines = [
        "# EAGLE head: training report",
        "",
        f"Target `{r['target']}`, layers {r['target_layers']} fused; draft vocabulary {r['draft_vocab']} tokens "
        f"(held-out coverage {r['heldout_coverage']:.1%}); {r['parameters']} parameters, {r['size_mb']} MB (bf16).",
        "",
        f"Data: {r['data']['train_sequences']} self-distilled sequences of {r['data']['tokens_per_sequence']} tokens "
        f"({r['data']['source']}), generated in {r['data']['generate_s']} s; {r['data']['heldout_sequences']} "
        "held-out sequences.",
        "",
        *([f"Datastore: {r['datastore_tokens']} tokens of the target's training answers ({DATASTORE_NAME}, for "
           "`--method suffix --datastore` this folder).", ""] if r.get("datastore_tokens") else []),
        f"Training: {r['steps']} steps, {r['tokens_seen']} tokens, {r['train_minutes']} min "
        f"({r['wall_minutes']} min with data and evaluation).",
        "",
        f"Held-out acceptance of greedy chains ({r.get('heldout_scored', 'all tokens')}): a depth right given the "
        "earlier ones were; a chain's first depths all right, chains from every position; the same for chains "
        "started where greedy decoding starts them (the bench's acceptance at that position, for chains of "
        "fixed length).",
        "",
        "| draft depth | given the earlier depths right | all so far right | all so far right, as decoding steps |",
        "|---:|---:|---:|---:|",
        *(f"| {i + 1} | {a:.3f} | {_cell(r, 'heldout_chain_acceptance', i)} | "
          f"{_cell(r, 'heldout_stepped_acceptance', i)} |" for i, a in enumerate(r["heldout_acceptance_by_depth"])),
        "",
        *([f"Re-evaluated {r['reevaluated']}", ""] if r.get("reevaluated") else []),
    ]
    return "\n".join(lines)
