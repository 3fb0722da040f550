"""Drafters, one file each, found by name through REGISTRY (the CLI reads it too)."""

from outrider.drafters import autoregressive, draft_model, eagle, hybrid, medusa, prompt_lookup, suffix  # noqa: F401  (register)
from outrider.drafters.autoregressive import Autoregressive
from outrider.drafters.base import REGISTRY, BuildContext, Draft, Drafter, DraftStep, drafter_class
from outrider.drafters.draft_model import DraftModel
from outrider.drafters.prompt_lookup import PromptLookup
from outrider.drafters.suffix import SuffixDrafter

__all__ = [
    "REGISTRY",
    "Autoregressive",
    "BuildContext",
    "Draft",
    "DraftModel",
    "DraftStep",
    "Drafter",
    "PromptLookup",
    "SuffixDrafter",
    "drafter_class",
]
