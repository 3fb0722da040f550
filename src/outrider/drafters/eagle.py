"""EAGLE-style self-drafting head (Li et al. 2024, 2025): a small network that reads the target's
own hidden states and drafts the next tokens.

Words: a *feature* f_j is the target's hidden states of token j at a low, a middle and a high
layer, fused by one linear layer (EAGLE-3). The head reads *pairs* (f_j, embedding of token j+1)
and predicts token j+2: one decoder layer of the target's family over the pairs (with its own KV
cache), a final norm, and an output layer over a **reduced draft vocabulary** (the N most frequent
target tokens; `d2t` maps draft index -> target id). Drafting further than one token, the head's
own output at the last pair stands in for the feature the target has not computed yet (training
unrolls the head the same way, so it learns from what it sees when drafting).

The token embeddings are the target's own, frozen and shared, never saved with the head.
Lossless under sampling: q is the head's distribution over the full vocabulary, zero outside the
reduced one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register
from outrider.drafters.heads import fingerprint, load_head, refuse_other_target, save_head, target_embedding
from outrider.sampling import probs_from_logits, sample

CONFIG_NAME = "eagle_config.json"
FEW_PAIRS = 8  # a runner pass over at most this many pairs uses the int8 weights (EagleRunner)


@dataclass(frozen=True)
class EagleConfig:
    """The head's shape and what it was trained for."""

    target: str  # the target's name (folder) when trained; shown when a head is refused
    target_fingerprint: str  # identifies the target's weights (see `fingerprint`)
    target_layers: tuple[int, ...]  # hidden-state indices read (models/base.py), low to high
    target_hidden: int  # the target's hidden size D_t
    vocab_size: int  # the target's vocabulary width V
    draft_vocab: int  # N: the reduced vocabulary
    hidden_size: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 4096
    method: str = "eagle"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EagleConfig:
        data = json.loads(text)
        data["target_layers"] = tuple(data["target_layers"])
        return cls(**data)


def default_layers(num_hidden_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high layers: outputs of layers 2, L/2 and L-1 (never the final,
    normed one, which the target's own output layer reads)."""
    low = min(2, num_hidden_layers)
    return (low, max(low, num_hidden_layers // 2), max(low, num_hidden_layers - 1))


def _rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (T, 1, head_dim) for positions (T,), sin carrying rotate_half's sign."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv[None]  # (T, hd/2)
    emb = torch.cat([freqs, freqs], -1)
    sin = emb.sin()
    sin[:, : head_dim // 2] = -sin[:, : head_dim // 2]
    return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


class EagleHead(nn.Module):
    """The trainable head. Shapes: D_t target hidden, D head hidden, N draft vocabulary."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, H, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.fuse = nn.Linear(len(cfg.target_layers) * cfg.target_hidden, D, bias=False)
        self.inp = nn.Linear(D + cfg.target_hidden, D, bias=False)  # [feature; token embedding]
        self.attn_norm = nn.Parameter(torch.ones(D))
        self.wqkv = nn.Linear(D, 3 * H * hd, bias=False)
        self.wo = nn.Linear(H * hd, D, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(D))
        self.w_gate_up = nn.Linear(D, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, D, bias=False)
        self.norm = nn.Parameter(torch.ones(D))
        self.lm_head = nn.Linear(D, cfg.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab), persistent=True)  # (N,) target ids

    def fuse_features(self, hidden: Tensor) -> Tensor:
        """Target hidden states (L, ..., D_t) of the chosen layers -> features (..., D)."""
        return self.fuse(torch.cat(list(hidden.unbind(0)), dim=-1))

    def block(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor | None, past_v: Tensor | None,
              mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The decoder layer over x (B, T, D) after cached keys/values (B, H, S, hd) (or none).
        mask (T, S + T) bool or None for causal attention among the T new pairs. Returns the
        output (B, T, D) and this call's keys and values (B, H, T, hd)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, hd = cfg.num_heads, cfg.head_dim
        q, k, v = self.wqkv(_rms(x, self.attn_norm, cfg.rms_norm_eps)).view(B, T, 3, H, hd).unbind(2)
        q, k = _apply_rope(q, cos, sin).transpose(1, 2), _apply_rope(k, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        v = v.transpose(1, 2)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and past_k is None)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, H * hd))
        gate, up = self.w_gate_up(_rms(x, self.mlp_norm, cfg.rms_norm_eps)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up), k, v

    def pairs(self, features: Tensor, token_embeds: Tensor) -> Tensor:
        """Input of the layer: [feature_j; embedding of token j+1] (..., D + D_t) -> (..., D)."""
        return self.inp(torch.cat([features, token_embeds], dim=-1))

    def logits(self, out: Tensor) -> Tensor:
        """Layer output (..., D) -> logits over the reduced vocabulary (..., N)."""
        return self.lm_head(_rms(out, self.norm, self.cfg.rms_norm_eps))

    # ---- saving ----------------------------------------------------------------------------

    def save(self, out: Path) -> None:
        save_head(self, self.cfg.to_json(), out, CONFIG_NAME)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None = None, device: torch.device | None = None) -> EagleHead:
        return load_head(path, CONFIG_NAME, "an EAGLE head", "eagle", lambda text: cls(EagleConfig.from_json(text)),
                         dtype, device)


def _rows(parts: list[Tensor]) -> Tensor:
    """The rows' tensors one after another; a single row's as it is (a drafting pass alone copies
    nothing)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class PairFeed:
    """One row's pairs for the head's layer (EagleRunner.run_rows): pair j is (its feature, the
    embedding of tokens[j]), written at cache position start + j of the row's slot."""

    slot: int
    start: int
    tokens: Tensor  # (T,) long: the token after each pair's feature
    states: Tensor  # (T, D) head outputs standing in for features; with fuse, (L, T, D_t) target states
    fuse: bool = False  # states are the target's: fuse them into features first
    mask: Tensor | None = None  # (T, start + T) bool; None: causal after the cache
    positions: Tensor | None = None  # (T,) RoPE positions; None: the cache positions
    logits: bool = False  # also return the reduced-vocabulary logits (N,) at the last pair


class EagleRunner:
    """The head's arithmetic for `slots` sequences: its weights packed once, RoPE tables, and per
    slot a KV cache and the head's output at every position. run_rows feeds several rows' pairs in
    one pass: every matmul over all rows' pairs at once (the weights are read once for all rows),
    attention per row over its own slot (so no row sees another)."""

    def __init__(self, head: EagleHead, embed: Tensor, slots: int = 1) -> None:
        cfg = head.cfg
        self.head, self.embed, self.slots = head, embed, slots
        self.device = embed.device
        self.dtype = next(head.parameters()).dtype
        H, hd, cap = cfg.num_heads, cfg.head_dim, cfg.max_positions
        self.k_cache = torch.zeros(slots, H, cap, hd, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(slots, H, cap, hd, dtype=self.dtype, device=self.device)
        self.outs = torch.zeros(slots, cap, cfg.hidden_size, dtype=self.dtype, device=self.device)
        self._cos, self._sin = _rope(torch.arange(cap, device=self.device), hd, cfg.rope_theta, self.dtype)
        # Drafting runs a few pairs at a time. Where outrider's CPU kernels run (bf16 on a CPU),
        # every pass uses their matmul on the bf16 weights (models/kernels.py; a pass of SmolLM2's
        # head at one pair measured 1.4 ms, as fast as the int8 copies, and it drafts with the
        # trained weights rather than a rounding of them). Else bf16 weights packed once for oneDNN
        # where that works, plain F.linear where not, and a pass of at most FEW_PAIRS pairs (a
        # chain depth, a step's read) reads int8 copies: measured on SmolLM2's head, its six
        # matmuls take 0.5-0.8 ms at 1-2 pairs against 1.5-3.2 ms oneDNN-packed (half the bytes,
        # and a kernel made for few rows), even at 8 and 2.5x slower at 40. A draft is only a
        # proposal: the target's verification keeps outputs exact (greedy) and lossless (q is the
        # head's own distribution, as computed here).
        from outrider.models import kernels as kernel_lib
        from outrider.models.llama import _packed_linear, kernel_matmul, linear_packer, step_ops
        from outrider.models.quant import quant_linear, quant_works, quantize_int8

        weights = [w.detach() for w in (head.inp.weight, head.wqkv.weight, head.wo.weight, head.w_gate_up.weight,
                                        head.w_down.weight, head.lm_head.weight, head.fuse.weight)]
        self._fused = False
        if kernel_matmul(step_ops(self.dtype, self.device), (w.shape[1] for w in weights)):
            self._w = [kernel_lib.pack_linear(w) for w in weights]
            self._linear = lambda x, w: kernel_lib.linear(x, w, None)
            self._w_few, self._linear_few = self._w, self._linear
            # A pass (every drafting pass, a prompt's read, a batch's rows together) runs the head's
            # layer as one kernel call (kernels.decoder_layer_rows), as the target's layers do: the
            # ~20 small ops between the matmuls cost as much as the matmuls at one pair.
            self._fused = True
            self._norms = [p.detach().contiguous() for p in (head.attn_norm, head.mlp_norm, head.norm)]
            return
        pack = linear_packer(self.dtype, self.device)
        self._w = [pack(w) for w in weights] if pack else weights
        self._linear = (lambda x, w: _packed_linear(x, w, None)) if pack else (lambda x, w: F.linear(x, w))
        self._w_few, self._linear_few = self._w, self._linear
        if pack and quant_works("int8"):
            self._w_few = [quantize_int8(w) for w in weights]
            self._linear_few = lambda x, w: quant_linear(x, w, None)

    def _weights(self, pairs: int) -> tuple[list, Callable[[Tensor, Any], Tensor]]:
        """The weights and matmul for a pass over `pairs` pairs (int8 for few of them: __init__)."""
        return (self._w_few, self._linear_few) if pairs <= FEW_PAIRS else (self._w, self._linear)

    def logits(self, out: Tensor) -> Tensor:
        """Head outputs (..., D) -> reduced-vocabulary logits (..., N) (EagleHead.logits)."""
        w, lin = self._weights(out[..., 0].numel())
        return lin(_rms(out, self.head.norm, self.head.cfg.rms_norm_eps), w[5])

    def _rope_rows(self, f: PairFeed, T: int) -> tuple[Tensor, Tensor]:
        if f.positions is None:
            return self._cos[f.start : f.start + T], self._sin[f.start : f.start + T]
        return self._cos[f.positions], self._sin[f.positions]

    def _run_fused(self, feeds: list[PairFeed], sizes: list[int]) -> list[tuple[Tensor, Tensor | None]]:
        """run_rows with outrider's kernels: the head's layer, its attention and norms computed by
        the kernels (models/kernels.py), in one call for all rows (kernels.decoder_layer_rows), so
        a row's outputs in a batch's pass are bit for bit its outputs alone."""
        from outrider.models import kernels as kernel_lib

        cfg = self.head.cfg
        w_inp, w_qkv, w_o, w_gu, w_down, w_lm, w_fuse = self._w
        attn_norm, mlp_norm, norm = self._norms
        feats = [f.states.to(self.dtype) for f in feeds]
        for i, f in enumerate(feeds):
            if f.fuse:
                feats[i] = kernel_lib.linear(torch.cat(list(feats[i].unbind(0)), -1), w_fuse, None)
        tokens = _rows([f.tokens for f in feeds])
        x = kernel_lib.linear(torch.cat([_rows(feats), F.embedding(tokens.to(self.device), self.embed)], -1), w_inp, None)
        ropes = [self._rope_rows(f, T) for f, T in zip(feeds, sizes)]
        cos, sin = _rows([c for c, _ in ropes]), _rows([s for _, s in ropes])
        out = kernel_lib.decoder_layer_rows(
            x, attn_norm, w_qkv, None, w_o, None, mlp_norm, w_gu, None, w_down, None, self.k_cache, self.v_cache,
            cos.contiguous(), sin.contiguous(), [f.slot for f in feeds], [f.start for f in feeds], sizes,
            [f.mask for f in feeds], cfg.num_heads, cfg.rms_norm_eps)
        outs = out.split(sizes)
        for f, o in zip(feeds, outs):
            self.outs[f.slot, f.start : f.start + o.shape[0]] = o
        logits: list[Tensor | None] = [None] * len(feeds)
        want = [i for i, f in enumerate(feeds) if f.logits]
        if want:  # the output layer once for all rows that asked
            last = kernel_lib.rms_norm(torch.stack([outs[i][-1] for i in want]), norm, cfg.rms_norm_eps)
            for i, lg in zip(want, kernel_lib.linear(last, w_lm, None).float().unbind(0)):
                logits[i] = lg
        return list(zip(outs, logits))

    @torch.inference_mode()
    def run_rows(self, feeds: list[PairFeed]) -> list[tuple[Tensor, Tensor | None]]:
        """Each feed's head outputs (T, D) and, when it asks, its last pair's logits (N,) float32."""
        cfg = self.head.cfg
        H, hd, eps, cap = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.max_positions
        sizes = [int(f.tokens.shape[0]) for f in feeds]
        for f, T in zip(feeds, sizes):
            if f.start + T > cap:
                raise ValueError(f"the EAGLE head holds {cap} positions; the sequence needs {f.start + T}")
        if self._fused:
            return self._run_fused(feeds, sizes)
        weights, lin = self._weights(sum(sizes))
        w_inp, w_qkv, w_o, w_gu, w_down = weights[:5]
        feats = [f.states for f in feeds]
        fused = [i for i, f in enumerate(feeds) if f.fuse]
        if fused:  # EagleHead.fuse_features, for all rows' target states in one matmul
            states = torch.cat([torch.cat(list(feeds[i].states.to(self.dtype).unbind(0)), -1) for i in fused])
            for i, part in zip(fused, lin(states, weights[6]).split([sizes[i] for i in fused])):
                feats[i] = part
        tokens = torch.cat([f.tokens for f in feeds]).to(self.device)
        x = lin(torch.cat([torch.cat(feats), F.embedding(tokens, self.embed)], dim=-1), w_inp)  # EagleHead.pairs
        # The head's block (EagleHead.block), keys and values written into each row's slot.
        q, k, v = lin(_rms(x, self.head.attn_norm, eps), w_qkv).view(-1, 3, H, hd).unbind(1)  # (N, H, hd) each
        ys = []
        for f, qi, ki, vi in zip(feeds, q.split(sizes), k.split(sizes), v.split(sizes)):
            T, start = qi.shape[0], f.start
            end = start + T
            cos, sin = self._rope_rows(f, T)
            mask = f.mask
            if mask is None and T > 1:
                ar = torch.arange(end, device=self.device)
                mask = ar[None, :] <= ar[start:end, None]  # (T, end) causal after the cache
            self.k_cache[f.slot, :, start:end] = _apply_rope(ki, cos, sin).transpose(0, 1)
            self.v_cache[f.slot, :, start:end] = vi.transpose(0, 1)
            y = F.scaled_dot_product_attention(_apply_rope(qi, cos, sin).transpose(0, 1)[None],
                                               self.k_cache[f.slot : f.slot + 1, :, :end],
                                               self.v_cache[f.slot : f.slot + 1, :, :end], attn_mask=mask)
            ys.append(y[0].transpose(0, 1).reshape(T, H * hd))
        x = x + lin(torch.cat(ys), w_o)
        gate, up = lin(_rms(x, self.head.mlp_norm, eps), w_gu).chunk(2, dim=-1)
        outs = list((x + lin(F.silu(gate) * up, w_down)).split(sizes))
        for f, o in zip(feeds, outs):
            self.outs[f.slot, f.start : f.start + o.shape[0]] = o
        logits: list[Tensor | None] = [None] * len(feeds)
        want = [i for i, f in enumerate(feeds) if f.logits]
        if want:  # the output layer (the head's largest matmul) once for all rows that asked
            for i, lg in zip(want, self.logits(torch.stack([outs[i][-1] for i in want])).float().unbind(0)):
                logits[i] = lg
        return list(zip(outs, logits))

    def probe_rows(self, rows: int) -> None:
        """One draft step for `rows` rows on scratch pairs (the batch gate times it; call it while
        the slots hold no sequence)."""
        D = self.head.cfg.hidden_size
        at = min(64, self.head.cfg.max_positions - 1)
        zero = torch.zeros(1, D, dtype=self.dtype, device=self.device)
        self.run_rows([PairFeed(s, at, torch.zeros(1, dtype=torch.long, device=self.device), zero, logits=True)
                       for s in range(rows)])


@register("eagle")
class EagleDrafter:
    uses_draft_model: ClassVar[bool] = False
    uses_head: ClassVar[bool] = True  # `draft` is a head folder written by `outrider train drafter`
    stops_on_confidence: ClassVar[bool] = True
    default_k: ClassVar[int] = 4
    # In a batch the rows share one EagleRunner, a slot each (join_rows), and propose together,
    # one head pass per depth for all rows (propose_rows).
    batches: ClassVar[bool] = True

    def __init__(self, head: EagleHead, embed: Tensor, target_vocab_size: int, k: int = 4, width: int = 1) -> None:
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        cfg = head.cfg
        if cfg.vocab_size != target_vocab_size or embed.shape != (cfg.vocab_size, cfg.target_hidden):
            raise ValueError(
                f"the EAGLE head was trained for {cfg.target!r} (vocabulary {cfg.vocab_size}, hidden "
                f"{cfg.target_hidden}), not for this target (embeddings {tuple(embed.shape)}): train a head "
                "for this target with `outrider train drafter`"
            )
        self.head = head.eval()
        self.embed = embed
        self.vocab_size = target_vocab_size
        self.k = k
        self.hidden_layers = cfg.target_layers
        self.device = embed.device
        self.dtype = next(head.parameters()).dtype
        self.runner, self.slot = EagleRunner(self.head, embed), 0
        self._pairs = 0  # pairs with the target's own features in the cache
        self._pending: list[Tensor] = []  # (L, m, D_t) target states handed over but not read yet
        self._last_out: Tensor | None = None  # (D,) head output at the last such pair
        self._last_logits: Tensor | None = None  # (N,) its logits: the root's children
        self.width = width
        self._grower = None
        if width > 1:  # EAGLE-2 trees: the draft model's tree growth over this head's pair positions
            from outrider.drafters.draft_model import DraftModel

            self._grower = DraftModel(_PairModel(self), target_vocab_size, k=k, width=width)

    def _run(self, feed: PairFeed) -> tuple[Tensor, Tensor | None]:
        return self.runner.run_rows([feed])[0]

    @classmethod
    def join_rows(cls, drafters: list[EagleDrafter]) -> Callable[[int], None]:
        """Make a batch's per-row drafters share one runner, a slot each (then propose_rows drafts
        for all of them at once). Returns a probe(rows) timing a draft step of `rows` rows."""
        runner = EagleRunner(drafters[0].head, drafters[0].embed, slots=len(drafters))
        for slot, d in enumerate(drafters):
            d.head, d.embed = runner.head, runner.embed  # one copy of the weights for all rows
            d.runner, d.slot = runner, slot
        return runner.probe_rows

    @classmethod
    def build(cls, ctx: BuildContext) -> EagleDrafter:
        if ctx.draft_path is None:
            raise ValueError("method 'eagle' needs a head: pass draft=<folder written by `outrider train drafter`>")
        model = ctx.target.model
        embed = target_embedding(model)
        head = EagleHead.load(ctx.draft_path, dtype=embed.dtype, device=embed.device)
        refuse_other_target(head.cfg, embed, f"the EAGLE head in {str(ctx.draft_path)!r} was trained",
                            ctx.target.name, "train a head for this target with `outrider train drafter`")
        width = ctx.width or 1
        return cls(head, embed, model.vocab_size, k=ctx.k or cls.default_k * width, width=width)

    def begin(self, prompt: Tensor) -> None:
        self._pairs = 0
        self._pending = []
        self._last_out = self._last_logits = None
        if self._grower is not None:
            self._grower.model.reset()

    def _q(self, logits: Tensor, step: DraftStep, confident: bool) -> tuple[Tensor, Tensor | None, float | None]:
        """Reduced logits (N,) -> (draft token id, q over the full vocabulary (V,) when sampling, and
        q of the token when `confident` asks for it: k="auto" reads it; otherwise it costs a
        softmax and a host sync per token for nothing)."""
        d2t = self.head.d2t
        if step.sampling.greedy:
            i = logits.argmax(-1)
            return d2t[i], None, float(logits.softmax(-1)[i]) if confident else None
        q_small = probs_from_logits(logits, step.sampling)
        i = sample(q_small, step.generator)
        q = torch.zeros(self.vocab_size, dtype=q_small.dtype, device=q_small.device)
        q[d2t] = q_small  # zero outside the reduced vocabulary: still a distribution over V
        return d2t[i], q, float(q_small[i]) if confident else None

    def propose(self, step: DraftStep) -> Draft:
        return self.propose_rows([self], [step])[0]

    def _read_feed(self, step: DraftStep, drafts: bool) -> PairFeed | None:
        """The pairs that feed the target's states of the newly committed tokens into the head's
        cache: (feature of token j, token j+1) for each new j. A step where the head does not draft
        (drafters/hybrid.py drafts from elsewhere then) only keeps the states: they are read with
        the next step's, in the same pass, when the head drafts again (a pass of m pairs reads the
        weights once, like a pass of one)."""
        if step.hidden is not None and step.hidden.shape[1]:
            self._pending.append(step.hidden)
        if not drafts or not self._pending:
            return None
        hidden = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, 1)  # joined once
        self._pending = []
        j0, m = self._pairs, hidden.shape[1]
        nxt = step.tokens[j0 + 1 : j0 + 1 + m].to(self.device)  # token j+1 of each pair j
        return PairFeed(self.slot, j0, nxt, hidden, fuse=True, logits=True)

    def _read_done(self, feed: PairFeed, out: Tensor, logits: Tensor | None) -> None:
        self._pairs += int(feed.tokens.shape[0])
        self._last_out, self._last_logits = out[-1], logits

    def _budget(self, step: DraftStep) -> int:
        k = min(step.k, self.k, self.head.cfg.max_positions - step.tokens.shape[0])
        return k if self._last_out is not None else 0

    def _tree(self, step: DraftStep, k: int) -> Draft:
        full = self._last_logits.new_full((self.vocab_size,), float("-inf"))
        full[self.head.d2t] = self._last_logits
        return self._grower.grow_tree(step, full, k)

    @classmethod
    @torch.inference_mode()
    def propose_rows(cls, drafters: list[EagleDrafter], steps: list[DraftStep],
                     wanted: list[bool] | None = None) -> list[Draft]:
        """Every row's proposal at once (a batch's drafters joined by join_rows, or one drafter
        alone): all rows' reads in one pass of the runner, then one pass per chain depth for the
        rows still drafting. Trees grow per row (their growth is the draft model's). Rows whose
        `wanted` is False keep their new states for a later read (drafters/hybrid.py)."""
        runner = drafters[0].runner
        wanted = wanted or [True] * len(drafters)
        feeds = [(i, d._read_feed(st, want)) for i, (d, st, want) in enumerate(zip(drafters, steps, wanted))]
        feeds = [(i, f) for i, f in feeds if f is not None]
        if feeds:
            for (i, f), (out, logits) in zip(feeds, runner.run_rows([f for _, f in feeds])):
                drafters[i]._read_done(f, out, logits)
        drafts: list[Draft | None] = [None] * len(drafters)
        chains = []
        for i, (d, st, want) in enumerate(zip(drafters, steps, wanted)):
            k = d._budget(st) if want else 0
            if k < 1:
                drafts[i] = empty_draft(d.device)
            elif d._grower is not None and k > 1:
                drafts[i] = d._tree(st, k)
            else:
                chains.append((i, k))
        if chains:
            got = _chains([drafters[i] for i, _ in chains], [steps[i] for i, _ in chains], [k for _, k in chains])
            for (i, _), draft in zip(chains, got):
                drafts[i] = draft
        return drafts  # type: ignore[return-value]

    def update(self, path: list[int]) -> None:
        # Drafted pairs sit past self._pairs in the cache and are overwritten next step.
        if self._grower is not None:
            self._grower.model.reset()

    @torch.inference_mode()
    def probe(self) -> None:
        """One draft step on a scratch pair (for cost calibration; the committed pairs are kept)."""
        D = self.head.cfg.hidden_size
        at = min(self._pairs + 64, self.head.cfg.max_positions - 1)
        self._run(PairFeed(self.slot, at, torch.zeros(1, dtype=torch.long, device=self.device),
                           torch.zeros(1, D, dtype=self.dtype, device=self.device), logits=True))


def _chains(drafters: list[EagleDrafter], steps: list[DraftStep], ks: list[int]) -> list[Draft]:
    """Chains drafted by several rows of one runner (after their reads), token by token: each
    depth's next pairs of all rows still drafting go through one run_rows. A row stops at its k,
    or where k="auto" says (keep_drafting)."""
    rows = []
    for d, st in zip(drafters, steps):
        keep = st.adaptive.keep_drafting if st.adaptive is not None else None
        rows.append({"tokens": [], "probs": [], "conf": [] if keep is not None else None, "keep": keep,
                     "logits": d._last_logits})
    live = list(range(len(drafters)))
    depth = 0
    while live:
        feeds, going = [], []
        for i in live:
            d, st, r = drafters[i], steps[i], rows[i]
            x, q, confidence = d._q(r["logits"], st, r["conf"] is not None)
            r["tokens"].append(x)
            if q is not None:
                r["probs"].append(q)
            if r["conf"] is not None:
                r["conf"].append(confidence)
            if depth + 1 == ks[i] or (r["conf"] is not None and not r["keep"](r["conf"])):
                continue
            # The next pair: the last output stands in for the feature of the token just drafted.
            prev = d.runner.outs[d.slot, d._pairs - 1 + depth]
            feeds.append(PairFeed(d.slot, d._pairs + depth, x.view(1), prev[None], logits=True))
            going.append(i)
        if feeds:
            for i, (_, logits) in zip(going, drafters[0].runner.run_rows(feeds)):
                rows[i]["logits"] = logits
        live, depth = going, depth + 1
    return [Draft(torch.stack(r["tokens"]), torch.stack(r["probs"]) if r["probs"] else None, r["conf"],
                  forwards=len(r["tokens"])) for r in rows]


def new_head(
    target_config: object, embed: Tensor, name: str, d2t: Tensor, layers: tuple[int, ...] | None = None,
    seed: int = 0, max_positions: int | None = None,
) -> EagleHead:
    """A freshly initialised head for a target (its transformers config and embeddings (V, D_t)),
    predicting the target ids `d2t` (N,); hidden and MLP sizes follow the target's."""
    D_t = embed.shape[1]
    heads = getattr(target_config, "num_attention_heads", None) or max(1, D_t // 64)
    head_dim = getattr(target_config, "head_dim", None) or D_t // heads
    inter = getattr(target_config, "intermediate_size", None) or 4 * D_t
    n_layers = getattr(target_config, "num_hidden_layers", None) or getattr(target_config, "n_layer")
    context = getattr(target_config, "max_position_embeddings", None) or getattr(target_config, "n_positions", 4096)
    cfg = EagleConfig(
        target=name, target_fingerprint=fingerprint(embed), target_layers=layers or default_layers(n_layers),
        target_hidden=D_t, vocab_size=embed.shape[0], draft_vocab=int(d2t.shape[0]), hidden_size=D_t,
        intermediate_size=inter, num_heads=heads, head_dim=head_dim,
        rms_norm_eps=float(getattr(target_config, "rms_norm_eps", 1e-6) or 1e-6),
        max_positions=max_positions or int(context),
    )
    torch.manual_seed(seed)
    head = EagleHead(cfg)
    for lin in (head.fuse, head.inp, head.wqkv, head.wo, head.w_gate_up, head.w_down, head.lm_head):
        nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.weight.shape[1]))
    head.d2t.copy_(d2t)
    return head


class _PairModel:
    """The head seen as a causal model over its pair slots, for the draft model's tree growth: a
    token fed at a slot is paired with the head's output at its parent's slot (the last slot its
    mask sees), as drafting does. Its length is the count of true-feature pairs plus what the
    tree growth fed; keeping a path keeps nothing drafted (the target's features replace it)."""

    def __init__(self, eagle: EagleDrafter) -> None:
        self.eagle = eagle
        self.vocab_size = eagle.vocab_size
        self.max_length = eagle.head.cfg.max_positions
        self.device = eagle.device
        self.hidden = None
        self._extra = 0

    @property
    def length(self) -> int:
        return self.eagle._pairs + self._extra

    def forward(self, ids: Tensor, num_logits: int | None = None, attn_mask: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        e = self.eagle
        start = self.length
        assert attn_mask is not None and attn_mask.shape == (ids.shape[0], start + ids.shape[0]), "tree feeds only"
        seen = attn_mask[:, :start].to(self.device)
        parent_slot = (seen * torch.arange(1, start + 1, device=self.device)).argmax(-1)  # last visible slot
        feats = e.runner.outs[e.slot][parent_slot]  # (T, D)
        out, _ = e._run(PairFeed(e.slot, start, ids.to(self.device), feats, mask=attn_mask.to(self.device),
                                 positions=positions))
        self._extra += ids.shape[0]
        small = e.runner.logits(out).float()  # (T, N)
        full = small.new_full((ids.shape[0], self.vocab_size), float("-inf"))
        full[:, e.head.d2t] = small
        return full

    def keep_path(self, start: int, path: list[int]) -> None:
        self._extra = 0

    def rollback(self, length: int) -> None:
        self._extra = 0

    def reset(self) -> None:
        self._extra = 0
