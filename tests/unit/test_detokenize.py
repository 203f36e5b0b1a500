"""Incremental detokenization and stop strings (``runtime/detokenize.py``), with a
tokenizer whose tokens are known strings, so every expected text is exact."""
from __future__ import annotations

from mii_engines.runtime.detokenize import TextStream


class PieceTokenizer:
    """Token i decodes to PIECES[i]; a list of ids decodes to the concatenation."""

    PIECES = ["S", "eat", "tle", " is", "\xe9", "ea", "t", "x"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def _run(tokens, stop):
    stream = TextStream(PieceTokenizer(), stop)
    pieces, found = [], None
    for token in tokens:
        found = stream.add(token)
        pieces.append(stream.delta(final=found is not None))
        if found:
            break
    return "".join(pieces), found


def test_the_earliest_stop_wins_when_one_step_completes_two():
    # "S" + "eat": "ea" starts at 1, "at" at 2; whatever the order of the list.
    assert _run([0, 1], ["ea", "at"]) == ("S", "ea")
    assert _run([0, 1], ["at", "ea"]) == ("S", "ea")


def test_a_stop_spanning_two_tokens_is_cut_and_never_streamed():
    text, found = _run([0, 5, 6, 2], ["eat"])  # "S" "ea" "t": the stop forms over two steps
    assert (text, found) == ("S", "eat")


def test_text_without_a_stop_streams_whole():
    stream = TextStream(PieceTokenizer(), [])
    pieces = []
    for token in [0, 1, 2, 3]:
        assert stream.add(token) is None
        pieces.append(stream.delta(final=False))
    assert "".join(pieces) == "Seattle is"
    assert stream.finish() == ("Seattle is", 4)


def test_held_back_characters_come_out_at_the_end():
    stream = TextStream(PieceTokenizer(), ["zzz"])  # hold back 2 characters
    out = [stream.delta(final=False) for token in [0, 1] if stream.add(token) is None]
    assert "".join(out) == "Se"
    assert stream.delta(final=True) == "at"
