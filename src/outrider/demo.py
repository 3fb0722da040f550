"""`outrider demo`: the embedded pair completing code, drafted tokens shown, then a measured table.

Every method decodes the same prompts in the same run, interleaved prompt by prompt after a
warm-up, so the speedups are ratios measured here and now, never assumed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from outrider.decoder import SpeculativeDecoder
from outrider.render import legend, render_chunk, wants_colour
from outrider.stats import SpecStats

DEMO_PROMPTS = (
    "def fibonacci(n):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def read_config(path):\n    with open(path) as f:\n",
)
METHODS = ("autoregressive", "draft_model", "prompt_lookup", "suffix")  # and eagle where a head is at hand


@dataclass
class DemoRow:
    method: str
    stats: SpecStats
    same_as_autoregressive: bool

    @property
    def tokens_per_s(self) -> float:
        return self.stats.tokens_per_s


def eagle_head(target: str | Path | None, head: str | Path | None) -> Path | None:
    """The EAGLE head to show: the one given, else the embedded target's own if it is shipped."""
    if head is not None:
        return Path(head)
    from outrider.decoder import embedded_pair_dir

    shipped = embedded_pair_dir() / "eagle"
    return shipped if target is None and (shipped / "eagle_config.json").is_file() else None


def load_decoders(target: str | Path | None, draft: str | Path | None, k: int | None,
                  dtype: str | None, head: str | Path | None = None) -> dict[str, SpeculativeDecoder]:
    """One decoder per method; the target is loaded once per method (each needs its own cache)."""
    out = {}
    head_dir = eagle_head(target, head)
    for method in METHODS + (("eagle",) if head_dir is not None else ()):
        out[method] = SpeculativeDecoder.from_pretrained(
            target, draft=draft if method == "draft_model" else head_dir if method == "eagle" else None,
            method=method, k=k if method == "draft_model" else None, dtype=dtype,
        )
    return out


def measure(decoders: dict[str, SpeculativeDecoder], prompts: tuple[str, ...], max_new_tokens: int) -> list[DemoRow]:
    for dec in decoders.values():  # warm-up: first calls pay one-off allocation costs
        dec.generate(prompts[0], max_new_tokens=8)
    totals = {m: SpecStats() for m in decoders}
    outputs: dict[str, list[list[int]]] = {m: [] for m in decoders}
    for prompt in prompts:  # interleaved: machine drift hits every method alike
        for method, dec in decoders.items():
            res = dec.generate(prompt, max_new_tokens=max_new_tokens)
            totals[method] = totals[method].merge(res.stats)
            outputs[method].append(res.token_ids)
    ref = outputs["autoregressive"]
    return [DemoRow(m, totals[m], outputs[m] == ref) for m in decoders]


def format_table(rows: list[DemoRow]) -> str:
    base = next(r.tokens_per_s for r in rows if r.method == "autoregressive")
    lines = [
        f"{'method':16} {'tokens/s':>9} {'speedup':>8} {'tau':>6} {'alpha':>6}  same output as autoregressive",
    ]
    for r in rows:
        alpha = f"{r.stats.alpha:6.2f}" if r.stats.drafted else f"{'-':>6}"
        lines.append(
            f"{r.method:16} {r.tokens_per_s:9.1f} {r.tokens_per_s / base:7.2f}x {r.stats.tau:6.2f} {alpha}  "
            f"{'yes' if r.same_as_autoregressive else 'NO'}"
        )
    return "\n".join(lines)


def run_demo(
    target: str | Path | None = None,
    draft: str | Path | None = None,
    *,
    k: int | None = None,
    max_new_tokens: int = 96,
    dtype: str | None = None,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    show: bool = True,
    out: TextIO | None = None,
    head: str | Path | None = None,
) -> list[DemoRow]:
    out = out or sys.stdout
    decoders = load_decoders(target, draft, k, dtype, head)
    spec = decoders["draft_model"]
    model_name = spec.target.name
    print(f"outrider demo: target {model_name}", file=out)
    if show:
        colour = wants_colour(out)
        k_shown = "auto" if spec.adaptive is not None else spec.k
        print(f"Completing {len(prompts)} code prompts with draft_model (k={k_shown}) "
              f"{legend(colour)}\n", file=out)
        for prompt in prompts:
            out.write("-" * 60 + "\n" + prompt)
            for chunk in spec.stream(prompt, max_new_tokens=max_new_tokens):
                out.write(render_chunk(chunk, colour))
                out.flush()
            out.write("\n")
        out.write("-" * 60 + "\n\n")
    print(f"Measuring: {len(prompts)} prompts x {max_new_tokens} new tokens, greedy, methods interleaved, "
          "after warm-up ...", file=out)
    rows = measure(decoders, prompts, max_new_tokens)
    print(format_table(rows), file=out)
    print(
        "\ntokens/s counts prefill and decode time; speedup = tokens/s / autoregressive tokens/s in this run; "
        "tau = tokens committed per target forward; alpha = accepted / drafted.",
        file=out,
    )
    return rows
