"""CLIP's byte-level BPE tokenizer, token for token the same ids as OpenAI's ``SimpleTokenizer``.

A caption becomes ``[SOT] + bpe[:context_length - 2] + [EOT]`` padded with 0. The text tower pools
at the argmax of the ids, i.e. at EOT, so a too-long caption keeps its EOT as the last token (the
reference code cut it off and pooled at an ordinary word). The vocabulary ships as package data
(``data/assets/bpe_simple_vocab_16e6.txt.gz``, MIT, OpenAI).

Like CLIP, a caption that literally contains ``<|startoftext|>`` or ``<|endoftext|>`` gets the
special id for it; the pretrained text towers were trained that way.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import numbers
from collections.abc import Iterable, Sequence

import ftfy
import regex
import torch

from clip_backdoor.errors import UserError

SOT_TOKEN = 49406
EOT_TOKEN = 49407
PAD_TOKEN = 0
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77

_VOCAB_RESOURCE = ("clip_backdoor.data", "assets/bpe_simple_vocab_16e6.txt.gz")
# CLIP uses the first 49152 - 256 - 2 merges: with 256 bytes, their 256 word-final forms and the 2
# special tokens the vocabulary is exactly 49408 entries.
_NUM_MERGES = 49152 - 256 - 2
_SOT_TEXT, _EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
# Contractions, runs of letters, single digits, runs of other non-space symbols (CLIP's pattern).
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Distinct words seen; the cache is dropped when it grows past this so a web-scale stream of
# rare words cannot grow memory without bound.
_WORD_CACHE_LIMIT = 500_000


class CaptionTypeError(UserError, TypeError):
    """A caption that is not a ``str`` (None, NaN from a CSV reader, bytes, a number)."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so BPE never sees whitespace or control bytes.

    Printable Latin-1 bytes map to themselves; the other 68 bytes go to chr(256), chr(257), ... in
    byte order. The insertion order of the dict is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """CLIP's cleanup: fix mojibake (ftfy), unescape HTML twice, collapse whitespace, lowercase."""
    # Printable ASCII without '&' is left unchanged by ftfy and unescaping, and ftfy is half of the
    # cost of tokenising a typical caption; tests check the shortcut against the full path.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _load_merges() -> list[tuple[str, str]]:
    package, name = _VOCAB_RESOURCE
    data = importlib.resources.files(package).joinpath(name).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"damaged BPE vocabulary {name}: expected {_NUM_MERGES} merge lines")
    return merges


def _adjacent_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word, word[1:]))


class Tokenizer:
    """CLIP byte-level BPE. ``encode``/``decode`` work on bare ids; calling it gives padded batches.

    Pickling sends no tables: a worker process rebuilds them from the shipped vocabulary.
    """

    def __init__(self) -> None:
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        merges = _load_merges()
        byte_symbols = list(self.byte_encoder.values())
        vocab = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *("".join(m) for m in merges),
                 _SOT_TEXT, _EOT_TEXT]
        self.encoder: dict[str, int] = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.merge_ranks: dict[tuple[str, str], int] = {m: rank for rank, m in enumerate(merges)}
        assert len(self.encoder) == VOCAB_SIZE and self.encoder[_EOT_TEXT] == EOT_TOKEN
        self._word_ids: dict[str, tuple[int, ...]] = {}  # cache: a word as matched -> its ids

    def __reduce__(self):
        return (type(self), ())

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Split one pre-tokenised word (already byte-encoded) into vocabulary symbols."""
        if word in (_SOT_TEXT, _EOT_TEXT):
            return (word,)
        # The last character carries the end-of-word marker, so "cat" and the "cat" in "cats" differ.
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            # The earliest-learned merge goes first; _NUM_MERGES ranks after every real merge.
            pair = min(_adjacent_pairs(parts), key=lambda p: self.merge_ranks.get(p, _NUM_MERGES))
            if pair not in self.merge_ranks:
                break
            parts = self._merge(parts, pair)
        return parts

    @staticmethod
    def _merge(parts: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
        """Replace every non-overlapping occurrence of ``pair``, scanning left to right."""
        first, second = pair
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if parts[i] == first and i + 1 < len(parts) and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        return tuple(merged)

    def encode(self, text: str) -> list[int]:
        """Token ids of one caption, without SOT/EOT."""
        if not isinstance(text, str):
            raise CaptionTypeError(f"caption must be a str, got {type(text).__name__}: {text!r:.60}")
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            word_ids = self._word_ids.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        byte_word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        word_ids = tuple(self.encoder[symbol] for symbol in self.bpe(byte_word))
        if len(self._word_ids) >= _WORD_CACHE_LIMIT:
            self._word_ids.clear()
        self._word_ids[word] = word_ids
        return word_ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of bare ids as CLIP decodes it: every word end becomes a space; SOT/EOT/pad are kept."""
        out = bytearray()
        for token in ids:
            symbol = self.decoder.get(int(token))
            if symbol is None:
                raise ValueError(f"token id {int(token)} is outside the vocabulary [0, {VOCAB_SIZE})")
            word_end = symbol.endswith("</w>")
            out.extend(self.byte_decoder[c] for c in (symbol[:-4] if word_end else symbol))
            if word_end:
                out.extend(b" ")
        # A symbol may hold part of a multi-byte character; decoding all bytes at once rejoins it.
        return out.decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str],
                 context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """Captions -> LongTensor ``[B, context_length]``: SOT, ids, EOT (kept under truncation), zeros."""
        context_length = _checked_context_length(context_length)
        captions = _as_caption_list(texts)
        rows = []
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise CaptionTypeError(
                    f"caption {index} must be a str, got {type(caption).__name__}: {caption!r:.60}")
            body = self.encode(caption)[:context_length - 2]
            row = [SOT_TOKEN, *body, EOT_TOKEN]
            rows.append(row + [PAD_TOKEN] * (context_length - len(row)))
        if not rows:
            return torch.zeros((0, context_length), dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)


def _checked_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral) \
            or context_length < 2:
        raise UserError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
    return int(context_length)


def _as_caption_list(texts: str | Sequence[str]) -> list:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise CaptionTypeError(f"expected a str or a sequence of str, got {type(texts).__name__}")
    return list(texts)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The process-wide tokenizer, built on first use (a forked or spawned worker builds its own)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Captions -> LongTensor ``[B, context_length]`` with the shared default tokenizer."""
    return default_tokenizer()(texts, context_length)
