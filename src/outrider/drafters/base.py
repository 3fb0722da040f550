"""The drafter protocol, its step inputs, and the registry that the decoder and CLI read.

A drafter proposes a draft tree of at most k nodes after the committed sequence (a chain is the
tree whose parents are [-1, 0, 1, ...]; see tree.py). Two methods carry a sequence: `propose`
(given the committed tokens, return a Draft) and `update` (after verification, the accepted path,
so state such as a KV cache keeps exactly the committed tokens). `begin` starts a new sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from outrider.sampling import SamplingParams

if TYPE_CHECKING:
    from outrider.adaptive import AdaptiveK
    from outrider.models import LoadedModel


@dataclass
class DraftStep:
    """What a drafter sees at one step."""

    tokens: torch.Tensor  # (n,) long, CPU: the committed sequence, prompt + generated so far
    k: int  # propose at most k tokens (>= 1): the draft length of a chain, the size of a tree
    sampling: SamplingParams
    generator: torch.Generator | None
    # With k="auto": the policy that drafters reporting confidences consult, token by token
    # (keep_drafting: False ends a chain early) or for a tree's size (tree_size). None: use k.
    adaptive: AdaptiveK | None = None
    # For drafters with `hidden_layers` (self-drafting heads): the target's hidden states of those
    # layers, (L, m, D), for the m committed tokens whose states were computed since the last
    # proposal (the prompt's but its last token at the first), in sequence order. The last
    # committed token's state is not known yet: the target computes it with the next draft.
    hidden: torch.Tensor | None = None


@dataclass
class Draft:
    """A draft tree (tree.py): node i holds tokens[i] and follows node parents[i] (-1: the last
    committed token). parents None means a chain, [-1, 0, 1, ...].

    How a node's children were chosen decides how they are verified (verify.py):
    - probs given: each child was *sampled* from q = probs[child] (siblings share that row), the
      siblings independently in order (SpecInfer's multi-round rule verifies them; a sibling may
      repeat an earlier one's token). Whether a node gets children, and how many draws, may depend
      on the node and its ancestors, never on the drawn children themselves.
    - probs None: the children were chosen *deterministically* from the history (top-k of q, an
      n-gram match): verified without replacement, q one-hot on each child.
    """

    tokens: torch.Tensor  # (d,) long, d <= k, on the target's device
    # (d, V) float32: q, the distribution each token was drawn from, over the target's vocabulary
    # width V. None for deterministic drafters (q is one-hot) and under greedy decoding.
    probs: torch.Tensor | None = None
    # The drafter's probability of each token it drafted (q(x) sampled, max q greedy), for
    # drafters that set stops_on_confidence; adaptive k calibrates acceptance against it. None for
    # a node another drafter added (eagle+suffix's merged trees).
    confidences: list[float | None] | None = None
    parents: torch.Tensor | None = None  # (d,) long, topological (parents[i] < i); None: a chain
    forwards: int = 0  # draft-model forwards this proposal took (the d of the cost model; 0: model-free)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_chain(self) -> bool:
        return self.parents is None


@dataclass
class BuildContext:
    """What the registry hands a drafter class to build itself from loaded models."""

    target: LoadedModel
    draft: LoadedModel | None
    k: int | None
    width: int | None = None  # children per expanded tree node (1: a chain; None: the drafter's default)
    draft_path: Path | None = None  # a trained head's folder, for drafters with uses_head (eagle)
    datastore: Any = None  # a Datastore (drafters/datastore.py), for drafters with reads_datastore


@runtime_checkable
class Drafter(Protocol):
    def begin(self, prompt: torch.Tensor) -> None:
        """Start a new sequence; prompt (n,) long, CPU."""
        ...

    def propose(self, step: DraftStep) -> Draft: ...

    def update(self, path: list[int]) -> None:
        """The last draft's nodes on the accepted path, root first (for a chain: 0..accepted-1);
        they are now committed, followed by one recovered or bonus token."""
        ...

    # Optional: `finish(tokens)` with the final committed sequence (n,) when a generation ends, for
    # drafters that learn from whole outputs (suffix); the decoder calls it when it is defined.
    # Optional: `hidden_layers` (tuple of target layer indices, see models/base.py): the decoder
    # then makes the target capture them and passes them in DraftStep.hidden.


class DrafterClass(Protocol):
    name: ClassVar[str]
    uses_draft_model: ClassVar[bool]
    default_k: ClassVar[int]
    # Reports Draft.confidences and honours DraftStep.keep_drafting (k="auto" then stops per token).
    stops_on_confidence: ClassVar[bool]

    @classmethod
    def build(cls, ctx: BuildContext) -> Drafter: ...


REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        assert name not in REGISTRY, f"drafter {name!r} registered twice"
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def drafter_class(method: str) -> type:
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}: use one of {sorted(REGISTRY)}")
    return REGISTRY[method]


def empty_draft(device: torch.device) -> Draft:
    return Draft(torch.empty(0, dtype=torch.long, device=device))
