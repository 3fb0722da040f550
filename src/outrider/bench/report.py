"""Bench reports from the summary: summary.json, summary.md (a Spec-Bench-like table) and plots.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from outrider.bench.metrics import BASELINE, expected_speedup
from outrider.bench.runner import write_atomic

PLOTS = ("acceptance_by_position.png", "speedup_by_category.png")
SWEEP_PLOT = "speedup_vs_k.png"
TREE_PLOT = "speedup_and_tau_vs_tree_size.png"
NO_MATPLOTLIB = ("matplotlib is not installed: `pip install 'outrider[bench]'` (or `pip install matplotlib`) and "
                 "rerun the same command to draw them")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def format_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    methods, cats = s["methods"], s["categories"]
    cfg, machine = report["config"], report["machine"]
    lines = [
        "# outrider bench",
        "",
        f"target `{report['models']['target']}`, draft `{report['models']['draft']}`; dataset "
        f"{report['dataset']}; {cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']}, "
        f"{cfg['repeats']} repeat(s), dtype {cfg['dtype'] or 'as stored'}, batch size 1.",
        "",
        "## Speedup over autoregressive, by category",
        "",
        "| method | " + " | ".join(cats) + " | overall |",
        "|---|" + "---:|" * (len(cats) + 1),
    ]
    for m in methods:
        row = [_x(s["by_category"][m][c]["speedup"]) for c in cats]
        lines.append(f"| {m} | " + " | ".join(row) + f" | {_x(s['overall'][m]['speedup'])} |")
    lines += [
        "",
        "## Overall",
        "",
        "| method | precision | k | tokens/s | speedup | tau | alpha | same output as autoregressive | questions "
        "| new tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        o = s["overall"][m]
        k = report["k"].get(m)
        precision = report.get("precision", {}).get(m) or "-"
        lines.append(
            f"| {m} | {precision} | {'-' if k is None else k} | {_f(o['tokens_per_s'], '.1f')} | {_x(o['speedup'])} | "
            f"{_f(o['tau'])} | {_f(o['alpha'])} | {_pct(o['match_rate'])} | {o['questions']} | {o['new_tokens']} |"
        )
    if s.get("sweep"):
        lines += [
            "",
            "## Draft length and tree size sweep",
            "",
            "k: draft length (chains) or most tree nodes (`@w=W`: trees, W children per expanded node); "
            "size: mean drafted nodes per step. theoretical (chains): (1 - α^(k+1)) / ((1 - α)(k·c + 1)) with α "
            "and c measured over all fixed k of the method (c = drafter time per drafted token / target time "
            "per step); it assumes each position is accepted independently with probability α. predicted: the "
            "cost model's tau / (d·c + v(size + 1)) from the measured tau, mean draft-model forwards per step d and the costs c, "
            "v(n) calibrated at load (costs.py). Both leave out prefill and the loop's own time.",
            "",
            "| method | k | size | speedup | theoretical | predicted | tau | alpha | c |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for base, e in s["sweep"].items():
            for i, k in enumerate(e["k"]):
                lines.append(f"| {base} | {k} | {_f(e['size'][i], '.1f')} | {_x(e['speedup'][i])} | "
                             f"{_x(e['theoretical'][i])} | {_x(e['predicted'][i])} | "
                             f"{_f(e['tau'][i])} | {_f(e['alpha'][i])} | {_f(e['c'][i], '.3f')} |")
    truncated = report["prompts_truncated"]
    lines += [
        "",
        "tokens/s: per question, new tokens / wall time (prefill + decode) summed over its turns, averaged "
        "over questions; speedup: that ÷ autoregressive's, same questions, same run; tau: tokens committed "
        "per target forward; alpha: accepted / drafted; '-': not measured (transformers' generate reports "
        "no acceptance counts; match rate only at temperature 0).",
    ]
    if truncated:
        lines += ["", f"**{truncated} prompt(s) were longer than the target's context and kept only their "
                  "last tokens** (`prompt_truncated` in results.jsonl)."]
    lines += [
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        "",
    ]
    if report.get("plots"):
        lines.append(f"Plots: {', '.join(report['plots'])}.")
    elif report.get("plots_skipped"):
        lines.append(f"**Plots skipped**: {report['plots_skipped']}.")
    lines += ["Records: results.jsonl.", ""]
    return "\n".join(lines)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(out: Path, report: dict[str, Any], plt: Any) -> list[str]:
    """Draw the plots with `plt` (matplotlib.pyplot); return the names of the files written."""
    s = report["summary"]
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drew = False
    for m in s["methods"]:
        acc = s["overall"][m]["acceptance_at"]
        if acc:
            xs = [i + 1 for i, a in enumerate(acc) if a is not None]
            ax.plot(xs, [a for a in acc if a is not None], marker="o", label=m)
            drew = True
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance (accepted / drafted at that position)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position")
    if drew:
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no drafting method reported counts", ha="center", va="center", transform=ax.transAxes)
    write_atomic(out / PLOTS[0], _png(fig))
    plt.close(fig)
    written.append(PLOTS[0])

    methods = [m for m in s["methods"] if m != BASELINE]
    groups = s["categories"] + ["overall"]
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.4, 1.0 + len(groups) * (0.4 + 0.15 * len(methods)))), 4.5))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        vals = [s["by_category"][m][c]["speedup"] for c in s["categories"]] + [s["overall"][m]["speedup"]]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("speedup over autoregressive")
    ax.set_title("Speedup by category (1.0 = autoregressive)")
    if methods:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    write_atomic(out / PLOTS[1], _png(fig))
    plt.close(fig)
    written.append(PLOTS[1])

    if s.get("sweep"):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for j, (base, e) in enumerate(s["sweep"].items()):
            colour = f"C{j}"
            pts = [(k, v) for k, v in zip(e["k"], e["speedup"]) if v is not None and isinstance(k, int)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=f"{base} measured")
            for k, v in zip(e["k"], e["speedup"]):
                if k == "auto" and v is not None:
                    ax.axhline(v, color=colour, linewidth=1.0, linestyle="-.", label=f"{base} k=auto")
            if pts and e["pooled_alpha"] is not None and e["pooled_c"] is not None:
                ks = list(range(1, max(p[0] for p in pts) + 1))
                ax.plot(ks, [expected_speedup(e["pooled_alpha"], k, e["pooled_c"]) for k in ks], "--", color=colour,
                        label=f"{base} theory (α={e['pooled_alpha']:.2f}, c={e['pooled_c']:.2f})")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("draft length k")
        ax.set_ylabel("speedup over autoregressive")
        ax.set_title("Speedup vs draft length")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
        write_atomic(out / SWEEP_PLOT, _png(fig))
        plt.close(fig)
        written.append(SWEEP_PLOT)

        fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
        for j, (base, e) in enumerate(s["sweep"].items()):
            colour = f"C{j}"
            pts = sorted((z, v, p, t) for z, v, p, t in zip(e["size"], e["speedup"], e["predicted"], e["tau"])
                         if z is not None and v is not None)
            if not pts:
                continue
            sizes = [p[0] for p in pts]
            left.plot(sizes, [p[1] for p in pts], "o-", color=colour, label=f"{base} measured")
            if all(p[2] is not None for p in pts):
                left.plot(sizes, [p[2] for p in pts], "x--", color=colour, label=f"{base} cost model")
            right.plot(sizes, [p[3] for p in pts], "o-", color=colour, label=base)
        left.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        left.set_xlabel("draft size per step (tree nodes)")
        left.set_ylabel("speedup over autoregressive")
        left.set_title("Speedup vs tree size")
        left.legend(fontsize="small")
        right.set_xlabel("draft size per step (tree nodes)")
        right.set_ylabel("tau (tokens per target forward)")
        right.set_title("tau vs tree size")
        right.legend(fontsize="small")
        write_atomic(out / TREE_PLOT, _png(fig))
        plt.close(fig)
        written.append(TREE_PLOT)
    return written


def write_reports(out: Path, report: dict[str, Any]) -> None:
    plt = _pyplot()
    if plt is None:
        old = [name for name in (*PLOTS, SWEEP_PLOT, TREE_PLOT) if (out / name).exists()]
        reason = NO_MATPLOTLIB
        if old:
            reason += f" ({', '.join(old)} in this folder are from an earlier run, not this summary)"
        report["plots"], report["plots_skipped"] = [], reason
        print(f"outrider bench: no plots: {reason}", file=sys.stderr)
    else:
        report["plots"] = write_plots(out, report, plt)
        report.pop("plots_skipped", None)
    write_atomic(out / "summary.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "summary.md", format_markdown(report))
