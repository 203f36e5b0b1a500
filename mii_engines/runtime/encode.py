"""Prompt text to token ids: a long prompt is encoded in pieces on several cores.

A 4k-token prompt costs ~8-12 ms of tokenizing on the H200 machine, a third of its TTFT
(issue 17), and Hugging Face's Rust tokenizer encodes one text on one core. So a long
prompt is cut into pieces where its tokenizer's pre-tokenizer provably has a boundary,
the pieces are encoded on this encoder's threads (``encode_batch`` releases the GIL)
and joined between the special tokens the post-processor puts around a text (a
tokenizer set to truncate or pad encodes whole).

Only a prompt encoded while no other is takes the threads: in a burst every prompt is
encoded whole on its own intake thread, which already keeps the cores busy. Measured on
the H200 machine (16 cores, 2026-12-03): 64 concurrent 2,112-token prompts reached
their first token in 66 ms p50 with every prompt in pieces (through the tokenizer's
rayon pool) against 32-47 ms whole, while a lone 4k-token prompt's TTFT was 22 ms in
pieces against 27 ms whole. Replicas turn the rayon pool off
(``TOKENIZERS_PARALLELISM=false`` unless the user set it): these threads replace it.

Where the boundaries are: every pre-tokenizer accepted here splits text into pieces
none of which holds a non-space character followed by a space (a space only ever opens
a piece: GPT-2's `` ?\\p{L}+``, Llama 3's ``[^\\r\\n\\p{L}\\p{N}]?\\p{L}+``, whitespace
runs), and finds each piece by looking forward only. So before a space that follows a
non-space character a piece always ends, and what follows is split the same with or
without what came before. Any other tokenizer (a normalizer that prepends, SentencePiece's
Metaspace, an added token holding a space or eating the whitespace after it) encodes
whole, as before. A tokenizer that passes these rules is still checked once, on a probe
text, against its own ``tokenizer(text)``: any difference and it encodes whole.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# A piece is at least this many characters (~1,000 tokens of English): below that the
# batch's hand-off costs more than the second core saves.
MIN_PIECE_CHARS = 4096
MAX_PIECES = 8

# Split patterns (Llama 3 / cl100k, Qwen 2, GPT-2 written out) in which a space can only
# open a match and nothing looks behind.
_SAFE_SPLIT_PATTERNS = frozenset({
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
})
# Normalizers that act on each character (and its combining marks) alone: a space is a
# starter that composes with nothing before it.
_SAFE_NORMALIZERS = frozenset({"NFC", "NFKC"})

# Mixed on purpose: runs of spaces, tabs and newlines, digits, punctuation, contractions,
# accents, CJK and emoji, and a space before and after each.
_PROBE = ("It's  a test:\tnumbers 12345 678, words\n\nnew lines  \n and 'quotes' we'll "
          "see; café naïve 東京 🙂 x  y\t\tz ... (brackets) [1, 2] {'a': 3} -- end. ")


def _pre_tokenizer_splits_at_spaces(state: dict) -> bool:
    """Whether the pre-tokenizer (its JSON) is one of those whose pieces a space only opens."""
    kind = state.get("type")
    if kind in ("Whitespace", "WhitespaceSplit", "Digits"):
        return True
    if kind == "ByteLevel":  # with use_regex: GPT-2's pattern; without: bytes, no split
        return True
    if kind == "Split":
        return (state.get("behavior") == "Isolated" and not state.get("invert")
                and state.get("pattern", {}).get("Regex") in _SAFE_SPLIT_PATTERNS)
    if kind == "Sequence":
        return all(_pre_tokenizer_splits_at_spaces(s) for s in state.get("pretokenizers", []))
    return False


def why_not_split(backend: Tokenizer) -> Optional[str]:
    """None if a text may be cut before a space that follows a non-space character and
    encoded piece by piece; otherwise what prevents it."""
    if backend.pre_tokenizer is None:
        return "no pre-tokenizer (the model sees the whole text)"
    state = json.loads(backend.pre_tokenizer.__getstate__())
    if not _pre_tokenizer_splits_at_spaces(state):
        return f"pre-tokenizer {state.get('type')} is not one that splits before spaces"
    if backend.normalizer is not None:
        kind = json.loads(backend.normalizer.__getstate__()).get("type")
        if kind not in _SAFE_NORMALIZERS:
            return f"normalizer {kind}"
    for token in backend.get_added_tokens_decoder().values():
        if token.rstrip or any(c.isspace() for c in token.content):
            return f"added token {token.content!r} holds or strips whitespace"
    return None


def cuts(text: str, pieces: int) -> List[int]:
    """Up to ``pieces - 1`` positions, each of a space that follows a non-space character,
    near equal shares of ``text``."""
    found: List[int] = []
    for share in range(1, pieces):
        at = text.find(" ", len(text) * share // pieces)
        while at > 0 and text[at - 1].isspace():
            at = text.find(" ", at + 1)
        if at > 0 and (not found or at > found[-1]):
            found.append(at)
    return found


class PromptEncoder:
    """``tokenizer(prompt, add_special_tokens=True)["input_ids"]``, a long prompt encoded
    in pieces in parallel where that gives the same ids (see the module docstring)."""

    def __init__(self, tokenizer: Callable[..., dict], backend: Optional[Tokenizer] = None,
                 workers: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.workers = min(MAX_PIECES, workers or os.cpu_count() or 1)
        self.backend = backend
        self.prefix: List[int] = []
        self.suffix: List[int] = []
        self._encoding = 0  # prompts being encoded now, by any thread
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None  # the pieces' threads, if any
        self.reason = "one core" if self.workers < 2 else None
        if backend is None:
            self.reason = "not a tokenizer of the tokenizers library"
        elif self.reason is None:
            self.reason = why_not_split(backend)
        if self.reason is None:
            self.reason = self._learn_special_tokens()
        if self.reason is None:  # short: within any model's length, no warning logged
            self._pool = ThreadPoolExecutor(self.workers - 1, thread_name_prefix="encode")
            probe = _PROBE * 2
            if self._in_pieces(probe, 6) != self._whole(probe):
                self.reason = "pieces encode differently from the whole on a probe text"
                self._pool.shutdown()
                self._pool = None
        if self.reason is not None:
            self.backend = None
            log.debug("prompts encode on one core: %s", self.reason)

    def _learn_special_tokens(self) -> Optional[str]:
        """The ids the post-processor puts before and after a text (BOS, EOS), from one
        token's encoding: cheaper than merging the pieces' encodings and post-processing
        the whole (~7 ms of a 4k-token prompt's offsets and masks copied twice)."""
        assert self.backend is not None
        bare = self.backend.encode("x", add_special_tokens=False).ids
        full = self.backend.post_process(self.backend.encode("x", add_special_tokens=False),
                                         None, True).ids
        for at in range(len(full) - len(bare) + 1):
            if full[at:at + len(bare)] == bare:
                self.prefix, self.suffix = full[:at], full[at + len(bare):]
                return None
        return "the post-processor does not keep the text's tokens together"

    @classmethod
    def for_tokenizer(cls, tokenizer: Callable[..., dict]) -> "PromptEncoder":
        """The encoder of a loaded tokenizer: in pieces if it is a fast (Rust) one."""
        from transformers import PreTrainedTokenizerFast

        backend = (tokenizer.backend_tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast)
                   else None)
        return cls(tokenizer, backend)

    @property
    def splits(self) -> bool:
        """Whether long prompts are encoded in pieces (``reason`` says why not)."""
        return self.backend is not None

    def pieces_for(self, text: str) -> int:
        """How many pieces ``text`` is encoded in."""
        if self.backend is None:
            return 1
        return max(1, min(self.workers, len(text) // MIN_PIECE_CHARS))

    def encode(self, text: str) -> List[int]:
        """``text``'s ids; safe to call from several threads at once."""
        with self._lock:
            self._encoding += 1
            alone = self._encoding == 1
        try:
            pieces = self.pieces_for(text) if alone else 1
            # A truncating or padding state set on the shared backend would apply per piece.
            if (pieces < 2 or self.backend is None or self.backend.truncation is not None
                    or self.backend.padding is not None):
                return self._whole(text)
            return self._in_pieces(text, pieces)
        finally:
            with self._lock:
                self._encoding -= 1

    def _whole(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _piece(self, part: str) -> List[int]:
        """One piece's ids, without special tokens. ``encode_batch`` of one text, not
        ``encode``: the batch call releases the GIL while it works."""
        assert self.backend is not None
        return self.backend.encode_batch([part], add_special_tokens=False)[0].ids

    def _in_pieces(self, text: str, pieces: int) -> List[int]:
        edges = [0] + cuts(text, pieces) + [len(text)]
        parts = [text[a:b] for a, b in zip(edges, edges[1:])]
        assert self._pool is not None  # made with the backend's checks passed
        later = [self._pool.submit(self._piece, part) for part in parts[1:]]
        ids = list(self.prefix)
        ids.extend(self._piece(parts[0]))  # the calling thread takes the first piece
        for future in later:
            ids.extend(future.result())
        ids.extend(self.suffix)
        return ids
