"""Chat instructions made offline, for self-distilling a drafter for an instruction model.

A head drafts what the target says in answers, so it should train on answers. Without a download,
the requests come from the Python standard library's own docstrings (read with `ast`, never
imported) set into templates of the kinds users send: code, explanations, summaries, lists,
translations, arithmetic, general questions. Files are split by the corpus' stable hash, so
held-out instructions come from files that training never saw. Spec-Bench stays a test set.

Long requests (`make_long_instructions`) carry a passage of 1,200-3,600 characters (300-900 tokens):
the reference topics of `pydoc_data` and long module docstrings, to summarize, answer questions on,
extract from or rewrite. Summaries, retrieval answers and extraction quote their prompt, far into
it: a head trained only on short prompts never attends that far.
"""

from __future__ import annotations

import ast
import functools
import random
from dataclasses import dataclass

from outrider.train.corpus import is_heldout, list_files, stdlib_root

HELDOUT_FRACTION = 0.1

TOPICS = (
    "photosynthesis", "the water cycle", "compound interest", "black holes", "the French Revolution",
    "machine learning", "vaccines", "climate change", "the stock market", "plate tectonics", "democracy",
    "the immune system", "renewable energy", "the Roman Empire", "quantum computing", "inflation",
    "sleep", "the internet", "volcanoes", "exercise", "recycling", "the moon landing", "DNA",
    "electric cars", "the printing press", "bees", "time management", "public speaking", "gardening",
    "the human heart", "earthquakes", "coffee", "chess", "the Olympic Games", "rainbows", "gravity",
    "the Renaissance", "meditation", "cloud computing", "supply and demand", "tides", "antibiotics",
    "the solar system", "saving money", "learning a language", "job interviews", "healthy eating",
    "open source software", "encryption", "the Great Wall of China", "electricity", "evolution",
)
PEOPLE = ("my manager", "a new colleague", "my landlord", "a customer", "my teacher", "the team", "a friend")
EVENTS = ("a delayed project", "a meeting next week", "a broken heater", "a refund", "a holiday plan",
          "a new product launch", "a team dinner")
LANGUAGES = ("French", "Spanish", "German", "Italian")


@dataclass(frozen=True)
class Docs:
    """What the templates draw on: function summaries and module paragraphs of some stdlib files."""

    functions: list[tuple[str, str]]  # (qualified name, first docstring line)
    paragraphs: list[str]
    modules: list[str]  # whole module docstrings (the long requests' passages)


@functools.cache  # parses every stdlib file: once per process (train and held-out sets both ask)
def read_docs(heldout: bool) -> Docs:
    root = stdlib_root()
    functions: list[tuple[str, str]] = []
    paragraphs: list[str] = []
    modules: list[str] = []
    for path in list_files(root):
        rel = path.relative_to(root).as_posix()
        if is_heldout(rel, HELDOUT_FRACTION) != heldout or "test" in rel or rel.startswith("idlelib"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or in other encodings: skip them
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        doc = ast.get_docstring(tree) or ""
        modules.append(doc)
        paragraphs += [p.strip() for p in doc.split("\n\n") if 200 <= len(p.strip()) <= 900 and "  " not in p]
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                line = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
                if 20 <= len(line) <= 120 and line[0].isupper() and line.endswith("."):
                    functions.append((f"{module}.{node.name}", line))
    return Docs(functions, paragraphs, modules)


LONG_PASSAGE = (1200, 3600)  # characters of a long request's passage


@functools.cache
def read_sources(heldout: bool) -> list[list[str]]:
    """Long texts as lists of paragraphs: the pydoc_data reference topics (split by topic name's
    hash) and module docstrings of at least LONG_PASSAGE[0] characters (by file)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without its docs data: module docstrings alone
        topics = {}
    texts = [topics[name] for name in sorted(topics) if is_heldout(f"pydoc_data/{name}", HELDOUT_FRACTION) == heldout]
    texts += read_docs(heldout).modules
    sources = [[p.strip() for p in text.split("\n\n") if p.strip()] for text in texts]
    return [paras for paras in sources if sum(len(p) for p in paras) >= LONG_PASSAGE[0]]


def passage(rng: random.Random, sources: list[list[str]]) -> str:
    """Consecutive paragraphs of one source from a random one on, until a random length in
    LONG_PASSAGE is reached (cut at a paragraph; at most LONG_PASSAGE[1] characters)."""
    lo, hi = LONG_PASSAGE
    paras = rng.choice(sources)
    want = rng.randint(lo, hi)
    start = rng.randrange(len(paras))
    text = ""
    for para in paras[start:] + paras[:start]:  # wrap around: a late start still reaches the length
        if text and len(text) + len(para) > hi:
            break
        text = f"{text}\n\n{para}" if text else para[:hi]
        if len(text) >= want:
            break
    return text


def make_long_instructions(n: int, heldout: bool, seed: int) -> list[str]:
    """n requests carrying a long passage (seeded; held-out ones from other topics and files)."""
    sources = read_sources(heldout)
    if not sources:
        raise ValueError("this Python has no long docs (pydoc_data, module docstrings) to build long requests from")
    rng = random.Random(f"long-{seed}-{heldout}")
    kinds = [
        lambda p: "Summarize the following text in {} sentences:\n\n{}".format(rng.choice(("two", "three", "four")), p),
        lambda p: "{}\n\nWhat is the main point of the text above? Answer briefly.".format(p),
        lambda p: "Read the document and answer the question.\n\nDocument: {}\n\nQuestion: {}".format(
            p, rng.choice(("What does the document explain?", "Which terms does the document define?",
                           "What should a programmer be careful about, according to the document?",
                           "Give an example of what the document describes."))),
        lambda p: "Extract the key terms from this document as a bulleted list:\n\n" + p,
        lambda p: "Rewrite the following text in plain language for a beginner:\n\n" + p,
        lambda p: "{}\n\nWrite three questions a student might ask about this text, with their answers.".format(p),
    ]
    return [rng.choice(kinds)(passage(rng, sources)) for _ in range(n)]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def make_instructions(n: int, heldout: bool, seed: int) -> list[str]:
    """n varied requests (seeded; the held-out set comes from other files and another seed stream)."""
    docs = read_docs(heldout)
    if not docs.functions or not docs.paragraphs:
        raise ValueError("the standard library of this Python has no docstrings to build instructions from")
    rng = random.Random(f"{seed}-{heldout}")
    kinds = [
        lambda: "Write a Python function to {}".format(_lower_first(rng.choice(docs.functions)[1])),
        lambda: "Explain what `{}` does in Python, with a short example.".format(rng.choice(docs.functions)[0]),
        lambda: "Summarize the following text in two sentences:\n\n" + rng.choice(docs.paragraphs),
        lambda: "Translate into {}: {}".format(rng.choice(LANGUAGES), rng.choice(docs.functions)[1]),
        lambda: "List {} interesting facts about {}.".format(rng.choice(("three", "four", "five")), rng.choice(TOPICS)),
        lambda: "Explain {} to a ten-year-old.".format(rng.choice(TOPICS)),
        lambda: "What are the pros and cons of {}?".format(rng.choice(TOPICS)),
        lambda: "Write a short email to {} about {}.".format(rng.choice(PEOPLE), rng.choice(EVENTS)),
        lambda: "Write a short poem about {}.".format(rng.choice(TOPICS)),
        lambda: "What is {} * {} + {}? Show your steps.".format(rng.randint(2, 99), rng.randint(2, 99),
                                                              rng.randint(1, 999)),
        lambda: "A shop sells pens at ${} each. How much do {} pens cost? Explain.".format(rng.randint(1, 9),
                                                                                          rng.randint(2, 40)),
        lambda: "Give me {} tips for {}.".format(rng.choice(("three", "five")), rng.choice(TOPICS)),
    ]
    return [rng.choice(kinds)() for _ in range(n)]
