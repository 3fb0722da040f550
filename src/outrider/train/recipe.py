"""The demo-pair recipe: corpus -> tokenizer -> tokens -> pretrain -> distill -> evaluate -> export.

Every phase is skipped or resumed when its output or checkpoint exists under ``out``, so an
interrupted run continues where it stopped and a finished one can be extended by rerunning with a
larger budget. Run it as ``outrider train demo-pair --out DIR`` or
``python -m outrider.train.recipe --out DIR``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import transformers

from outrider.models import resolve_device
from outrider.train import corpus as corpus_mod
from outrider.train.config import PRESETS, Budget
from outrider.train.data import cached_tokens, fixed_windows, prompt_ids
from outrider.train.distill import distill
from outrider.train.evaluate import heldout_metrics, measure_pair_acceptance
from outrider.train.export import export_model
from outrider.train.loop import LoopResult
from outrider.train.pretrain import pretrain
from outrider.train.report import write_report
from outrider.train.tokenizer import load_tokenizer, train_tokenizer

Scale = Literal["full", "toy"]
ACCEPTANCE_TEMPERATURES = (0.0, 1.0)  # greedy (exact-match contract) and plain sampling

__all__ = ["main", "measure_pair_acceptance", "train_demo_pair"]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _check_positive(name: str, value: float | int | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """Limit torch (and the tokenizers' Rust pool) to ``threads``; restore torch's on exit."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    rayon_before = os.environ.get("RAYON_NUM_THREADS")
    torch.set_num_threads(threads)
    # Read when the Rust pool first starts, so it only binds in a fresh process (the CLI).
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if rayon_before is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = rayon_before


class _Phases:
    """Wall time and status of each phase in this run."""

    def __init__(self) -> None:
        self.record: dict[str, dict[str, Any]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"status": "ran"}
        _log(f"phase {name}: start")
        start = time.monotonic()
        try:
            yield entry
        finally:
            entry["wall_s"] = round(time.monotonic() - start, 3)
            self.record[name] = entry
            _log(f"phase {name}: {entry['status']} in {entry['wall_s']:.1f} s")


def _loop_status(result: LoopResult) -> str:
    if result.steps_this_run == 0:
        return "skipped"  # an earlier run already used this budget
    return "resumed" if result.resumed_from_step > 0 else "ran"


def _model_record(shape: Any, result: LoopResult, config: Any) -> dict[str, Any]:
    return {
        "shape": "x".join(str(v) for v in (shape.layers, shape.hidden, shape.heads, shape.intermediate))
        + " (layers x hidden x heads x intermediate)",
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        "tokens_seen": result.progress.tokens_seen,
        "steps": result.progress.step,
        "train_minutes": round(result.progress.elapsed_s / 60.0, 2),
        "resumed_from_step": result.resumed_from_step,
        "steps_this_run": result.steps_this_run,
        "loss_history": result.progress.loss_history,
    }


def train_demo_pair(
    out: Path,
    *,
    scale: Scale = "full",
    seed: int = 0,
    target_minutes: float | None = None,
    draft_minutes: float | None = None,
    target_tokens: int | None = None,
    draft_tokens: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    measure_acceptance: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate and export the demo pair into ``out``; returns the report dict.

    Budgets left as None take the scale's defaults; each phase stops at its token or minute
    budget, whichever comes first, counted over all runs into the same ``out``.
    Writes out/target/ and out/draft/ (Hugging Face format), out/report.{md,json}; keeps
    tokenizer, token caches and checkpoints under out/work/.
    """
    if scale not in get_args(Scale):
        raise ValueError(f"scale must be one of {get_args(Scale)}, got {scale!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in [
        ("target_minutes", target_minutes),
        ("draft_minutes", draft_minutes),
        ("target_tokens", target_tokens),
        ("draft_tokens", draft_tokens),
        ("threads", threads),
    ]:
        _check_positive(name, value)
    torch_device = resolve_device(device)
    preset = PRESETS[scale]
    target_budget = preset.target_budget.overridden(target_tokens, target_minutes)
    draft_budget = preset.draft_budget.overridden(draft_tokens, draft_minutes)
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    phases = _Phases()
    with _threads(threads):
        with phases.phase("corpus"):
            split = corpus_mod.split_files(
                max_train=preset.max_train_files,
                max_heldout=preset.max_heldout_files,
                max_file_bytes=preset.max_file_bytes,
            )
        with phases.phase("tokenizer") as entry:
            tok_dir = work / "tokenizer"
            if (tok_dir / "tokenizer.json").exists():
                entry["status"] = "skipped"
                tokenizer = load_tokenizer(tok_dir)
            else:
                tokenizer = train_tokenizer(
                    corpus_mod.read_texts(split.train), preset.vocab_size, tok_dir
                )
        eos_id = tokenizer.eos_token_id
        with phases.phase("tokenize") as entry:
            if (work / "train_tokens.npy").exists() and (work / "heldout_tokens.npy").exists():
                entry["status"] = "skipped"
            train_tokens = cached_tokens(work / "train_tokens.npy", tokenizer, split.train)
            heldout_tokens = cached_tokens(work / "heldout_tokens.npy", tokenizer, split.heldout)
            _log(f"tokens: {len(train_tokens)} train, {len(heldout_tokens)} held-out")

        target_config = preset.target.llama_config(len(tokenizer), eos_id)
        draft_config = preset.draft.llama_config(len(tokenizer), eos_id)
        with phases.phase("pretrain") as entry:
            target, target_result = pretrain(
                target_config, train_tokens, preset.target_train, target_budget,
                work / "target.ckpt.pt", torch_device, seed,
            )
            entry["status"] = _loop_status(target_result)
        with phases.phase("distill") as entry:
            draft, draft_result = distill(
                target, draft_config, train_tokens, preset.draft_train, draft_budget,
                work / "draft.ckpt.pt", torch_device, seed,
            )
            entry["status"] = _loop_status(draft_result)
        with phases.phase("evaluate"):
            windows = fixed_windows(heldout_tokens, preset.target_train.seq_len, preset.eval_windows)
            evaluation = heldout_metrics(target, draft, windows, torch_device)
            _log(f"held-out: {evaluation}")
        with phases.phase("export"):
            target_export = export_model(target, tok_dir, eos_id, out / "target")
            draft_export = export_model(draft, tok_dir, eos_id, out / "draft")
        acceptance: list[dict[str, Any]] = []
        with phases.phase("acceptance") as entry:
            if measure_acceptance:
                prompts = prompt_ids(tokenizer, split.heldout, preset.prompts, preset.prompt_tokens)
                for temperature in ACCEPTANCE_TEMPERATURES:
                    acceptance.append(
                        _try_acceptance(out, prompts, preset.k, preset.max_new_tokens, temperature, seed)
                    )
            else:
                entry["status"] = "skipped"

    report: dict[str, Any] = {
        "command": command or f"train_demo_pair({str(out)!r}, scale={scale!r}, seed={seed})",
        "scale": scale,
        "seed": seed,
        "corpus": {
            "root": str(split.root),
            "train_files": len(split.train),
            "heldout_files": len(split.heldout),
            "skipped_files": sum(
                corpus_mod.read_text(p) is None for p in split.train + split.heldout
            ),
            "train_tokens": int(len(train_tokens)),
            "heldout_tokens": int(len(heldout_tokens)),
            "vocab_size": len(tokenizer),
        },
        "budgets": {"target": asdict(target_budget), "draft": asdict(draft_budget)},
        "training": {"target": asdict(preset.target_train), "draft": asdict(preset.draft_train)},
        "models": {
            "target": {**_model_record(preset.target, target_result, target_config), **target_export},
            "draft": {**_model_record(preset.draft, draft_result, draft_config), **draft_export},
        },
        "evaluation": {**evaluation, "windows": len(windows), "seq_len": preset.target_train.seq_len},
        "acceptance": acceptance,
        "phases": phases.record,
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads() if threads is None else threads,
            "device": str(torch_device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    write_report(out, report)
    _log(f"done: {out / 'report.md'}")
    return report


def _try_acceptance(
    out: Path, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float, seed: int
) -> dict[str, Any]:
    """Acceptance of the exported pair, or the reason it could not be measured.

    The decoder is developed alongside this recipe; a missing or failing decoder must not
    throw away hours of training whose models are already exported, so its errors are recorded.
    """
    try:
        return measure_pair_acceptance(
            out / "target", out / "draft", prompts, k, max_new_tokens, temperature, seed
        )
    except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        _log(f"acceptance measurement failed: {message}")
        return {"temperature": temperature, "error": message}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``outrider train demo-pair``; pass a subparser to wire it into a CLI."""
    parser = parser or argparse.ArgumentParser(
        prog="outrider train demo-pair", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="run directory (resumes if present)")
    # No argparse `choices`: train_demo_pair raises a ValueError that names the bad value.
    parser.add_argument("--scale", default="full", help="full (the real pair) or toy (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    # Budgets count over all runs into --out; a phase stops at whichever of its two ends first.
    parser.add_argument("--target-minutes", type=float, default=None, help="target training minutes")
    parser.add_argument("--draft-minutes", type=float, default=None, help="draft training minutes")
    parser.add_argument("--target-tokens", type=int, default=None, help="target training tokens")
    parser.add_argument("--draft-tokens", type=int, default=None, help="draft training tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on both)")
    parser.add_argument("--no-acceptance", action="store_true", help="skip the decoder measurement")
    return parser


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the recipe from parsed arguments (for a CLI that owns the parser)."""
    # The command line as typed, for the report; argv holds the words after `demo-pair`.
    if argv is None:
        module_run = sys.argv[0].endswith("recipe.py")
        program = "python -m outrider.train.recipe" if module_run else Path(sys.argv[0]).name
        command = f"{program} {shlex.join(sys.argv[1:])}".strip()
    else:
        command = shlex.join(["outrider", "train", "demo-pair", *argv])
    train_demo_pair(
        args.out,
        scale=args.scale,
        seed=args.seed,
        target_minutes=args.target_minutes,
        draft_minutes=args.draft_minutes,
        target_tokens=args.target_tokens,
        draft_tokens=args.draft_tokens,
        threads=args.threads,
        device=args.device,
        measure_acceptance=not args.no_acceptance,
        command=command,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``outrider train demo-pair`` without the ``train demo-pair`` words; raises ValueError on
    bad values (the CLI prints it)."""
    args = build_parser().parse_args(argv)
    return run_from_args(args, argv)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
