"""Incremental detokenization (``mii_engines/runtime/detokenize.py``) with tokenizers that
behave like real ones where it matters: byte-level tokens that split a UTF-8 character,
special tokens that ``skip_special_tokens`` drops, and a SentencePiece-like decoder whose
output depends on context (written from mutation testing: tools/mutation.py)."""
from __future__ import annotations

from mii_engines.runtime.detokenize import TextStream

EOS = 256


class ByteTokenizer:
    """Token i < 256 is the byte i; EOS is a special token ("</s>" unless skipped)."""

    def decode(self, ids, skip_special_tokens=False):
        text, pending = "", bytearray()
        for i in ids:
            if i == EOS:
                text += pending.decode("utf-8", errors="replace")
                pending = bytearray()
                text += "" if skip_special_tokens else "</s>"
            else:
                pending.append(i)
        return text + pending.decode("utf-8", errors="replace")


def byte_ids(text: str):
    return list(text.encode())


class SpaceTokenizer:
    """Pieces joined, one leading space dropped (SentencePiece drops the "▁" of the first
    piece); the special token decodes to nothing when skipped."""

    PIECES = {0: "a", 1: " b", 2: " c", 3: "</s>"}

    def decode(self, ids, skip_special_tokens=False):
        text = "".join("" if (i == 3 and skip_special_tokens) else self.PIECES[i] for i in ids)
        return text[1:] if text.startswith(" ") else text


class PieceTokenizer:
    """Token i decodes to PIECES[i]; a list of ids decodes to the concatenation."""

    PIECES = ["S", "eat", "tle", " is", "abcdef", "g", "abc", "d", "\n", " x", "eaten"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def stream_all(tokenizer, tokens, stop):
    """(the delta after each token, the stop found, the stream)."""
    stream = TextStream(tokenizer, stop)
    deltas, found = [], None
    for token in tokens:
        found = stream.add(token)
        deltas.append(stream.delta(final=found is not None))
        if found:
            break
    return deltas, found, stream


def test_a_character_split_over_tokens_is_held_until_complete():
    deltas, found, stream = stream_all(ByteTokenizer(), byte_ids("é€x"), [])
    # é = 2 bytes, € = 3 bytes: nothing comes out until a character is whole
    assert deltas == ["", "é", "", "", "€", "x"]
    assert stream.text == "é€x" and found is None
    assert stream.finish() == ("é€x", 6)


def test_a_split_character_after_text_is_held_too():
    deltas, _, stream = stream_all(ByteTokenizer(), byte_ids("ab€c"), [])
    assert deltas == ["a", "b", "", "", "€", "c"]


def test_special_tokens_are_skipped():
    deltas, _, stream = stream_all(ByteTokenizer(), byte_ids("hi") + [EOS], [])
    assert "".join(deltas) == "hi" and stream.text == "hi"
    assert stream.finish() == ("hi", 3)


def test_the_window_keeps_the_context_a_decoder_needs():
    # "a" then a special token (no text) then " b": the space is kept, as decode() of the
    # whole sequence gives it
    deltas, _, stream = stream_all(SpaceTokenizer(), [0, 3, 1, 2], [])
    assert "".join(deltas) == "a b c" == SpaceTokenizer().decode([0, 3, 1, 2], True)


def test_a_stop_at_the_very_start_is_found():
    for tokens, stop in (([10], ["zz", "eat"]), ([10], ["ea"]), ([0, 1], ["Se"]), ([0], ["S"])):
        deltas, found, stream = stream_all(PieceTokenizer(), tokens, stop)
        assert found == stop[-1], (tokens, stop)
        assert "".join(deltas) == "" and stream.text == ""


def test_a_stop_completed_late_in_a_long_text_is_found():
    # "abcdef" + "g" with "efg": the stop starts 2 characters before the new text
    deltas, found, stream = stream_all(PieceTokenizer(), [4, 5], ["efg"])
    assert (found, stream.text, "".join(deltas)) == ("efg", "abcd", "abcd")
    # "abc" + "d" with "cd"
    deltas, found, stream = stream_all(PieceTokenizer(), [6, 7], ["cd"])
    assert (found, stream.text, "".join(deltas)) == ("cd", "ab", "ab")


def test_a_stop_inside_one_token_is_found():
    deltas, found, stream = stream_all(PieceTokenizer(), [6, 4], ["bcab"])
    assert (found, stream.text) == ("bcab", "a")


def test_text_before_the_hold_back_streams_at_each_step():
    # longest stop 2 characters: 1 held back
    deltas, found, stream = stream_all(PieceTokenizer(), [0, 1, 2, 3], ["zz", "q"])
    assert deltas == ["", "Sea", "ttl", "e i"] and found is None
    assert stream.delta(final=True) == "s"
    # longest stop 3 characters: 2 held back
    deltas, _, stream = stream_all(PieceTokenizer(), [0, 1, 2, 3], ["zzz"])
    assert deltas == ["", "Se", "att", "le "]
    assert stream.delta(final=True) == "is"


def test_one_character_stops_hold_nothing_back():
    deltas, found, stream = stream_all(PieceTokenizer(), [0, 1, 2, 8, 3], ["\n"])
    assert deltas == ["S", "eat", "tle", ""] and found == "\n"
    assert stream.text == "Seattle"


def test_finish_flushes_a_dangling_partial_character_without_stops():
    stream = TextStream(ByteTokenizer(), [])
    for token in byte_ids("ok") + [0xC3]:  # the first byte of "é", never completed
        stream.add(token)
    assert stream.text == "ok"
    assert stream.finish() == ("ok\ufffd", 3)


def test_finish_keeps_the_text_cut_at_a_stop():
    stream = TextStream(PieceTokenizer(), ["eat"])
    assert stream.add(0) is None and stream.add(1) == "eat"
    assert stream.finish() == ("S", 2)
    stream = TextStream(ByteTokenizer(), ["k"])  # with stops nothing is flushed
    for token in byte_ids("o") + [0xC3]:
        stream.add(token)
    assert stream.finish() == ("o", 2)
