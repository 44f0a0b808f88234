"""SSL views: EDA caption view (WordNet optional); the AutoAugment image view is in test_autoaugment.py."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import warnings
from collections import Counter

import pytest

from clip_backdoor.data import augment
from clip_backdoor.data.augment import EDA, ImageView, LazyWordNet, WordNetSynonyms, words_of
from clip_backdoor.errors import UserError

# ---------------------------------------------------------------------------------------------------
# EDA with a fake WordNet: every word w has exactly one synonym, "zz" + w.
# ---------------------------------------------------------------------------------------------------

# fmt: off
NATO = ["alfa", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
        "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
        "victor", "whiskey", "xray", "yankee", "zulu"]
# fmt: on


class FakeSynonyms:
    def lookup(self, word):
        return ("zz" + word,)


@pytest.fixture
def fake_wordnet(monkeypatch):
    monkeypatch.setattr(augment, "WORDNET", LazyWordNet(loader=FakeSynonyms))


def by_op(eda, caption, rows=400, epoch=0):
    """Apply ``eda`` to one caption under many row ids; group the outputs by the operation drawn."""
    out = {}
    for r in range(rows):
        op, text = eda.apply(caption, f"row{r}", epoch)
        out.setdefault(op, []).append(text.split())
    return out


def test_words_of_keeps_lowercase_letters_only():
    expected = ["a", "dogs", "life", "new", "caf", "s", "the", "end"]
    assert words_of("A Dog's-Life!\tNEW\n 42 cafés,the end") == expected
    assert words_of("it’s") == ["its"]


@pytest.mark.parametrize("caption", ["", "   ", "!!!", "1234", "😀 ✓", "- -- '"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_letter_free_captions_come_back_unchanged(caption, mode, fake_wordnet):
    for epoch in range(3):
        assert EDA(mode, seed=1).apply(caption, "r", epoch) == (None, caption)


def test_static_is_fixed_across_epochs_and_varies_across_rows(fake_wordnet):
    eda, caption = EDA("static", seed=3), " ".join(NATO[:12])
    views = [[eda(caption, f"r{r}", epoch) for epoch in range(5)] for r in range(40)]
    assert all(len(set(v)) == 1 for v in views)
    assert len({v[0] for v in views}) > 10


def test_dynamic_varies_across_epochs_and_is_reproducible(fake_wordnet):
    caption = " ".join(NATO[:12])
    a, b, other_seed = EDA("dynamic", seed=3), EDA("dynamic", seed=3), EDA("dynamic", seed=4)
    views = [[a(caption, f"r{r}", epoch) for epoch in range(5)] for r in range(40)]
    assert sum(len(set(v)) > 1 for v in views) >= 35
    assert views == [[b(caption, f"r{r}", epoch) for epoch in range(5)] for r in range(40)]
    assert sum(views[r][0] != other_seed(caption, f"r{r}", 0) for r in range(40)) >= 20
    # the same row id and epoch in static mode ignores the epoch, dynamic does not
    assert EDA("static", 3)(caption, "r0", 0) == EDA("static", 3)(caption, "r0", 7)


def test_each_operation_is_drawn_a_quarter_of_the_time(fake_wordnet):
    eda, caption = EDA("dynamic", seed=0), " ".join(NATO[:10])
    counts = Counter(eda.apply(caption, f"r{r % 1000}", r // 1000).op for r in range(4000))
    assert set(counts) == set(augment.OPERATIONS)
    for op in augment.OPERATIONS:  # sd of a frequency over 4000 draws is 0.007
        assert abs(counts[op] / 4000 - 0.25) < 0.03, counts


@pytest.mark.parametrize("n_words, n_changes", [(5, 1), (9, 1), (10, 1), (19, 1), (20, 2), (25, 2), (26, 2)])
def test_synonym_replacement_changes_n_non_stop_words(n_words, n_changes, fake_wordnet):
    # Stop words get fake synonyms too: only the stop-word rule keeps them.
    words = [w for pair in zip(NATO, ["the"] * 26) for w in pair][:n_words]
    outs = by_op(EDA("static"), " ".join(words))["synonym_replacement"]
    assert outs
    for out in outs:
        changed = [(w, o) for w, o in zip(words, out) if w != o]
        assert len(out) == len(words) and len(changed) == n_changes
        assert all(w not in augment.STOP_WORDS and o == "zz" + w for w, o in changed)


def test_synonym_replacement_replaces_every_occurrence():
    out = augment.synonym_replacement(["red", "car", "red"], 1, random.Random(0), lambda w: ("crimson",))
    assert out in (["crimson", "car", "crimson"], ["red", "crimson", "red"])


@pytest.mark.parametrize("n_words, n_changes", [(1, 1), (5, 1), (19, 1), (20, 2), (25, 2)])
def test_random_insertion_adds_n_synonyms_and_keeps_the_rest_in_order(n_words, n_changes, fake_wordnet):
    words = NATO[:n_words]
    outs = by_op(EDA("static"), " ".join(words))["random_insertion"]
    assert outs
    for out in outs:
        inserted = [w for w in out if w.startswith("zz")]
        assert len(out) == n_words + n_changes and len(inserted) == n_changes
        assert [w for w in out if not w.startswith("zz")] == words
        # a synonym of a word of the caption (or, as in the reference, of a word inserted just before)
        assert all(re.sub("^(zz)+", "", w) in words for w in inserted)


def test_random_swap_keeps_the_multiset(fake_wordnet):
    words = NATO[:25]
    outs = by_op(EDA("static"), " ".join(words))["random_swap"]
    assert outs
    for out in outs:
        assert sorted(out) == sorted(words)
        assert sum(a != b for a, b in zip(out, words)) <= 4  # two swaps
    assert any(out != words for out in outs)


def test_random_deletion_drops_about_alpha_and_never_empties(fake_wordnet):
    words = NATO[:25]
    outs = by_op(EDA("static"), " ".join(words), rows=2000)["random_deletion"]
    kept = []
    for out in outs:
        it = iter(words)
        assert all(w in it for w in out)  # a subsequence: order kept
        kept.append(len(out))
    assert abs(1 - sum(kept) / (25 * len(kept)) - 0.1) < 0.015
    for r in range(300):
        assert augment.random_deletion(["solo"], 0.9, random.Random(r)) == ["solo"]
        assert len(augment.random_deletion(["a", "b"], 0.99, random.Random(r))) == 1


def test_eda_never_touches_the_global_random_state(fake_wordnet):
    state = random.getstate()
    eda = EDA("dynamic", seed=5)
    for r in range(300):
        eda(" ".join(NATO[: 1 + r % 20]), f"r{r}", r % 3)
    assert random.getstate() == state


def test_eda_is_picklable_and_pickles_give_the_same_views(fake_wordnet):
    eda = EDA("dynamic", seed=9, alpha=0.2)
    eda("alfa bravo", "r", 0)  # WordNet loaded in this process: must not travel with the object
    copy = pickle.loads(pickle.dumps(eda))
    assert repr(copy) == repr(eda)
    caption = " ".join(NATO)
    assert [copy(caption, f"r{r}", 2) for r in range(50)] == [eda(caption, f"r{r}", 2) for r in range(50)]


@pytest.mark.parametrize("error", [LookupError("no wordnet"), ImportError("no nltk")])
def test_without_wordnet_synonym_ops_become_swap_or_deletion_with_one_warning(monkeypatch, caplog, error):
    def missing():
        raise error

    caption = " ".join(NATO[:20])
    monkeypatch.setattr(augment, "WORDNET", LazyWordNet(loader=FakeSynonyms))
    with_wordnet = [EDA("static", 2).apply(caption, f"r{r}").op for r in range(2000)]
    monkeypatch.setattr(augment, "WORDNET", LazyWordNet(loader=missing))
    with caplog.at_level(logging.WARNING, logger=augment.__name__):
        without = [EDA("static", 2).apply(caption, f"r{r}").op for r in range(2000)]
    records = [r for r in caplog.records if "WordNet not found" in r.getMessage()]
    assert len(records) == 1 and "make wordnet" in records[0].getMessage()
    fallback = {"synonym_replacement": "random_swap", "random_insertion": "random_deletion"}
    assert without == [fallback.get(op, op) for op in with_wordnet]
    assert abs(without.count("random_swap") / 2000 - 0.5) < 0.05


def test_invalid_settings_are_user_errors():
    with pytest.raises(UserError, match="mode"):
        EDA("sometimes")
    with pytest.raises(UserError, match="alpha"):
        EDA(alpha=0)
    with pytest.raises(UserError, match="policy"):
        ImageView("mnist")


# ---------------------------------------------------------------------------------------------------
# EDA with the real WordNet (skipped when it is not installed)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordnet():
    try:
        return WordNetSynonyms.from_nltk()
    except (ImportError, LookupError, OSError):
        pytest.skip("WordNet not installed (make wordnet)")


def nltk_synonyms(reader, word):
    """EDA's get_synonyms, written against nltk's own WordNet reader (the independent check)."""
    names = {lemma.name() for synset in reader.synsets(word) for lemma in synset.lemmas()}
    found = {
        " ".join(re.sub(r"[^a-z ]", "", n.replace("_", " ").replace("-", " ").lower()).split()) for n in names
    }
    return tuple(sorted(found - {word, ""}))


def test_wordnet_lookup_matches_nltk(wordnet):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishOnly(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # the multilingual map reads index.sense twice: skip it
            return None

    root = nltk.data.find("corpora/wordnet")
    with warnings.catch_warnings():  # "multilingual functions are not available"
        warnings.simplefilter("ignore")
        reader = EnglishOnly(root, None)
    # fmt: off
    words = ["dog", "dogs", "riding", "ran", "geese", "children", "bigger", "happiest", "boxes", "leaves",
             "a", "the", "photo", "banana", "quickly", "xyzzy", "zebras", "oxen", "better", "stopped"]
    # fmt: on
    if hasattr(root, "path"):  # plus every 400th lemma of each index file, and inflections made up
        for pos in WordNetSynonyms.POS:  # to exercise every suffix rule
            with open(os.path.join(root.path, f"index.{pos}")) as f:
                lemmas = [line.split()[0] for line in f if not line.startswith(" ")][::400]
            words += lemmas
            for lemma in filter(str.isalpha, lemmas):
                words += [lemma + end for end in ("s", "es", "ed", "ing", "er", "est")]
                words += [
                    re.sub(old + "$", new, lemma) for old, new in (("f", "ves"), ("y", "ies"), ("man", "men"))
                ]
    for word in words:
        assert wordnet.lookup(word) == nltk_synonyms(reader, word), word


def test_synonym_replacement_uses_wordnet_synonyms_of_non_stop_words(wordnet, monkeypatch):
    monkeypatch.setattr(augment, "WORDNET", LazyWordNet(loader=lambda: wordnet))
    caption = "A man is riding a red bicycle down the busy street next to the parked cars at sunset"
    words = words_of(caption)
    outs = [
        t
        for op, t in (EDA("static").apply(caption, f"r{r}") for r in range(200))
        if op == "synonym_replacement"
    ]
    assert outs
    changed_any = False
    for text in outs:
        # every original word that is missing from the output was a non-stop word with synonyms
        missing = [w for w in words if w not in text.split()]
        changed_any |= bool(missing)
        assert all(w not in augment.STOP_WORDS and wordnet.lookup(w) for w in missing)
        assert len(set(missing)) <= 1  # n = max(1, floor(0.1 * 17)) = 1
    assert changed_any
