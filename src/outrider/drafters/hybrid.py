"""A self-drafting head and SuffixDecoding in one drafter (the pairing Arctic Inference serves).

The two are good at different text. A head predicts what the target says next from its hidden
states, wherever the text goes; suffix tries predict text that repeats what came before (the
prompt being summarised or quoted, a list that repeats its shape, earlier outputs), and there
they draft long and exactly, for no forward at all. Each step the suffix tries propose a tree
(~30 µs, no forward); when its expected accepted length (the sum of its path scores) reaches
`min_value`, that tree is the draft, else the head drafts, and under greedy decoding the tries'
tree rides along as more branches of the head's (tree.merge_trees: no forward, only its rows in
the verify forward). On the suffix's steps the head only keeps the target's new hidden states; it
reads them all, in one pass, the next time it drafts, so its cache stays whole and a step it does
not draft costs it nothing.

Lossless: under sampling a step's draft is wholly one drafter's (suffix trees are deterministic,
probs None; the head's samples carry q); a merged tree is greedy only, where both are
deterministic. The choice reads only the committed tokens, never a random draw.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor

from outrider.drafters.base import BuildContext, Draft, DraftStep, register
from outrider.drafters.eagle import EagleDrafter
from outrider.drafters.suffix import SuffixDrafter
from outrider.tree import merge_trees


@register("eagle+suffix")
class HeadWithSuffix:
    uses_draft_model: ClassVar[bool] = False
    uses_head: ClassVar[bool] = True
    reads_datastore: ClassVar[bool] = True  # its suffix drafter's (from_pretrained(datastore=...))
    head_method: ClassVar[str] = "eagle"  # the head folder it reads (`outrider train drafter --method eagle`)
    stops_on_confidence: ClassVar[bool] = True  # the head's drafts stop per token under k="auto"
    default_k: ClassVar[int] = EagleDrafter.default_k
    batches: ClassVar[bool] = True  # the heads propose together (propose_rows), the tries per row

    def __init__(self, head: EagleDrafter, suffix: SuffixDrafter, min_value: float = 1.0, merge: bool = True) -> None:
        if not min_value > 0:
            raise ValueError(f"min_value={min_value} is invalid: it is an expected number of accepted tokens, use > 0")
        self.head, self.suffix, self.min_value = head, suffix, min_value
        # Greedy steps the head drafts also verify the tries' tree, as more branches of one tree.
        self.merge = merge
        self.hidden_layers = head.hidden_layers
        self.k = head.k
        self.chose_suffix = 0  # steps drafted by the suffix tries (the rest: the head)

    @classmethod
    def build(cls, ctx: BuildContext) -> HeadWithSuffix:
        # Its own tree size and depth; a datastore when the decoder was given one.
        suffix = SuffixDrafter.build(BuildContext(ctx.target, None, None, datastore=ctx.datastore))
        return cls(EagleDrafter.build(ctx), suffix)

    def begin(self, prompt: Tensor) -> None:
        self.head.begin(prompt)
        self.suffix.begin(prompt)

    @classmethod
    def join_rows(cls, drafters: list[HeadWithSuffix]) -> Callable[[int], None]:
        """A batch's rows share one head runner (EagleDrafter.join_rows); each keeps its own tries."""
        return EagleDrafter.join_rows([d.head for d in drafters])

    @classmethod
    def propose_rows(cls, drafters: list[HeadWithSuffix], steps: list[DraftStep]) -> list[Draft]:
        """Every row's proposal at once (EagleDrafter.propose_rows): the tries per row first
        (~30 µs, no forward), so each head knows whether it drafts; then the heads of all rows read
        together and those that draft, draft together."""
        scored = [d.suffix.propose_scored(st) for d, st in zip(drafters, steps)]
        wants = [value < d.min_value for d, (_, value) in zip(drafters, scored)]
        heads = EagleDrafter.propose_rows([d.head for d in drafters], steps, wants)
        out = []
        for d, st, head, (tree, _), want in zip(drafters, steps, heads, scored, wants):
            d.chose_suffix += not want
            if not want:
                out.append(tree)
            elif d.merge and st.sampling.greedy and tree.size:
                out.append(_merged(head, tree))
            else:
                out.append(head)
        return out

    def propose(self, step: DraftStep) -> Draft:
        return self.propose_rows([self], [step])[0]

    def update(self, path: list[int]) -> None:
        self.head.update(path)
        self.suffix.update(path)

    def finish(self, tokens: Tensor | None = None) -> None:
        self.suffix.finish(tokens)

    def probe(self) -> None:
        self.head.probe()


def _merged(head: Draft, tree: Draft) -> Draft:
    """The head's draft with the tries' tree as more branches (greedy: both are deterministic).
    The tries' nodes cost no forward, only their rows in the verify forward; they come after the
    head's, whose confidences they leave as they are (None for the tries' own: adaptive k
    calibrates the head's acceptance, not theirs)."""
    n = head.size
    tokens, parents = merge_trees(head.tokens.tolist(), _parents(head), tree.tokens.tolist(), _parents(tree))
    if len(tokens) == n:
        return head
    both = torch.tensor([tokens, parents], dtype=torch.long).to(head.tokens.device)
    conf = head.confidences + [None] * (len(tokens) - n) if head.confidences is not None else None
    return Draft(both[0], None, conf, parents=both[1], forwards=head.forwards)


def _parents(draft: Draft) -> list[int]:
    """A draft's parents as a list (a chain's are [-1, 0, 1, ...])."""
    return draft.parents.tolist() if draft.parents is not None else list(range(-1, draft.size - 1))
