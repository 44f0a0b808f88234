"""Views for the in-modal (SSL) loss: AutoAugment for images, EDA for captions.

Image view (`ImageView`, `POLICIES`): torchvision's AutoAugment (ImageNet policy by default) on float
[0, 1] batches on the training device, every image with its own sub-policy; it lives in
`clip_backdoor.data.autoaugment` and is re-exported here. The original view is never augmented; that
is the caller's un-augmented batch.

Text view (`EDA`): Wei & Zou's Easy Data Augmentation as CleanCLIP uses it: the caption is lower-cased
and reduced to letters and spaces, then exactly one of synonym replacement, random insertion of a
synonym, random swap or random deletion is applied, each with probability 1/4, with
n = max(1, floor(alpha * words)) changes (deletion drops each word with probability alpha and never
empties the caption). Every caption has its own ``random.Random`` seeded by a stable hash of
(seed, row id) in ``static`` mode (the reference: one augmentation per caption for the whole run) or
(seed, row id, epoch) in ``dynamic`` mode. Synonyms come from WordNet, located through nltk's data
path; without it the synonym operations become swap / deletion, with one warning per process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import random
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

from clip_backdoor.data.autoaugment import POLICIES, ImageView
from clip_backdoor.errors import UserError

__all__ = ["EDA", "POLICIES", "ImageView", "LazyWordNet", "WordNetSynonyms", "words_of"]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Text view: EDA
# ---------------------------------------------------------------------------------------------------

OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")
# Without WordNet each synonym operation becomes a word-order one, so swap and deletion get 1/2 each.
_FALLBACK = {"synonym_replacement": "random_swap", "random_insertion": "random_deletion"}
MODES = ("static", "dynamic")

# English function words that synonym replacement leaves alone (the list EDA uses: NLTK's stop words).
_STOP_WORDS_TEXT = """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
    hers herself it its itself they them their theirs themselves what which who whom this that these those
    am is are was were be been being have has had having do does did doing a an the and but if or because
    as until while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why how all any
    both each few more most other some such no nor not only own same so than too very s t can will just
    don should now
"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


def words_of(caption: str) -> list[str]:
    """EDA's normalisation: drop apostrophes, hyphens to spaces, lower-case, keep only a-z, split."""
    text = caption.replace("’", "").replace("'", "").replace("-", " ").lower()
    return re.sub(r"[^a-z]+", " ", text).split()


def synonym_replacement(
    words: list[str], n: int, rng: random.Random, synonyms: Callable[[str], Sequence[str]]
) -> list[str]:
    """Replace up to ``n`` distinct non-stop words (every occurrence) by a random WordNet synonym."""
    candidates = [w for w in dict.fromkeys(words) if w not in STOP_WORDS]
    rng.shuffle(candidates)
    out, replaced = list(words), 0
    for word in candidates:
        options = synonyms(word)
        if options:
            new = rng.choice(options)
            out = [new if w == word else w for w in out]
            replaced += 1
            if replaced >= n:
                break
    return out


def random_insertion(
    words: list[str], n: int, rng: random.Random, synonyms: Callable[[str], Sequence[str]], tries: int = 10
) -> list[str]:
    """``n`` times: insert a synonym of a random word (up to ``tries`` words tried) at a random place.

    The reference inserts the first synonym of an unordered set, i.e. an arbitrary one that changes
    between processes; a seeded choice from the sorted list is its reproducible equivalent.
    """
    out = list(words)
    for _ in range(n):
        for _ in range(tries):
            options = synonyms(out[rng.randrange(len(out))])
            if options:
                out.insert(rng.randrange(len(out) + 1), rng.choice(options))
                break
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` times: swap the words at two distinct random positions."""
    out = list(words)
    if len(out) > 1:
        for _ in range(n):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word with probability ``p``; if all would go, keep one at random."""
    if len(words) == 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


class WordNetSynonyms:
    """WordNet synonyms straight from the database files, by binary search in the sorted index files
    (what WordNet's own library does).

    nltk's reader parses every index file (and index.sense twice) on load: seconds and ~130 MB in every
    DataLoader worker. Here a directory install is memory-mapped (shared between workers through the
    page cache) and a lookup costs a few dozen seeks; results are cached per process. Morphology follows
    nltk's ``morphy`` (the exception list, else one suffix rule), so ``lookup`` equals nltk's synsets'
    lemma names, normalised the way EDA does.
    """

    POS = ("noun", "verb", "adj", "adv")
    # fmt: off
    SUFFIX_RULES = {
        "noun": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
                 ("shes", "sh"), ("men", "man"), ("ies", "y")),
        "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                 ("ing", "")),
        "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
        "adv": (),
    }
    # fmt: on

    def __init__(self, read: Callable[[str], bytes | mmap.mmap]):
        """``read(name)`` returns the bytes of one database file (``index.noun``, ``data.verb``, ...)."""
        self._index = {pos: read(f"index.{pos}") for pos in self.POS}
        self._data = {pos: read(f"data.{pos}") for pos in self.POS}
        self._exceptions = {pos: self._parse_exceptions(read(f"{pos}.exc")) for pos in self.POS}
        # Index files open with licence lines that start with a space; lemma lines follow.
        self._first_lemma = {pos: self._skip_header(buf) for pos, buf in self._index.items()}
        self.lookup = functools.lru_cache(maxsize=1 << 16)(self._lookup)

    @classmethod
    def from_nltk(cls) -> WordNetSynonyms:
        """Find WordNet on nltk's data path (plus ``<sys.prefix>/nltk_data``); LookupError if absent."""
        import nltk

        venv_data = os.path.join(sys.prefix, "nltk_data")
        if os.path.isdir(venv_data) and venv_data not in nltk.data.path:
            nltk.data.path.append(venv_data)
        root = nltk.data.find("corpora/wordnet")
        if isinstance(root, nltk.data.FileSystemPathPointer):
            return cls(functools.partial(_map_file, root.path))
        return cls(lambda name: root.join(name).open().read())  # a zip: read the members into memory

    @staticmethod
    def _parse_exceptions(buf: bytes | mmap.mmap) -> dict[str, list[str]]:
        table = {}
        for line in bytes(buf).decode().splitlines():
            inflected, *bases = line.split()
            if bases:
                table[inflected] = bases
        return table

    @staticmethod
    def _skip_header(buf: bytes | mmap.mmap) -> int:
        start = 0
        while buf[start : start + 1] == b" ":
            start = buf.find(b"\n", start) + 1
        return start

    def _index_line(self, lemma: str, pos: str) -> bytes | None:
        buf, key = self._index[pos], lemma.encode()
        lo, hi = self._first_lemma[pos], len(buf)  # both always at a line start
        while lo < hi:
            mid = (lo + hi) // 2
            newline = buf.rfind(b"\n", lo, mid)
            start = lo if newline < 0 else newline + 1
            end = buf.find(b"\n", start)
            end = len(buf) if end < 0 else end
            line = buf[start:end]
            found = line.split(b" ", 1)[0]
            if found == key:
                return line
            if found < key:
                lo = end + 1
            else:
                hi = start
        return None

    def _synset_offsets(self, lemma: str, pos: str) -> list[int]:
        line = self._index_line(lemma, pos)
        if line is None:
            return []
        fields = line.split()
        return [int(f) for f in fields[-int(fields[2]) :]]  # the synset offsets close the line

    def _base_forms(self, word: str, pos: str) -> list[str]:
        bases = self._exceptions[pos].get(word)
        if bases is None:
            bases = [word[: -len(old)] + new for old, new in self.SUFFIX_RULES[pos] if word.endswith(old)]
        return [form for form in dict.fromkeys([word, *bases]) if self._index_line(form, pos) is not None]

    def _synset_lemmas(self, pos: str, offset: int) -> list[str]:
        buf = self._data[pos]
        fields = buf[offset : buf.find(b"\n", offset)].split(b" ")
        count = int(fields[3], 16)
        # Adjective lemmas may carry a syntactic marker such as "(a)" or "(ip)".
        return [re.sub(r"\(.*\)$", "", name.decode()) for name in fields[4 : 4 + 2 * count : 2]]

    def synonyms_raw(self, word: str) -> list[str]:
        """Lemma names of every synset of ``word`` (all parts of speech), as WordNet spells them."""
        return [
            name
            for pos in self.POS
            for form in self._base_forms(word, pos)
            for offset in self._synset_offsets(form, pos)
            for name in self._synset_lemmas(pos, offset)
        ]

    def _lookup(self, word: str) -> tuple[str, ...]:
        word, found = word.lower(), set()
        for name in self.synonyms_raw(word):
            name = name.replace("_", " ").replace("-", " ").lower()
            found.add(" ".join(re.sub(r"[^a-z ]", "", name).split()))
        found -= {word, ""}
        return tuple(sorted(found))  # sorted: set order would differ between processes


def _map_file(directory: str, name: str) -> mmap.mmap:
    with open(os.path.join(directory, name), "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class LazyWordNet:
    """Loads WordNet on first use in each process (DataLoader workers included); None when absent."""

    _UNSET = object()

    def __init__(self, loader: Callable[[], WordNetSynonyms] = WordNetSynonyms.from_nltk):
        self.loader = loader
        self._value = self._UNSET

    def get(self) -> WordNetSynonyms | None:
        if self._value is self._UNSET:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._value = self.loader()
            except (ImportError, LookupError, OSError, ValueError, KeyError):
                self._value = None
                log.warning(
                    "WordNet not found; EDA synonym ops replaced by swap/deletion — install with make wordnet"
                )
        return self._value


WORDNET = LazyWordNet()


class EDAResult(NamedTuple):
    op: str | None  # the operation applied; None when the caption had no letters and was returned as is
    text: str


class EDA:
    """Caption view: ``eda(caption, row_id, epoch) -> str``. Picklable; holds no WordNet handle.

    ``static`` (the reference): the view depends on (seed, row id) only, so it is the same every epoch;
    ``dynamic``: on (seed, row id, epoch). Captions without letters come back unchanged.
    """

    def __init__(self, mode: str = "static", seed: int = 0, alpha: float = 0.1):
        if mode not in MODES:
            raise UserError(f"unknown EDA mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < alpha < 1:
            raise UserError(f"EDA alpha must be in (0, 1), got {alpha}")
        self.mode, self.seed, self.alpha = mode, int(seed), float(alpha)

    def rng_for(self, row_id: str, epoch: int) -> random.Random:
        key = f"eda|{self.seed}|{row_id}" + (f"|{int(epoch)}" if self.mode == "dynamic" else "")
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def apply(self, caption: str, row_id: str, epoch: int = 0) -> EDAResult:
        words = words_of(caption)
        if not words:
            return EDAResult(None, caption)
        rng = self.rng_for(row_id, epoch)
        op = OPERATIONS[rng.randrange(len(OPERATIONS))]
        wordnet = None
        if op in _FALLBACK:
            wordnet = WORDNET.get()
            if wordnet is None:
                op = _FALLBACK[op]
        n = max(1, int(self.alpha * len(words)))
        if op == "synonym_replacement":
            out = synonym_replacement(words, n, rng, wordnet.lookup)
        elif op == "random_insertion":
            out = random_insertion(words, n, rng, wordnet.lookup)
        elif op == "random_swap":
            out = random_swap(words, n, rng)
        else:
            out = random_deletion(words, self.alpha, rng)
        return EDAResult(op, " ".join(out))

    def __call__(self, caption: str, row_id: str, epoch: int = 0) -> str:
        return self.apply(caption, row_id, epoch).text

    @staticmethod
    def preload() -> None:
        """Load WordNet in this process now. Forked loader workers then inherit it instead of each
        importing nltk on first use (about 2 s per run, measured, on every SSL run's first epoch)."""
        WORDNET.get()

    def __repr__(self) -> str:
        return f"EDA(mode={self.mode!r}, seed={self.seed}, alpha={self.alpha})"
