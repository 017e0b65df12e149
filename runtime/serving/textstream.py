"""Incremental detokenization with stop strings: the text a request may stream so far.

Tokens are decoded in a short window (``prefix_offset``..end) and differenced against the window's older
part, so each step costs a few tokens of decoding and byte-level tokens that complete a character later
(UTF-8 split over tokens) are held back until they do. Text that could be the start of a stop string is
held back too, and a stop string ends the text before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

INCOMPLETE = "\ufffd"  # what the decoder shows for an unfinished UTF-8 sequence


class TextStream:
    """The text of a growing list of token ids, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters)
        self.stopped = False  # a stop string was found; ``text`` ends before it
        self._prefix_offset = 0
        self._read_offset = 0
        self._sent = 0
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def push(self, ids: Sequence[int]) -> None:
        """Add generated token ids (ignored once a stop string was found)."""
        if self.stopped or not ids:
            return
        self.ids.extend(int(t) for t in ids)
        old = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        new = self.tokenizer.decode(self.ids[self._prefix_offset :])
        if len(new) <= len(old) or new.endswith(INCOMPLETE):
            return
        self._append(new[len(old) :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def _append(self, text: str) -> None:
        """Extend ``text``, cut at a stop string that the new text completes."""
        searched = max(len(self.text) - self._holdback, 0)
        self.text += text
        cuts = [i for i in (self.text.find(s, searched) for s in self.stop) if i >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not yet returned that no stop string can still remove (all of it when ``final``, with any
        unfinished character)."""
        if final and not self.stopped and self._read_offset < len(self.ids):
            old = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
            self._append(self.tokenizer.decode(self.ids[self._prefix_offset :])[len(old) :])
            self._read_offset = len(self.ids)
        end = len(self.text) if final or self.stopped else max(len(self.text) - self._holdback, self._sent)
        out, self._sent = self.text[self._sent : end], end
        return out
