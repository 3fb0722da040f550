"""Incremental detokenization: text pieces per committed token, in O(1) decode work per token.

Decoding a token alone can be wrong (a multi-byte character split over tokens, or a tokenizer that
strips a leading space at the start of a decode), so each piece is the difference between two
decodes of a short window that starts a few tokens back (the approach of TGI and vLLM).
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        # Start the window a few prompt tokens back so the first piece gets its leading space right.
        self._prefix = max(0, len(self.ids) - 5)
        self._read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """At the end of generation: the text still held back (an unfinished character decodes to
        U+FFFD, exactly as a full decode of the ids shows it)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]
