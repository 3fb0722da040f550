"""Medusa-1 heads (Cai et al. 2024): one residual block per future position over the target's last
hidden state, each with an output layer over the reduced draft vocabulary (`d2t`).

The decoder hands a drafter the target's states of the committed tokens but the newest (that one
is scored with the next draft), so the last known state is that of token n-2: head i (i = 1..K)
reads it and predicts token n-1+i; the target's own next token, n-1, is already committed. The
heads do not see each other's tokens, so the draft tree is the product of each head's top-w_i
tokens (the same children under every node of a depth), cut to the `k` nodes most likely to be
accepted: a node's score is the product along its path of the acceptance of each head's rank, as
measured on held-out data when the heads were trained (stored with them). The shape is therefore
fixed, which keeps seeded sampling reproducible.

The children are chosen deterministically (top-w), so verification samples without replacement and
stays lossless under sampling.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register
from outrider.drafters.heads import fingerprint, load_head, refuse_other_target, save_head, target_embedding

CONFIG_NAME = "medusa_config.json"


@dataclass(frozen=True)
class MedusaConfig:
    target: str
    target_fingerprint: str
    target_layer: int  # hidden-state index read (models/base.py): the last, after the final norm
    target_hidden: int
    vocab_size: int
    draft_vocab: int
    num_heads: int  # K future positions
    widths: tuple[int, ...] = (3, 2, 2, 1)  # top-w per head in the draft tree (cut to k nodes)
    # acceptance[i][r]: held-out rate at which head i's rank-r token is the target's (None: 0.5^(r+1))
    acceptance: tuple[tuple[float, ...], ...] | None = None
    method: str = "medusa"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MedusaConfig:
        data = json.loads(text)
        data["widths"] = tuple(data["widths"])
        if data.get("acceptance") is not None:
            data["acceptance"] = tuple(tuple(row) for row in data["acceptance"])
        return cls(**data)


class MedusaHeads(nn.Module):
    def __init__(self, cfg: MedusaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, N = cfg.target_hidden, cfg.draft_vocab
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(cfg.num_heads))
        self.out = nn.ModuleList(nn.Linear(D, N, bias=False) for _ in range(cfg.num_heads))
        self.register_buffer("d2t", torch.arange(N), persistent=True)

    def forward(self, h: Tensor) -> Tensor:
        """Hidden states (..., D) -> logits (K, ..., N): head i's block is h + SiLU(W_i h + b_i)."""
        return torch.stack([out(h + F.silu(block(h))) for block, out in zip(self.blocks, self.out)])

    def save(self, path: Path) -> None:
        save_head(self, self.cfg.to_json(), path, CONFIG_NAME)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None) -> MedusaHeads:
        return load_head(path, CONFIG_NAME, "a Medusa heads", "medusa",
                         lambda text: cls(MedusaConfig.from_json(text)), dtype, device)


def new_heads(target_config: object, embed: Tensor, lm_head: Tensor, name: str, d2t: Tensor, num_heads: int = 4,
              widths: tuple[int, ...] = (3, 2, 2, 1)) -> MedusaHeads:
    """Heads for a target: blocks start at zero (each head first predicts what the target's own
    output layer does) and output layers at the target's rows for the draft vocabulary."""
    n_layers = getattr(target_config, "num_hidden_layers", None) or getattr(target_config, "n_layer")
    cfg = MedusaConfig(target=name, target_fingerprint=fingerprint(embed), target_layer=int(n_layers),
                       target_hidden=embed.shape[1], vocab_size=embed.shape[0], draft_vocab=int(d2t.shape[0]),
                       num_heads=num_heads, widths=tuple(widths[:num_heads]) + (1,) * max(0, num_heads - len(widths)))
    heads = MedusaHeads(cfg)
    with torch.no_grad():
        for block, out in zip(heads.blocks, heads.out):
            block.weight.zero_()
            block.bias.zero_()
            out.weight.copy_(lm_head[d2t].float())
        heads.d2t.copy_(d2t)
    return heads


@register("medusa")
class MedusaDrafter:
    uses_draft_model: ClassVar[bool] = False
    uses_head: ClassVar[bool] = True
    stops_on_confidence: ClassVar[bool] = False
    default_k: ClassVar[int] = 10  # tree nodes
    batches: ClassVar[bool] = True  # a batch's rows share the heads (join_rows) and run them at once (propose_rows)

    def __init__(self, heads: MedusaHeads, vocab_size: int, k: int = 10) -> None:
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        if heads.cfg.vocab_size != vocab_size:
            raise ValueError(
                f"the Medusa heads were trained for {heads.cfg.target!r} (vocabulary {heads.cfg.vocab_size}), not "
                f"for this target (vocabulary {vocab_size}): train heads for it with `outrider train drafter`"
            )
        self.heads = heads.eval()
        self.vocab_size = vocab_size
        self.k = k
        self.hidden_layers = (heads.cfg.target_layer,)
        self.device = heads.d2t.device
        self.dtype = next(heads.parameters()).dtype
        self._last: Tensor | None = None  # (D,) the newest known target state
        self._shapes: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def _run_rows(self, states: list[Tensor]) -> list[Tensor]:
        """The heads on several rows' newest states (D,) at once: logits (K, N) float32 per row."""
        return list(self.heads(torch.stack(states).to(self.dtype)).float().unbind(1))

    @classmethod
    def build(cls, ctx: BuildContext) -> MedusaDrafter:
        if ctx.draft_path is None:
            raise ValueError("method 'medusa' needs heads: pass draft=<folder written by `outrider train drafter`>")
        embed = target_embedding(ctx.target.model)
        heads = MedusaHeads.load(ctx.draft_path, dtype=embed.dtype, device=embed.device)
        refuse_other_target(heads.cfg, embed, f"the Medusa heads in {str(ctx.draft_path)!r} were trained",
                            ctx.target.name, "train heads for this target")
        return cls(heads, ctx.target.model.vocab_size, k=ctx.k or cls.default_k)

    def begin(self, prompt: Tensor) -> None:
        self._last = None

    @classmethod
    def join_rows(cls, drafters: list[MedusaDrafter]) -> Callable[[int], None]:
        """A batch's rows share one copy of the heads (propose_rows then runs them on all rows'
        newest states in one call). Returns a probe(rows) timing a call of `rows` rows."""
        first = drafters[0]
        for d in drafters:
            d.heads = first.heads

        @torch.inference_mode()
        def probe(rows: int) -> None:
            first._run_rows([torch.zeros(first.heads.cfg.target_hidden, dtype=first.dtype, device=first.device)] * rows)

        return probe

    def _shape(self, k: int) -> tuple[list[int], list[int], list[int]]:
        """The k best nodes of the product tree: (parents, head index, rank), topological."""
        if k in self._shapes:
            return self._shapes[k]
        cfg = self.heads.cfg
        K = cfg.num_heads
        acc = [list(row) for row in cfg.acceptance] if cfg.acceptance else \
            [[0.5 ** (r + 1) for r in range(w)] for w in cfg.widths]
        # Best-first over the product tree: a node is (score, depth, rank, parent node).
        nodes: list[tuple[float, int, int, int]] = []
        frontier = [(acc[0][r], 0, r, -1) for r in range(len(acc[0]))]
        while frontier and len(nodes) < k:
            frontier.sort(key=lambda t: -t[0])
            score, depth, rank, parent = frontier.pop(0)
            nodes.append((score, depth, rank, parent))
            me = len(nodes) - 1
            if depth + 1 < K:
                frontier += [(score * acc[depth + 1][r], depth + 1, r, me) for r in range(len(acc[depth + 1]))]
        self._shapes[k] = ([n[3] for n in nodes], [n[1] for n in nodes], [n[2] for n in nodes])
        return self._shapes[k]

    def propose(self, step: DraftStep) -> Draft:
        return self.propose_rows([self], [step])[0]

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, drafters: list[MedusaDrafter], steps: list[DraftStep]) -> list[Draft]:
        """Every row's proposal at once (a batch's drafters joined by join_rows, or one alone): the
        heads run once on all drafting rows' newest states."""
        ks = [d._budget(st) for d, st in zip(drafters, steps)]
        asked = [i for i, k in enumerate(ks) if k]
        out = [empty_draft(d.device) for d in drafters]
        if asked:
            logits = drafters[0]._run_rows([drafters[i]._last for i in asked])
            for i, lg in zip(asked, logits):
                out[i] = drafters[i]._draft(lg, ks[i])
        return out

    def _budget(self, step: DraftStep) -> int:
        """Take the newest target state; the tree size to draft (0: none)."""
        if step.hidden is not None and step.hidden.shape[1]:
            self._last = step.hidden[0, -1]
        return min(step.k, self.k) if self._last is not None else 0

    def _draft(self, logits: Tensor, k: int) -> Draft:
        """The k-node product tree (_shape) from the heads' logits (K, N)."""
        top = [torch.topk(logits[i], w).indices for i, w in enumerate(self.heads.cfg.widths)]
        parents, depth, rank = self._shape(k)
        d2t = self.heads.d2t
        tokens = torch.stack([d2t[top[d][r]] for d, r in zip(depth, rank)])
        return Draft(tokens, parents=torch.tensor(parents, device=self.device))

    def update(self, path: list[int]) -> None:
        pass  # stateless between steps: the next proposal reads the newest target state
