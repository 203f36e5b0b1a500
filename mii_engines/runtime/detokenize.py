"""Incremental detokenization and stop-string handling for one generated sequence."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Only a short window of tokens is re-decoded per step (as TGI and vLLM do), and
    text ending in an incomplete UTF-8 sequence is held back. Stop strings end the
    text before their first occurrence; while generating, the last
    ``len(longest stop) - 1`` characters are held back so a stop string that is
    still forming never reaches the client.
    """

    def __init__(self, tokenizer: Any, stop: List[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: List[int] = []
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of self.text already emitted
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> Optional[str]:
        """Append a token; return the stop string found, if any."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        window_text = self._decode(self.ids[self._prefix:])
        if len(window_text) > len(prefix_text) and not window_text.endswith("\ufffd"):
            before = len(self.text)
            self.text += window_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            # The earliest stop wins, whatever the order of the list (one step's text can
            # complete several: "Seat" with stops "ea" and "at" ends at "S").
            hits = [(found, stop) for stop in self.stop
                    if (found := self.text.find(stop, max(0, before - len(stop) + 1))) != -1]
            if hits:
                found, stop = min(hits)
                self.text = self.text[:found]
                return stop
        return None

    def delta(self, final: bool) -> str:
        """Text not yet emitted; keeps the hold-back unless ``final``."""
        end = len(self.text) if final or not self.stop else max(self.sent,
                                                                 len(self.text) - self.holdback)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def finish(self) -> Tuple[str, int]:
        """Flush undecoded bytes (e.g. a dangling multi-byte char) at the end of generation."""
        full = self._decode(self.ids)
        if not self.stop and len(full) > len(self.text):
            self.text = full
        return self.text, len(self.ids)
