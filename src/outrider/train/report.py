"""The recipe's record: report.json (every figure) and report.md (the same, for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in rows]
    return lines + [""]


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``out/report.json`` and ``out/report.md`` from the recipe's report dict."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    corpus, ev = report["corpus"], report.get("evaluation", {})
    lines = [
        "# outrider demo pair: training report",
        "",
        f"Command: `{report['command']}`  ",
        f"Scale: {report['scale']}, seed {report['seed']}, device {report['machine']['device']}, "
        f"threads {report['machine']['threads']}",
        "",
        "## Corpus (Python standard library source, split by file)",
        "",
        *_table(
            [
                ("root", corpus["root"]),
                ("train files / tokens", f"{corpus['train_files']} / {corpus['train_tokens']}"),
                ("held-out files / tokens", f"{corpus['heldout_files']} / {corpus['heldout_tokens']}"),
                ("files skipped (not UTF-8)", corpus["skipped_files"]),
                ("vocabulary", corpus["vocab_size"]),
            ]
        ),
        "## Models",
        "",
        "| | target | draft |",
        "|---|---|---|",
    ]
    t, d = report["models"]["target"], report["models"]["draft"]
    for key in ("shape", "parameters", "size_mb", "tokens_seen", "steps", "train_minutes"):
        lines.append(f"| {key} | {_fmt(t.get(key))} | {_fmt(d.get(key))} |")
    lines += ["", "## Held-out evaluation", ""]
    if ev:
        lines += _table(
            [
                ("tokens evaluated", ev["tokens"]),
                ("target loss / perplexity", f"{ev['target_loss']:.4f} / {ev['target_ppl']:.2f}"),
                ("draft loss / perplexity", f"{ev['draft_loss']:.4f} / {ev['draft_ppl']:.2f}"),
                ("draft-vs-target top-1 agreement", f"{ev['top1_agreement']:.4f}"),
            ]
        )
    lines += ["## Acceptance under outrider's speculative decoder", ""]
    for entry in report.get("acceptance", []):
        if "error" in entry:
            lines.append(f"- temperature {entry['temperature']}: not measured ({entry['error']})")
        else:
            lines.append(
                f"- temperature {entry['temperature']}, k={entry['k']}: alpha {entry['alpha']:.3f}, "
                f"tau {entry['tau']:.3f} ({entry['accepted']}/{entry['drafted']} accepted, "
                f"{entry['prompts']} held-out prompts, {entry['max_new_tokens']} new tokens each)"
            )
    lines += ["", "## Phases (this run)", "", "| phase | status | wall s |", "|---|---|---|"]
    for name, phase in report["phases"].items():
        lines.append(f"| {name} | {phase['status']} | {phase['wall_s']:.1f} |")
    lines += ["", "## Machine", "", *_table(list(report["machine"].items()))]
    (out / "report.md").write_text("\n".join(lines))
