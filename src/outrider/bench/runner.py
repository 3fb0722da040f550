"""The bench loop (Spec-Bench protocol, batch size 1): every method answers every question's
turns, methods interleaved question by question after one warm-up generation each, one JSON line
per question x turn x method x repeat appended (and flushed) to results.jsonl as it finishes.

A rerun with the same --out skips the lines already there and rebuilds the summary from all of
them, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from outrider.models.gguf import is_gguf
from outrider.bench.datasets import Question, builtin_code, load_spec_bench, render_prompt, select
from outrider.bench.metrics import BASELINE, Record, record_key
from outrider.bench.peers import (
    LLAMACPP_PEERS, PEERS, VLLM_PEERS, HFPeer, LlamaCppPeer, Method, OutriderMethod, VllmPeer, check_methods, load_hf,
    split_variant, sweepable, variant,
)
from outrider.drafters import REGISTRY

RESULTS = "results.jsonl"
CONFIG = "config.json"
WARMUP_TOKENS = 16
# Options that change what a record means: a rerun into the same --out must keep them.
_FIXED = ("dataset", "max_new_tokens", "temperature", "k", "target", "draft", "head", "dtype", "backend")


@dataclass
class BenchConfig:
    out: str
    dataset: str | None = None  # Spec-Bench JSONL; None: the built-in code-completion set
    categories: list[str] | None = None
    limit_per_category: int | None = None
    methods: list[str] = field(default_factory=lambda: ["autoregressive", "draft_model", "prompt_lookup"])
    max_new_tokens: int = 128
    temperature: float = 0.0
    repeats: int = 1
    k: int | str | None = None  # draft length, or "auto" (chosen per step); None: each method's default
    target: str | None = None  # None: the embedded pair
    draft: str | None = None
    head: str | None = None  # a self-drafting head (eagle) trained for the target; None: the embedded one
    dtype: str | None = None
    backend: str = "auto"
    device: str | None = None
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    gguf: str | None = None  # the target's weights as a GGUF file, for the llama.cpp peers
    sweep: list[int | str] | None = None  # draft lengths (or "auto"): each drafting method runs once per k
    progress: bool = True

    def check(self) -> None:
        for name in ("max_new_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} is invalid: use an integer >= 1")
        if self.k is not None and self.k != "auto" and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k={self.k!r} is invalid: use an integer >= 1 or 'auto'")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is invalid: use 0 (greedy) or more")
        if self.target is None and self.draft is not None:
            raise ValueError("--draft was given without --target: pass both, or neither for the embedded pair")
        self.methods = check_methods(list(self.methods))
        needs_draft = [m for m in self.methods if m == "hf-assisted" or (
            split_variant(m)[0] in REGISTRY and REGISTRY[split_variant(m)[0]].uses_draft_model)]
        if self.target is not None and self.draft is None and needs_draft:
            raise ValueError(f"methods {needs_draft} need a draft model: pass --draft DIR, or drop them from --methods")
        if self.sweep:
            if self.k is not None:
                raise ValueError(f"--k {self.k} and --sweep k={self.sweep} were both given: use one")
            bad = [k for k in self.sweep if k != "auto" and (not isinstance(k, int) or k < 1)]
            if bad or len(set(self.sweep)) != len(self.sweep):
                raise ValueError(f"sweep k={self.sweep} is invalid: use distinct integers >= 1 (or 'auto'), "
                                 "e.g. k=1,2,4,auto")
            if not any(sweepable(m) for m in self.methods):
                raise ValueError(f"--sweep needs a drafting outrider method, and methods are {self.methods}")
            self.methods = [v for m in self.methods  # (idempotent: variants are left as they are)
                            for v in ([variant(m, k) for k in self.sweep] if sweepable(m) else [m])]

    def identity(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _FIXED}
        d["dataset"] = str(Path(self.dataset).resolve()) if self.dataset else "builtin:code"
        return d


def model_dirs(cfg: BenchConfig) -> tuple[Path, Path | None]:
    if cfg.target is not None:
        return Path(cfg.target), Path(cfg.draft) if cfg.draft else None
    from outrider.decoder import _default_target, embedded_pair_dir

    return _default_target(), embedded_pair_dir() / "draft"


def load_questions(cfg: BenchConfig) -> list[Question]:
    questions = load_spec_bench(cfg.dataset) if cfg.dataset else builtin_code()
    return select(questions, cfg.categories, cfg.limit_per_category)


def read_records(path: Path) -> list[Record]:
    """Records of an earlier run. A last line cut short (the process killed mid-write) is dropped
    from the file, so that appending goes on from a clean line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"outrider bench: dropping an unfinished last line of {path}", file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    records = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg}): fix or delete it") from e
    return records


def _check_same_config(out: Path, cfg: BenchConfig) -> None:
    path = out / CONFIG
    ident = cfg.identity()
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in ident.items() if old.get(k) != v]
        if diff:
            raise ValueError(
                f"--out {str(out)!r} holds results of another configuration ({'; '.join(diff)}): "
                "use a new --out, or the same options to resume"
            )
    else:
        write_atomic(path, json.dumps(ident, indent=2) + "\n")


def write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    os.replace(tmp, path)


def seed_of(question_id: str, turn: int, repeat: int) -> int:
    """The same sampling seed for every method on one question x turn x repeat."""
    return zlib.crc32(f"{question_id}/{turn}/{repeat}".encode())


def load_methods(cfg: BenchConfig, names: list[str]) -> dict[str, Method]:
    from outrider.demo import eagle_head

    target_dir, draft_dir = model_dirs(cfg)
    head = cfg.head if cfg.head is not None else eagle_head(cfg.target, None)  # None: the embedded target's shipped one
    out: dict[str, Method] = {}
    hf_target = None  # loaded once for all transformers peers
    for name in names:
        if name in LLAMACPP_PEERS:
            gguf = cfg.gguf or (cfg.target if is_gguf(cfg.target) else None)
            if gguf is None:
                raise ValueError(f"method {name!r} runs llama.cpp on a GGUF file: pass --gguf FILE (the target's weights)")
            out[name] = LlamaCppPeer(name, gguf, cfg.threads, 4096)
        elif name in VLLM_PEERS:
            out[name] = VllmPeer(name, target_dir, cfg.dtype, cfg.threads, 4096)
        elif name in PEERS:
            if hf_target is None:
                hf_target = load_hf(target_dir, cfg.dtype, cfg.device)
            out[name] = HFPeer(name, hf_target, draft_dir, cfg.k, cfg.dtype)
        else:
            out[name] = OutriderMethod(name, cfg.target, cfg.draft, cfg.k, cfg.dtype, cfg.backend, cfg.device,
                                       head=head)
    return out


class Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.questions = load_questions(cfg)
        self.records: list[Record] = []
        self.index: dict[tuple[str, int, str, int], Record] = {}

    def _todo(self) -> list[tuple[Question, int, int, str]]:
        return [
            (q, rep, turn, m)
            for q in self.questions
            for rep in range(self.cfg.repeats)
            for turn in range(len(q.turns))
            for m in self.cfg.methods  # interleaved, baseline first
            if (q.question_id, turn, m, rep) not in self.index
        ]

    def run(self) -> list[Record]:
        """Run what results.jsonl lacks; return all records (earlier runs' included)."""
        model_dirs(self.cfg)  # a missing embedded pair fails here, before --out is touched
        self.out.mkdir(parents=True, exist_ok=True)
        _check_same_config(self.out, self.cfg)
        for r in read_records(self.out / RESULTS):
            self._add(r)
        todo = self._todo()
        if not todo:
            return self.records
        if self.cfg.threads is not None:
            import torch

            torch.set_num_threads(self.cfg.threads)
        needed = [m for m in self.cfg.methods if m == BASELINE or any(t[3] == m for t in todo)]
        methods = load_methods(self.cfg, needed)
        base = methods[BASELINE]
        tokenizer = base.tokenizer
        if tokenizer is None:
            raise ValueError(f"target {base.model_name!r} has no tokenizer: the bench needs one to build prompts")
        room = (base.context or 10**9) - self.cfg.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={self.cfg.max_new_tokens} leaves no room for a prompt in the target's "
                f"context of {base.context} tokens: lower --max-new-tokens"
            )
        warm = render_prompt(tokenizer, todo[0][0], 0, [])[-room:]
        for m in methods.values():  # first calls pay one-off allocation and dispatch costs
            m.generate(warm, min(WARMUP_TOKENS, self.cfg.max_new_tokens), self.cfg.temperature, 0)
        with (self.out / RESULTS).open("a", encoding="utf-8") as f:
            for q, rep, turn, name in self._progress(todo):
                rec = self._one(methods[name], tokenizer, room, q, rep, turn)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                self._add(rec)
        return self.records

    def _progress(self, todo: list) -> Iterator:
        if not self.cfg.progress:
            return iter(todo)
        from tqdm import tqdm

        return iter(tqdm(todo, desc="outrider bench", unit="gen", disable=None))

    def _answers(self, qid: str, method: str, rep: int, turn: int) -> list[str]:
        return [self.index[(qid, t, method, rep)]["output_text"] for t in range(turn)]

    def _one(self, method: Method, tokenizer: Any, room: int, q: Question, rep: int, turn: int) -> Record:
        cfg = self.cfg
        ids = render_prompt(tokenizer, q, turn, self._answers(q.question_id, method.name, rep, turn))
        truncated = len(ids) > room
        if truncated:  # keep the end: the question (and the chat template's cue to answer)
            ids = ids[-room:]
        res = method.generate(ids, cfg.max_new_tokens, cfg.temperature, seed_of(q.question_id, turn, rep))
        s = res.stats
        matches = None
        if cfg.temperature == 0 and method.name != BASELINE:
            ref = self.index.get((q.question_id, turn, BASELINE, rep))
            matches = None if ref is None else res.token_ids == ref["output_ids"]
        return {
            "question_id": q.question_id,
            "category": q.category,
            "turn": turn,
            "method": method.name,
            "repeat": rep,
            "k": getattr(method, "k", None),
            "precision": getattr(method, "precision", None),
            "costs": method.costs.to_dict() if getattr(method, "costs", None) else None,
            "prompt_tokens": len(ids),
            "reused_tokens": s.reused_tokens if s else None,  # served by the last request's cache
            "prompt_truncated": truncated,
            "new_tokens": len(res.token_ids),
            "wall_s": res.wall_s,
            "tokens_per_s": len(res.token_ids) / res.wall_s if res.wall_s > 0 else None,
            "steps": s.steps if s else None,
            "drafted": s.drafted if s else None,
            "accepted": s.accepted if s else None,
            "drafted_at": s.drafted_at if s else None,
            "draft_forwards": s.draft_forwards if s else None,
            "accepted_at": s.accepted_at if s else None,
            "draft_s": s.draft_s if s else None,  # time inside the drafter
            "target_s": s.target_s if s else None,  # time inside target forwards during decode
            "tau": s.tau if s else None,
            "alpha": (s.alpha if s.drafted else None) if s else None,
            "matches_autoregressive": matches,
            "output_ids": res.token_ids,
            "output_text": tokenizer.decode(res.token_ids, skip_special_tokens=True),
        }

    def _add(self, r: Record) -> None:
        key = record_key(r)
        if key not in self.index:
            self.records.append(r)
        self.index[key] = r


def machine_info() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    import outrider

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "outrider": getattr(outrider, "__version__", None),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return asdict(cfg)
