"""Backend for any transformers causal LM (a model object), on a DynamicCache rolled back by crop.

Token trees (see base.py): transformers takes a custom 4-D attention mask (1, 1, n, length + n)
as given (masking_utils returns any 4-D mask unchanged) and hands it to the attention function:
SDPA reads a bool mask as "True = attend" but the eager path *adds* the mask to the scores, where a
bool would silently add 0/1. An additive float mask (0 = attend, dtype min = not) means the same to
both, so that is what a tree forward passes. Flash and flex attention do not take such a mask.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that apply a custom 4-D mask as given


def context_length(config: object) -> int | None:
    """The model's context window from its config, None when it declares none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_layer_indices(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The layer indices to capture, checked against a model of `num_layers` decoder layers
    (0 = embedding output, i = output of decoder layer i, num_layers = after the final norm)."""
    out = []
    for layer in layers:
        try:
            i = operator.index(layer)
        except TypeError:
            raise ValueError(f"layer index {layer!r} must be an int in [0, {num_layers}]") from None
        if not 0 <= i <= num_layers:
            raise ValueError(
                f"layer index {i} is out of range: the model has {num_layers} decoder layers, so indices lie in "
                f"[0, {num_layers}] (0 = embeddings, {num_layers} = after the final norm)"
            )
        out.append(i)
    return tuple(out)


def check_tree_args(
    n: int, attn_mask: torch.Tensor | None, positions: torch.Tensor | None, length: int | None = None
) -> None:
    """Raise ValueError unless attn_mask is bool (n, n) over the new tokens or (n, length + n) over
    cache and new tokens, and positions is (n,) (either may be None)."""
    if attn_mask is not None:
        if attn_mask.shape != (n, n) and (length is None or attn_mask.shape != (n, length + n)):
            wide = "" if length is None else f" or ({n}, {length + n}) with the cache"
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)}; expected ({n}, {n}){wide} for {n} new tokens"
            )
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask has dtype {attn_mask.dtype}; expected torch.bool (True = sees)")
    if positions is not None and positions.shape != (n,):
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({n},) for {n} new tokens")


def check_path(start: int, path: list[int], length: int) -> None:
    """Raise ValueError unless `path` is increasing offsets into the tokens at [start, length)."""
    n = length - start
    if start < 0 or n < 0:
        raise ValueError(f"start={start} is not within the cache (holding {length} tokens)")
    if any(b <= a for a, b in zip(path, path[1:])) or (path and not 0 <= path[0] <= path[-1] < n):
        raise ValueError(f"path={path} must be increasing offsets into the {n} tokens appended at {start}")


class HFModel:
    """Wraps a transformers AutoModelForCausalLM-style module for one sequence at a time."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = context_length(model.config)
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache; accept both generations.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._cache = DynamicCache(config=model.config)
        self._length = 0
        self._num_layers = int(model.config.get_text_config().num_hidden_layers)
        self._capture: tuple[int, ...] = ()
        self.hidden: torch.Tensor | None = None
        self.row_hidden: list[torch.Tensor] | None = None
        # Slots (batch.py): one cache per sequence; _cache/_length are the current slot's.
        self._slot_caches: list[Any] = [self._cache]
        self._slot_lengths = [0]
        self._slot = 0
        # The token ids the current slot's cache holds (cached_ids), kept by forward, rollback and
        # keep_path; _slot_ids holds the other slots'.
        self._ids = torch.zeros(0, dtype=torch.long)
        self._slot_ids = [self._ids]

    @property
    def length(self) -> int:
        return self._length

    # ---- slots: several sequences, one cache each ------------------------------------------
    # transformers' caches keep one length for the whole batch, so rows of different lengths run
    # one after another here: a batch serves every model, with the native backend's throughput
    # gain only where rows share a forward (models/llama.py).

    def set_slots(self, slots: int) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots={slots!r} is invalid: use an integer >= 1 (sequences held at once)")
        self._slot_caches = [DynamicCache(config=self.model.config) for _ in range(slots)]
        self._slot_lengths = [0] * slots
        self._slot_ids = [torch.zeros(0, dtype=torch.long) for _ in range(slots)]
        self._slot = 0
        self._cache, self._length, self._ids = self._slot_caches[0], 0, self._slot_ids[0]

    @property
    def slots(self) -> int:
        return len(self._slot_caches)

    def slot_length(self, slot: int) -> int:
        return self._length if slot == self._slot else self._slot_lengths[slot]

    def row(self, slot: int) -> Any:
        from outrider.models.base import SlotRow

        return SlotRow(self, slot)

    def _use(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is invalid: use a slot in [0, {self.slots})")
        if slot != self._slot:
            self._slot_caches[self._slot], self._slot_lengths[self._slot] = self._cache, self._length
            self._slot_ids[self._slot] = self._ids
            self._slot, self._cache, self._length = slot, self._slot_caches[slot], self._slot_lengths[slot]
            self._ids = self._slot_ids[slot]

    def cached_ids(self, slot: int | None = None) -> torch.Tensor:
        """The token ids (length,) the slot's cache holds; none where the cache cannot be cut back
        to any of its prefixes (a sliding window that has dropped tokens): nothing is reusable."""
        if slot is not None:
            self._use(slot)
        if self._tree_unsupported(self._length) is not None:
            return self._ids[:0]
        return self._ids[: self._length]

    def forward_rows(self, rows: Sequence[Any]) -> list[torch.Tensor]:
        """Each row's forward on its own slot's cache, one after another (see the slots note)."""
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("forward_rows needs distinct slots")
        out, hidden = [], []
        for r in rows:
            self._use(r.slot)
            out.append(self.forward(r.ids, r.num_logits, r.attn_mask, r.positions))
            hidden.append(self.hidden)
        self.row_hidden = hidden if self._capture else None
        return out

    def capture_hidden(self, layers: Sequence[int]) -> None:
        """Record these layers' hidden states (transformers' output_hidden_states indices) in
        `hidden` (len(layers), n, D) on every later forward; empty stops (hidden becomes None)."""
        self._capture = hidden_layer_indices(layers, self._num_layers)
        self.hidden = None

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,  # (n,) long
        num_logits: int | None = None,
        attn_mask: torch.Tensor | None = None,  # (n, n) bool: [i, j] = new token i sees new token j
        positions: torch.Tensor | None = None,  # (n,) long; default length .. length + n - 1
    ) -> torch.Tensor:
        n = ids.shape[0]
        check_tree_args(n, attn_mask, positions, self._length)
        if positions is None:
            positions = torch.arange(self._length, self._length + n, device=self.device)
        kwargs = {self._cache_kw: self._cache, "use_cache": True}
        if attn_mask is not None:
            kwargs["attention_mask"] = self._tree_mask(attn_mask)
        if self._capture:
            kwargs["output_hidden_states"] = True
        if self._has_logits_to_keep and num_logits is not None:
            # logits_to_keep=0 means "all" in transformers; 1 is the least it computes.
            kwargs["logits_to_keep"] = max(num_logits, 1)
        out = self.model(input_ids=ids[None].to(self.device), position_ids=positions[None].to(self.device), **kwargs)
        self._ids = torch.cat([self._ids[: self._length], ids.cpu()])
        self._length += n
        if self._capture:
            self.hidden = torch.stack([out.hidden_states[i][0] for i in self._capture])  # (len(layers), n, D)
        logits = out.logits[0]  # (m, V)
        m = n if num_logits is None else num_logits
        return logits[logits.shape[0] - m :].float()

    def _tree_mask(self, attn_mask: torch.Tensor) -> torch.Tensor:
        """(1, 1, n, length + n) additive float mask: with attn_mask (n, n) every new token sees the
        whole cache and the new tokens attn_mask says; attn_mask (n, length + n) says it all."""
        n = attn_mask.shape[0]
        impl = getattr(self.config, "_attn_implementation", None)
        if impl not in TREE_ATTENTION:
            raise ValueError(
                f"a tree forward needs a custom 4-D attention mask, which attn_implementation={impl!r} does not "
                f"apply: load the model with attn_implementation='sdpa' (or 'eager')"
            )
        reason = self._tree_unsupported(self._length + n)
        if reason is not None:
            raise ValueError(f"cannot score a token tree: {reason}")
        sees = torch.ones(n, self._length + n, dtype=torch.bool, device=self.device)  # (n, length + n)
        sees[:, self._length + n - attn_mask.shape[1] :] = attn_mask
        dtype = self.model.dtype
        mask = torch.zeros(sees.shape, dtype=dtype, device=self.device).masked_fill_(~sees, torch.finfo(dtype).min)
        return mask[None, None]

    def _tree_unsupported(self, total: int) -> str | None:
        """Why a cache of `total` tokens cannot hold a tree (with a hint), None if it can: every
        cache layer must keep every token (full attention, or a window not yet filled)."""
        for i, layer in enumerate(self._cache.layers):
            if type(layer) in (DynamicLayer, DummyLayer):
                continue
            if type(layer) is DynamicSlidingWindowLayer:
                if total < layer.sliding_window:  # the window still covers every token
                    continue
                return (
                    f"layer {i} attends over a sliding window of {layer.sliding_window} tokens, and the cache "
                    f"would hold {total}: roll back, or draft chains"
                )
            return f"cache layer {i} is a {type(layer).__name__}, which cannot hold a token tree: draft chains"
        return None

    @torch.inference_mode()
    def keep_path(self, start: int, path: list[int], slot: int | None = None) -> None:
        """After a tree forward that appended tokens at [start, length): keep only those at offsets
        `path` (increasing), moved to [start, start + len(path)); the cache length becomes
        start + len(path). Their keys were computed at depth positions start + i, which is where
        they land, so the cache then equals that of the path fed as a chain."""
        if slot is not None:
            self._use(slot)
        check_path(start, path, self._length)
        reason = self._tree_unsupported(self._length)
        if reason is not None:
            raise ValueError(f"cannot keep a tree path: {reason}")
        kept = start + len(path)
        if path != list(range(len(path))):  # a path that is already a prefix needs only the crop
            idx = torch.tensor(path, dtype=torch.long, device=self.device) + start
            for layer in self._cache.layers:
                if isinstance(layer, DummyLayer) or not layer.is_initialized:
                    continue  # holds no keys of its own
                # keys, values (1, Hkv, length, hd): advanced indexing copies the rows before they are overwritten.
                layer.keys[..., start:kept, :] = layer.keys[..., idx, :]
                layer.values[..., start:kept, :] = layer.values[..., idx, :]
            self._ids[start:kept] = self._ids[idx.cpu()]
        self.rollback(kept)

    def rollback(self, length: int, slot: int | None = None) -> None:
        if slot is not None:
            self._use(slot)
        assert 0 <= length <= self._length, (length, self._length)
        if length < self._length:
            self._cache.crop(length - self._length)
            self._length = length

    def reset(self, slot: int | None = None) -> None:
        """Empty one slot's cache (None: every slot) for a new sequence."""
        for i in range(self.slots) if slot is None else (slot,):
            self._use(i)
            self._cache = DynamicCache(config=self.model.config)
            self._length = 0
        self.hidden = None
