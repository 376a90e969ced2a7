"""A reply's text, decoded token by token without decoding the whole reply again each time.

:class:`ReplyText` keeps a short window of tokens: each new token decodes only the tokens since
the last character boundary plus the piece before it (for tokenizers whose pieces depend on
their left neighbour), as vLLM's and transformers' text streamers do. The text grows by the new
characters; a token that ends inside a multi-byte character adds nothing until the character is
complete. Stop strings are searched only where they could newly appear (the new characters and
the stop's length before them), so a reply of n tokens costs O(n) decoding in all, not O(n^2).
"""

from __future__ import annotations

from typing import Any


class ReplyText:
    """The text of one reply as tokens arrive; ``text`` is always whole characters."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # where the first stop string starts, once found
        self._prefix = 0  # tokens before this are not decoded again
        self._read = 0  # tokens up to here are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int | None, final: bool = False) -> str:
        """Append ``token``; the characters it completes (``final``: also a last half
        character, as the full decode would show it). ``token`` None (an event that only ends
        the reply, or reads its last token) adds no token; with ``final`` it completes a last
        half character still held back."""
        if token is not None:
            self.ids.append(token)
        elif not final or self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") and not final:
            return ""  # half of a multi-byte character: wait for the rest
        new = after[len(before):]
        start = len(self.text)
        self.text += new
        self._prefix, self._read = self._read, len(self.ids)
        self._find_stop(start)
        return new

    def _find_stop(self, start: int) -> None:
        if self.stop_at is not None or not self.stops:
            return
        longest = max(len(s) for s in self.stops)
        lo = max(start - longest + 1, 0)
        found = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
        if found:
            self.stop_at = min(found)

    @property
    def reply(self) -> str:
        """The text up to the first stop string (the whole text without one)."""
        return self.text if self.stop_at is None else self.text[:self.stop_at]
