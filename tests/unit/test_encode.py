"""PromptEncoder: a long prompt encoded in pieces gives the ids of the whole text, for
every pre-tokenizer it splits under, and the others are left whole."""
from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
    processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mii.testing.tiny_model import ensure_tiny_model
from mii_engines.runtime.encode import MIN_PIECE_CHARS, PromptEncoder, cuts

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PIECES = ["the", "cat's", "we'll", "DeepSpeed", "12345", "7", "3.14", "café", "naïve", "東京",
          "🙂", "(x)", "[1,", "2]", "--", "...", "<s>", "</s>", "a.b", "don't", "ÅNGSTRÖM"]
GAPS = [" ", " ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", " \t"]


def texts(count: int, seed: int = 0):
    """Long texts (several pieces' worth) mixing words, digits, punctuation, accents,
    CJK, emoji, special-token strings and every kind of whitespace run."""
    rng = random.Random(seed)
    for _ in range(count):
        words = []
        while sum(map(len, words)) < 3 * MIN_PIECE_CHARS + rng.randrange(MIN_PIECE_CHARS):
            words.append(rng.choice(PIECES))
            words.append(rng.choice(GAPS))
        yield "".join(words[:-1 if rng.random() < 0.5 else None])


def trained(pre_tokenizer, normalizer=None, model="bpe") -> PreTrainedTokenizerFast:
    """A small tokenizer trained here on ``texts`` (BOS added by its post-processor)."""
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts(4, seed=99)), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


SPLITTING = {
    "byte_level_gpt2": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "byte_level_prefix_space": lambda: trained(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "llama3_split": lambda: trained(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    "llama3_split_nfc": lambda: trained(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        normalizer=normalizers.NFC()),
    "whitespace_split_word_level": lambda: trained(pre_tokenizers.WhitespaceSplit(),
                                                   model="wordlevel"),
    "tiny_model": lambda: AutoTokenizer.from_pretrained(str(ensure_tiny_model())),
}


@pytest.mark.parametrize("name", sorted(SPLITTING))
def test_pieces_give_the_whole_texts_ids(name):
    tokenizer = SPLITTING[name]()
    encoder = PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4)
    assert encoder.splits, encoder.reason
    for text in texts(12, seed=len(name)):
        assert encoder.pieces_for(text) == 3
        assert encoder.encode(text) == tokenizer(text, add_special_tokens=True)["input_ids"]


def test_a_bos_template_puts_bos_once_in_front():
    tokenizer = SPLITTING["llama3_split"]()
    encoder = PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4)
    text = next(texts(1))
    assert encoder.prefix == [tokenizer.bos_token_id] and encoder.suffix == []
    ids = encoder.encode(text.replace("<s>", "s"))  # "<s>" in the text is BOS too
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


REFUSED = {
    # SentencePiece's Metaspace: not shown safe (its split and prepend rules), so refused
    "Metaspace": lambda: trained(pre_tokenizers.Metaspace(prepend_scheme="always")),
    "normalizer Prepend": lambda: trained(pre_tokenizers.WhitespaceSplit(),
                                          normalizer=normalizers.Prepend("▁"), model="wordlevel"),
    "Punctuation": lambda: trained(pre_tokenizers.Punctuation()),
}


@pytest.mark.parametrize("reason", sorted(REFUSED))
def test_other_tokenizers_encode_whole_and_say_why(reason):
    tokenizer = REFUSED[reason]()
    encoder = PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4)
    assert not encoder.splits and reason in encoder.reason
    text = next(texts(1))
    assert encoder.pieces_for(text) == 1
    assert encoder.encode(text) == tokenizer(text, add_special_tokens=True)["input_ids"]


def test_the_refusal_matters_pieces_would_differ_under_a_prepending_normalizer():
    """Not a vacuous rule: cut where the others are cut, a normalizer that prepends "▁"
    (Llama 2's and Mistral's tokenizers) gives each piece one more token."""
    tokenizer = REFUSED["normalizer Prepend"]()
    backend = tokenizer.backend_tokenizer
    # no special-token strings: text after one is normalized apart in the whole text too
    text = next(texts(1)).replace("</s>", "s").replace("<s>", "s")
    edges = [0] + cuts(text, 3) + [len(text)]
    pieces = [i for part in backend.encode_batch(
        [text[a:b] for a, b in zip(edges, edges[1:])], add_special_tokens=False)
        for i in part.ids]
    assert pieces != backend.encode(text, add_special_tokens=False).ids


def test_an_added_token_holding_a_space_keeps_the_text_whole():
    tokenizer = SPLITTING["byte_level_gpt2"]()
    tokenizer.add_tokens(["big cat"])
    encoder = PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4)
    assert not encoder.splits and "'big cat'" in encoder.reason


def test_a_wrapper_that_differs_from_its_backend_is_caught_by_the_probe():
    tokenizer = SPLITTING["byte_level_gpt2"]()

    def with_extra_token(text, add_special_tokens=True):
        return {"input_ids": tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
                + [0]}

    encoder = PromptEncoder(with_extra_token, tokenizer.backend_tokenizer, workers=4)
    assert not encoder.splits and "probe" in encoder.reason
    assert encoder.encode("a b")[-1] == 0


def test_short_prompts_one_core_and_other_tokenizers_encode_whole():
    tokenizer = SPLITTING["tiny_model"]()
    assert PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4).pieces_for("a b") == 1
    assert not PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=1).splits
    fake = PromptEncoder.for_tokenizer(lambda text, add_special_tokens=True:
                                       {"input_ids": [len(text)]})
    assert not fake.splits and fake.encode("abc") == [3]
    assert PromptEncoder.for_tokenizer(tokenizer).backend is not None


def test_cuts_fall_before_a_space_that_follows_a_non_space():
    for text in texts(6, seed=5):
        found = cuts(text, 8)
        assert found == sorted(set(found)) and len(found) >= 5
        assert all(text[i] == " " and not text[i - 1].isspace() for i in found)
    assert cuts("     ", 4) == [] and cuts("abc", 4) == []


def test_a_prompt_encoded_while_another_is_goes_whole_and_both_are_right():
    """Pieces only for a prompt encoded alone: while one prompt's pieces are being
    encoded (held here at its first piece), a second prompt from another thread is
    encoded whole, and each gets its own whole-text ids."""
    import threading

    tokenizer = SPLITTING["llama3_split"]()
    encoder = PromptEncoder(tokenizer, tokenizer.backend_tokenizer, workers=4)
    first, second = list(texts(2, seed=7))
    entered, release = threading.Event(), threading.Event()
    split_calls, whole_calls = [], []
    piece, whole, in_pieces = encoder._piece, encoder._whole, encoder._in_pieces

    def held_piece(part):
        entered.set()
        release.wait(10)
        return piece(part)

    def counting_in_pieces(text, pieces):
        split_calls.append(text)
        return in_pieces(text, pieces)

    def counting_whole(text):
        whole_calls.append(text)
        return whole(text)

    encoder._piece, encoder._in_pieces, encoder._whole = (held_piece, counting_in_pieces,
                                                          counting_whole)
    results = {}
    worker = threading.Thread(target=lambda: results.update(first=encoder.encode(first)))
    worker.start()
    assert entered.wait(10)
    results["second"] = encoder.encode(second)  # while the first is still in pieces
    release.set()
    worker.join(10)
    assert split_calls == [first] and whole_calls == [second]
    for name, text in (("first", first), ("second", second)):
        assert results[name] == tokenizer(text, add_special_tokens=True)["input_ids"]
    encoder._piece = piece
    assert encoder.encode(second) == results["second"] and split_calls == [first, second]
