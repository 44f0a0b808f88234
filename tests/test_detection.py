"""Poisoned-sample detection: each score against a naive implementation of the reference's formulas,
outliers of a constructed point cloud found, AUROC against a pairwise count, bounded batches, the
`detect` command end to end, and the filtered manifest of filter-then-retrain."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from clip_backdoor import detection as D
from clip_backdoor.cli import main as cli
from clip_backdoor.data.captions import Sample
from clip_backdoor.errors import UserError


# --------------------------------------------------------------------------------------------
# Naive versions: loops over points, math.dist, the formulas as the reference writes them
# --------------------------------------------------------------------------------------------
def naive_refs(x, t, i):
    """Sample i's reference points, in the reference's order: other images, then other captions."""
    refs = [("img", j, x[j]) for j in range(len(x)) if j != i]
    if t is not None:
        refs += [("txt", j, t[j]) for j in range(len(t)) if j != i]
    return refs


def naive_sorted(x, t, i):
    pairs = [(math.dist(x[i], p), kind, j) for kind, j, p in naive_refs(x, t, i)]
    return sorted(pairs, key=lambda e: e[0])


def naive_lid(dists, k):
    return -k / sum(math.log(dists[j] / dists[k] + 1e-4) for j in range(k))


def naive_scores(x, t, k, lid_k):
    x = [list(map(float, r)) for r in x]
    t = None if t is None else [list(map(float, r)) for r in t]
    full = x + (t or [])
    index = {("img", j): j for j in range(len(x))}
    index.update({("txt", j): len(x) + j for j in range(len(t or []))})
    out = {"kdist": [], "lid": [], "dao": []}
    for i in range(len(x)):
        ranked = naive_sorted(x, t, i)
        a = [d for d, _, _ in ranked]
        out["kdist"].append(a[k])
        out["lid"].append(naive_lid(a, lid_k))
        terms = []
        for _, kind, j in ranked[:k]:  # the k nearest references, as the points they are
            f = sorted(math.dist(full[index[(kind, j)]], q) for q in full)  # itself included, at 0
            terms.append(naive_lid(f, k) * math.log(a[k] / f[k]))
        out["dao"].append(sum(terms) / k)
    return out


def cloud(n_in=36, n_out=4, dim=8, seed=0):
    """Inliers: a tight cluster, each caption next to its image; outliers: images far from everything
    (and from each other), captions next to them."""
    g = np.random.default_rng(seed)
    inliers = g.normal(0, 0.1, (n_in, dim))
    outliers = 5 * np.eye(dim)[:n_out] + g.normal(0, 0.01, (n_out, dim))
    x = np.concatenate([inliers, outliers])
    t = x + g.normal(0, 0.05, x.shape)
    order = g.permutation(len(x))
    return x[order], t[order], order >= n_in


@pytest.mark.parametrize("with_texts", [True, False])
def test_scores_equal_the_naive_formulas(with_texts):
    x, t, _ = cloud()
    t = t if with_texts else None
    k, lid_k = 5, 9
    got = D.score_batch(torch.tensor(x, dtype=torch.float32),
                        None if t is None else torch.tensor(t, dtype=torch.float32), k=k, lid_k=lid_k)
    want = naive_scores(x, t, k, lid_k)
    for name in D.DETECTORS:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=2e-4, atol=1e-5, err_msg=name)


def test_k_dist_is_the_k_plus_first_neighbour_without_the_own_pair():
    # one dimension, so the distances are readable: image 0 at 0, others at 1, 2, 3; captions at +10
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    t = x + 10
    s = D.score_batch(x, t, detectors=("kdist",), k=1)["kdist"]
    # image 0's references: images 1, 2, 3 and captions 11, 12, 13 (its own caption 10 left out)
    assert s[0].item() == pytest.approx(2.0)  # a[1]: the second nearest, not the first
    s = D.score_batch(x, None, detectors=("kdist",), k=2)["kdist"]
    assert s[0].item() == pytest.approx(3.0)


def test_outliers_score_highest_on_every_detector():
    x, t, is_outlier = cloud()
    scores = D.score_batch(torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                           k=5, lid_k=9)
    for name, s in scores.items():
        s = s.numpy()
        assert s[is_outlier].min() > s[~is_outlier].max(), name
        assert D.auroc(s, is_outlier) == 1.0


def test_dao_maps_neighbours_to_the_points_they_are():
    """The reference indexes the full matrix with positions in the self-excluded list; here the
    neighbours are the right points, so DAO is invariant to reordering the batch."""
    x, t, _ = cloud(seed=3)
    xt, tt = torch.tensor(x, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    base = D.score_batch(xt, tt, detectors=("dao",), k=5)["dao"]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = D.score_batch(xt[perm], tt[perm], detectors=("dao",), k=5)["dao"]
    torch.testing.assert_close(shuffled, base[perm], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# AUROC, precision and recall
# --------------------------------------------------------------------------------------------
def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pairwise_count_with_ties(seed):
    g = np.random.default_rng(seed)
    scores = g.integers(0, 6, 80).astype(float)  # many ties
    labels = g.random(80) < 0.3
    assert D.auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels))
    from sklearn.metrics import roc_auc_score

    assert D.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_auroc_edge_cases():
    assert D.auroc([1, 2, 3], [False, False, True]) == 1.0
    assert D.auroc([3, 2, 1], [False, False, True]) == 0.0
    assert math.isnan(D.auroc([1, 2], [True, True]))


def test_precision_and_recall_at_the_poison_count():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.95])
    labels = np.array([1, 0, 0, 1, 0, 1], dtype=bool)  # P = 3; top 3: rows 5, 0, 2 -> 2 hits
    got = D.at_poison_count(scores, labels)
    assert got == {"precision_at_p": 2 / 3, "recall_at_p": 2 / 3}
    assert list(D.top_rows(np.array([1.0, 2.0, 2.0, 0.0]), 2)) == [1, 2]  # ties: earlier row first


# --------------------------------------------------------------------------------------------
# Batches: every pair once, at least B per batch, never more than 2B - 1
# --------------------------------------------------------------------------------------------
class ListSource:
    def __init__(self, n, size=8):
        self.num_samples = n
        g = torch.Generator().manual_seed(0)
        self.samples = [Sample(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                               f"a photo of thing {i}", str(i), i % 5 == 0) for i in range(n)]

    def __iter__(self):
        return iter(self.samples)


@pytest.mark.parametrize(("n", "sizes"), [(10, [4, 6]), (8, [4, 4]), (3, [3]), (13, [4, 4, 5])])
def test_pair_batches_cover_every_row_once_with_the_remainder_merged(n, sizes):
    batches = list(D.pair_batches(ListSource(n), image_size=8, context_length=16, batch_size=4))
    assert [len(b["row_ids"]) for b in batches] == sizes
    ids = [r for b in batches for r in b["row_ids"]]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]
    for b in batches:
        assert b["images"].shape[0] == b["texts"].shape[0] == b["is_poison"].shape[0] == len(b["row_ids"])


def test_k_larger_than_the_batch_is_refused():
    D.check_k(5, 4, "pairs")  # 6 references: enough for a[5]
    with pytest.raises(UserError, match=r"--k=6 needs 7 reference points, but a batch of 4 pairs gives 6"):
        D.check_k(6, 4, "pairs")
    with pytest.raises(UserError, match="--k=3 needs 4"):
        D.check_k(3, 4, "images")
    with pytest.raises(UserError, match="unknown detector 'lof'"):
        D.check_detectors(["dao", "lof"])


# --------------------------------------------------------------------------------------------
# `clip-backdoor detect` end to end, and the filtered manifest
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """A tiny model pre-trained for one epoch on 256 synthetic pairs, 24 of them poisoned."""
    root = tmp_path_factory.mktemp("det")
    assert cli(["poison", "--source-kind", "synthetic", "--num-samples", "256", "--n", "24", "--trigger",
                "badnet", "--target", "banana", "--format", "manifest", "--image-size", "32",
                "--out", str(root / "poisoned")]) == 0
    assert cli(["pretrain", "--run-dir", str(root / "run"), "--epochs", "1", "--batch-size", "64",
                "data.num_samples=256", "data.workers=0", "eval.every=0", "threads=1",
                f"data.poison_manifest={root / 'poisoned' / 'manifest.csv'}"]) == 0
    return root


def test_detect_writes_scores_and_metrics(poisoned_run, tmp_path, monkeypatch):
    seen = []
    real = D.score_batch

    def spy(images, texts, **kw):
        seen.append(images.shape[0])
        return real(images, texts, **kw)

    monkeypatch.setattr(D, "score_batch", spy)
    out = tmp_path / "det"
    ckpt = poisoned_run / "run" / "checkpoints" / "latest.pt"
    assert cli(["detect", "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "100", "--k", "8",
                "--lid-k", "16"]) == 0
    assert seen == [100, 156]  # bounded by the batch: 256 = 100 + (100 + 56 merged), never N x N
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256 and len({r["row_id"] for r in rows}) == 256
    assert sum(int(r["is_poison"]) for r in rows) == 24
    summary = json.loads((out / "detection.json").read_text())
    assert summary["n_rows"] == 256 and summary["n_poison"] == 24 and summary["k"] == 8
    for name in D.DETECTORS:
        s = np.array([float(r[name]) for r in rows])
        y = np.array([r["is_poison"] == "1" for r in rows])
        m = summary["metrics"][name]
        assert m["auroc"] == pytest.approx(brute_auroc(s, y))
        assert m["precision_at_p"] == m["recall_at_p"] == D.at_poison_count(s, y)["recall_at_p"]


def test_detect_bad_input_is_one_line_naming_the_key(poisoned_run, tmp_path, capsys):
    ckpt = str(poisoned_run / "run" / "checkpoints" / "latest.pt")
    out = str(tmp_path / "d")
    cases = [
        (["--k", "600"], "--k=600 needs 601 reference points, but a batch of 256 pairs gives 510"),
        (["--lid-k", "600", "--reference", "images"], "--lid-k=600 needs 601 reference points"),
        (["--detectors", "kdist,lof"], "--detectors: unknown detector 'lof'"),
        (["data.num_samples=200"], "manifest.csv: lists 256 rows but the data has 200; is it the manifest"),
        (["--batch-size", "1"], "--batch-size: 1 must be an integer >= 2"),
    ]
    for flags, message in cases:
        assert cli(["detect", "--checkpoint", ckpt, "--out", out, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (flags, err)


def test_a_manifest_of_other_rows_is_refused(poisoned_run, tmp_path):
    # same row count, other world: the captions of the poisoned rows do not match
    from clip_backdoor.config import DataConfig

    data = DataConfig(num_samples=256, world={"seed": 7},
                      poison_manifest=str(poisoned_run / "poisoned" / "manifest.csv"), workers=0)
    # the manifest's recorded source fingerprint refuses it before any row is read
    with pytest.raises(UserError, match="made for another synthetic source of 256 rows"):
        D.open_data(data, seed=0, image_size=32)


def test_poisons_of_the_manifest_missing_from_the_data_are_refused(poisoned_run, tmp_path):
    import json
    import shutil

    from clip_backdoor.attacks.manifest import PoisonedSource
    from clip_backdoor.data.captions import make_source
    from clip_backdoor.models import create_model

    base = make_source({"kind": "synthetic", "num_samples": 200, "world": {"image_size": 32}})
    with pytest.raises(UserError, match="made for a source of 256 rows, but this synthetic source has 200"):
        PoisonedSource(base, poisoned_run / "poisoned" / "manifest.csv", image_size=32)
    # An old manifest records no source fingerprint (accepted with a warning): detect's own count of
    # the poisons it met still catches the mismatch.
    old = tmp_path / "old"
    shutil.copytree(poisoned_run / "poisoned", old)
    info = json.loads((old / "poison.json").read_text())
    info.pop("source_fingerprint")
    (old / "poison.json").write_text(json.dumps(info))
    manifest = old / "manifest.csv"
    source = PoisonedSource(base, manifest, image_size=32)  # rows >= 200 (and their poisons) are absent
    with pytest.raises(UserError, match=r"marks 24 poisons but only \d+ of the data's rows matched"):
        D.detect(create_model("tiny"), source, tmp_path / "d", batch_size=64, k=4, lid_k=8,
                 manifest=str(manifest))


def test_filtered_manifest_drops_the_top_scored_rows_and_the_loader_honours_it(poisoned_run, tmp_path):
    from clip_backdoor.attacks.manifest import PoisonedSource, read_manifest
    from clip_backdoor.data.captions import make_source

    manifest = poisoned_run / "poisoned" / "manifest.csv"
    rows = list(read_manifest(manifest))
    # a perfect detector: the poisons score highest; budget 10% of 256 = 26 rows = 24 poisons + 2 more
    scores = {r.source_key: (10.0 if r.is_poison else 0.0) + int(r.source_key) / 1000 for r in rows}
    info = D.write_filtered_manifest(manifest, scores, 0.1, tmp_path / "filtered")
    assert info["filtered"]["n_removed"] == 26 and info["filtered"]["n_poison_removed"] == 24
    assert info["n_rows"] == 230 and info["subset"] is True and info["n_poison"] == 0
    kept = list(read_manifest(tmp_path / "filtered" / "manifest.csv"))
    assert len(kept) == 230 and not any(r.is_poison for r in kept)
    assert {"255", "254"}.isdisjoint(r.source_key for r in kept)  # the two highest clean scores
    base = make_source({"kind": "synthetic", "num_samples": 256, "world": {"image_size": 32},
                        "shuffle": False})
    source = PoisonedSource(base, tmp_path / "filtered" / "manifest.csv", image_size=32)
    assert source.num_samples == 230
    assert sorted(int(s.row_id) for s in source) == sorted(int(r.source_key) for r in kept)
    with pytest.raises(UserError, match="have no score"):
        D.write_filtered_manifest(manifest, dict(list(scores.items())[:10]), 0.1, tmp_path / "f2")
    with pytest.raises(UserError, match="budget"):
        D.write_filtered_manifest(manifest, scores, 1.5, tmp_path / "f3")
