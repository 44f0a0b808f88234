"""CLIP BPE tokenizer: known ids, agreement with a naive BPE written here, truncation, errors."""

from __future__ import annotations

import gzip
import html
import importlib.resources
import math
import pickle
import random

import ftfy
import numpy as np
import pytest
import regex
import torch

from clip_backdoor import tokenizer as tok
from clip_backdoor.errors import UserError
from clip_backdoor.tokenizer import (
    EOT_TOKEN,
    PAD_TOKEN,
    SOT_TOKEN,
    VOCAB_SIZE,
    Tokenizer,
    clean_text,
    tokenize,
)


@pytest.fixture(scope="module")
def tk() -> Tokenizer:
    return Tokenizer()


# ---------------------------------------------------------------------------------------------
# An independent, slow reading of the vocabulary file and of CLIP's algorithm, to compare against.

def _vocab_lines() -> list[str]:
    raw = importlib.resources.files("clip_backdoor.data").joinpath("assets/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(raw.read_bytes()).decode("utf-8").split("\n")


@pytest.fixture(scope="module")
def naive():
    """Byte table, merge ranks and vocabulary built the long way round, plus a naive BPE encoder."""
    lines = _vocab_lines()
    assert lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version")
    merge_lines = lines[1:1 + 48894]
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(merge_lines)}

    # Bytes that are visible Latin-1 characters stand for themselves, in byte order, then the rest.
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 255 and b != 173]
    hidden = [b for b in range(256) if b not in visible]
    byte_char = {b: chr(b) for b in visible} | {b: chr(256 + i) for i, b in enumerate(hidden)}
    order = visible + hidden
    vocab = [byte_char[b] for b in order] + [byte_char[b] + "</w>" for b in order]
    vocab += [line.replace(" ", "") for line in merge_lines] + ["<|startoftext|>", "<|endoftext|>"]
    ids = {s: i for i, s in enumerate(vocab)}
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}"
                            r"|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    def bpe(symbols: list[str]) -> list[str]:
        # Repeatedly merge the best-ranked adjacent pair wherever it occurs (leftmost first).
        while True:
            candidates = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
            if not candidates:
                return symbols
            _, (a, b) = min(candidates)
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out

    def encode(text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        out = []
        for word in pattern.findall(text):
            if word in ("<|startoftext|>", "<|endoftext|>"):
                out.append(ids[word])
                continue
            chars = [byte_char[b] for b in word.encode("utf-8")]
            chars[-1] += "</w>"
            out += [ids[s] for s in bpe(chars)]
        return out

    return {"vocab": vocab, "ids": ids, "encode": encode, "merge_lines": merge_lines}


VARIED = [
    "a photo of a cat.",
    "A PHOTO of   a\tDog\non the beach!!",
    "schÃ¶n",  # mojibake that ftfy repairs to "schön"
    "Tom &amp;amp; Jerry &lt;3",  # HTML escaped twice
    "<p>Tom &amp;amp; Jerry</p>",  # ftfy leaves entities inside markup alone; CLIP unescapes twice
    "naïve café — déjà vu, ½ price…",
    "東京タワーの夜景 🗼✨ 2024",
    "emoji only 🐱🐶🦄👩‍👩‍👧",
    "don't, you'll, we've, I'm, she'd, it's, they're",
    "price: $1,299.99 (incl. 20% VAT) #deal @shop",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "Ελληνικά кириллица עברית العربية हिन्दी",
    "<b>bold</b> & <i>italic</i> \\ / | ~ ` ^ _ { } [ ]",
]


def _random_captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ABCXYZ0123456789.,;:!?'\"-()&<>/éüßñ漢字🙂"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Known answers.

def test_cat_example_matches_openai_clip(tk):
    row = tk("a photo of a cat.")
    assert row.shape == (1, 77) and row.dtype == torch.long
    expected = [49406, 320, 1125, 539, 320, 2368, 269, 49407] + [0] * 69
    assert row[0].tolist() == expected


def test_clip_readme_examples(tk):
    # OpenAI CLIP's README tokenises ["a diagram", "a dog", "a cat"].
    assert tk.encode("a diagram") == [320, 22697]
    assert tk.encode("a dog") == [320, 1929]
    assert tk.encode("a cat") == [320, 2368]
    # Ids published for this sentence in other CLIP tokenizer tests (e.g. Apple's corenet).
    assert tk.encode("the quick brown fox jumped over the lazy dog") == [
        518, 3712, 2866, 3240, 16901, 962, 518, 10753, 1929]


def test_vocabulary_layout(tk, naive):
    assert tk.vocab_size == VOCAB_SIZE == len(naive["vocab"]) == 49408
    assert tk.decoder == dict(enumerate(naive["vocab"]))
    assert tk.decoder[0] == "!" and tk.decoder[256] == "!</w>"
    assert tk.encoder["a</w>"] == 320 and tk.encoder[".</w>"] == 269
    assert tk.encoder["<|startoftext|>"] == SOT_TOKEN and tk.encoder["<|endoftext|>"] == EOT_TOKEN


@pytest.mark.parametrize("word,symbol,known_id", [("photo", "photo</w>", 1125),
                                                   ("diagram", "diagram</w>", 22697)])
def test_many_merge_word_is_one_id_at_its_vocab_file_line(tk, naive, word, symbol, known_id):
    # Merge line k of the file (1-based, after the header) is id 511 + k: an off-by-one in reading
    # the merges shifts every id and breaks this.
    line_number = 1 + naive["merge_lines"].index(next(m for m in naive["merge_lines"]
                                                      if m.replace(" ", "") == symbol))
    assert 511 + line_number == known_id
    assert tk.encode(word) == [known_id]
    assert tk.encode(" " + word.upper() + " ") == [known_id]


def test_agrees_with_naive_bpe(tk, naive):
    for text in VARIED + _random_captions(200, seed=0):
        assert tk.encode(text) == naive["encode"](text), text


def test_ftfy_and_html_cleanup(tk):
    assert clean_text("schÃ¶n") == "schön"
    assert clean_text("Tom &amp;amp; Jerry") == "tom & jerry"
    assert clean_text("<p>Tom &amp;amp; Jerry</p>") == "<p>tom & jerry</p>"
    assert clean_text("  A\t\nB   C ") == "a b c"
    assert tk.encode("schÃ¶n") == tk.encode("schön")


def test_ascii_shortcut_matches_full_cleanup():
    def full(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    rng = random.Random(1)
    printable_ascii = [chr(c) for c in range(32, 127) if chr(c) != "&"]
    texts = ["".join(rng.choice(printable_ascii) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    texts += ['"quoted" <tag> it\'s 3 > 2 < 4 \\n', "  lead and trail  "]
    for text in texts:
        assert clean_text(text) == full(text), text


def test_decode_round_trip(tk):
    assert tk.decode(tk.encode("a photo of a cat.")) == "a photo of a cat . "
    for text in VARIED + _random_captions(100, seed=2):
        decoded = tk.decode(tk.encode(text))
        # Decoding puts a space after every word, so compare with spaces removed.
        assert decoded.replace(" ", "") == clean_text(text).replace(" ", ""), text


def test_decode_accepts_a_tensor_row_and_rejects_unknown_ids(tk):
    row = tk("a dog")[0]
    assert tk.decode(row[1:3]) == "a dog "
    assert tk.decode(row[:4]) == "<|startoftext|>a dog <|endoftext|>"
    with pytest.raises(ValueError, match="49408"):
        tk.decode([VOCAB_SIZE])


def test_special_token_text_maps_to_special_ids_like_clip(tk):
    assert tk.encode("a <|endoftext|> b") == [320, EOT_TOKEN, 321]  # 321 = "b</w>"


# ---------------------------------------------------------------------------------------------
# Padding, truncation, batches.

def test_padding_and_pool_position(tk):
    rows = tk(["a dog", "a photo of a cat."], context_length=12)
    assert rows.tolist() == [[SOT_TOKEN, 320, 1929, EOT_TOKEN] + [PAD_TOKEN] * 8,
                             [SOT_TOKEN, 320, 1125, 539, 320, 2368, 269, EOT_TOKEN] + [PAD_TOKEN] * 4]
    # CLIP pools the text tower at argmax of the ids: that must be EOT.
    assert rows.argmax(dim=-1).tolist() == [3, 7]


@pytest.mark.parametrize("n_words", [75, 76, 200])
def test_truncation_keeps_eot_last(tk, n_words):
    caption = " ".join(["dog"] * n_words)
    body = tk.encode(caption)
    assert len(body) == n_words
    row = tk(caption)[0]
    assert row.shape == (77,)
    assert row[0] == SOT_TOKEN and row[76] == EOT_TOKEN
    assert row[1:76].tolist() == body[:75]
    assert int(row.argmax()) == 76
    assert (row == EOT_TOKEN).sum() == 1


def test_tiny_context(tk):
    assert tk("a photo of a cat.", context_length=2).tolist() == [[SOT_TOKEN, EOT_TOKEN]]
    assert tk("a photo of a cat.", context_length=3).tolist() == [[SOT_TOKEN, 320, EOT_TOKEN]]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_caption(tk, text):
    assert tk.encode(text) == []
    assert tk(text, context_length=5).tolist() == [[SOT_TOKEN, EOT_TOKEN, 0, 0, 0]]


def test_batch_shapes(tk):
    assert tk(["a", "b", "c"]).shape == (3, 77)
    assert tk(("a", "b"), context_length=16).shape == (2, 16)
    assert tk("a", context_length=np.int64(16)).shape == (1, 16)  # e.g. a value read from a config array
    assert tk(c for c in ["a", "b"]).shape == (2, 77)
    empty = tk([])
    assert empty.shape == (0, 77) and empty.dtype == torch.long


def test_module_tokenize_uses_one_cached_tokenizer(tk):
    assert tok.default_tokenizer() is tok.default_tokenizer()
    captions = ["a photo of a cat.", "Ελληνικά 🐱"]
    assert torch.equal(tokenize(captions), tk(captions))
    assert torch.equal(tokenize(captions[0], context_length=9), tk(captions[:1], context_length=9))


def test_pickles_small_and_rebuilds(tk):
    data = pickle.dumps(tk)
    assert len(data) < 1000  # a dataloader worker rebuilds the tables, they are not shipped
    assert pickle.loads(data).encode("a photo of a cat.") == tk.encode("a photo of a cat.")


def test_word_cache_stays_bounded(monkeypatch, naive):
    monkeypatch.setattr(tok, "_WORD_CACHE_LIMIT", 5)
    small = Tokenizer()
    text = " ".join(f"w{c}{d}" for c in "abcdefgh" for d in "xyz")
    assert small.encode(text) == small.encode(text) == naive["encode"](text)
    assert len(small._word_ids) <= 5


# ---------------------------------------------------------------------------------------------
# Mistakes are reported, never tokenised as "nan" or "none".

@pytest.mark.parametrize("bad,type_name", [(None, "NoneType"), (math.nan, "float"), (7, "int"),
                                           (b"a cat", "bytes")])
def test_non_string_caption_names_index_and_type(tk, bad, type_name):
    with pytest.raises(tok.CaptionTypeError, match=rf"caption 1 must be a str, got {type_name}") as info:
        tk(["a dog", bad, "a cat"])
    assert isinstance(info.value, TypeError) and isinstance(info.value, UserError)
    with pytest.raises(TypeError):
        tk.encode(bad)


@pytest.mark.parametrize("bad", [None, b"a cat", 3.5])
def test_non_string_batch_rejected(tk, bad):
    with pytest.raises(TypeError, match="str or a sequence of str"):
        tk(bad)


@pytest.mark.parametrize("context_length", [1, 0, -5, 2.5, True, "77"])
def test_bad_context_length(tk, context_length):
    with pytest.raises(UserError, match="context_length"):
        tk("a cat", context_length=context_length)
