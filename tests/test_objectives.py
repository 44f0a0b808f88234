"""Objectives against a naive per-row implementation, known closed forms, gradcheck and a 2-rank run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from _ddp_helpers import DDP_CASES, TinyTwoTower, ddp_worker, free_port, gradients, make_batch, train_step
from clip_backdoor.errors import UserError
from clip_backdoor.objectives import (
    Objective,
    all_gather_with_grad,
    mmcl_loss,
    split_views,
    ssl_loss,
)

# --- an independent naive implementation: plain Python floats, one row at a time ----------------------


def naive_ce(rows: torch.Tensor, columns: torch.Tensor, s: float) -> float:
    """mean_i [log Σ_j exp(s·<r_i, c_j>) − s·<r_i, c_i>], with a max-shifted log-sum-exp per row."""
    rows_list, cols_list = rows.tolist(), columns.tolist()
    total = 0.0
    for i, r in enumerate(rows_list):
        logits = [s * sum(a * b for a, b in zip(r, c)) for c in cols_list]
        top = max(logits)
        total += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[i]
    return total / len(rows_list)


def naive_mmcl(u, v, s):
    return (naive_ce(u, v, s) + naive_ce(v, u, s)) / 2


def naive_ssl(u, u_aug, v, v_aug, s, symmetric=False):
    if symmetric:
        image = (naive_ce(u, u_aug, s) + naive_ce(u_aug, u, s)) / 2
        text = (naive_ce(v, v_aug, s) + naive_ce(v_aug, v, s)) / 2
        return (image + text) / 2
    return (naive_ce(u, u_aug, s) + naive_ce(v, v_aug, s)) / 2


def random_features(n=7, d=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1) for _ in range(4)]


S = 3.7  # deliberately != 1 so a missing or misplaced temperature shows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny; on a loaded 2-core machine the intra-op thread pool makes each
    # cross_entropy call ~100x slower than running it on one thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- values ---------------------------------------------------------------------------------------------


def test_mmcl_matches_naive():
    u, v, _, _ = random_features()
    expected = naive_mmcl(u, v, S)
    assert mmcl_loss(u, v, S).item() == pytest.approx(expected, abs=1e-12)
    assert mmcl_loss(u, v, torch.tensor(S, dtype=torch.float64)).item() == pytest.approx(expected, abs=1e-12)
    out = Objective.from_name("mmcl")(image_features=u, text_features=v, logit_scale=torch.tensor(S))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ssl_matches_naive(symmetric):
    u, v, u_aug, v_aug = random_features(seed=1)
    expected = naive_ssl(u, u_aug, v, v_aug, S, symmetric=symmetric)
    got = ssl_loss(u, u_aug, v, v_aug, S, symmetric=symmetric)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_one_directional_ssl_is_not_the_symmetric_one():
    # Guards against the flag silently doing nothing: on random features the two directions differ.
    u, v, u_aug, v_aug = random_features(seed=2)
    one_way = ssl_loss(u, u_aug, v, v_aug, S).item()
    both_ways = ssl_loss(u, u_aug, v, v_aug, S, symmetric=True).item()
    assert one_way == pytest.approx(naive_ssl(u, u_aug, v, v_aug, S), abs=1e-12)
    assert abs(one_way - both_ways) > 1e-3


@pytest.mark.parametrize(
    "objective",
    [
        Objective(mmcl_weight=0.7, ssl_weight=2.5),
        Objective(mmcl_weight=1.0, ssl_weight=1.0, ssl_symmetric=True),
        Objective.from_name("ssl"),
        Objective.from_name("mmcl+ssl"),
    ],
    ids=repr,
)
def test_weighted_sum_matches_naive(objective):
    u, v, u_aug, v_aug = random_features(seed=3)
    mmcl = naive_mmcl(u, v, S)
    ssl = naive_ssl(u, u_aug, v, v_aug, S, symmetric=objective.ssl_symmetric)
    out = objective(
        image_features=u,
        text_features=v,
        image_aug_features=u_aug,
        text_aug_features=v_aug,
        logit_scale=torch.tensor(S, dtype=torch.float64),
    )
    expected = objective.mmcl_weight * mmcl + objective.ssl_weight * ssl
    assert out["loss"].item() == pytest.approx(expected, abs=1e-12)
    if objective.mmcl_weight > 0:
        assert out["loss_mmcl"].item() == pytest.approx(mmcl, abs=1e-12)
    assert out["loss_ssl"].item() == pytest.approx(ssl, abs=1e-12)


def test_identical_embeddings_give_log_n():
    # All logits equal: softmax is uniform, every row costs ln N, whatever the term.
    n = 6
    row = F.normalize(torch.arange(1.0, 5.0, dtype=torch.float64), dim=0)
    same = row.expand(n, -1).clone()
    assert mmcl_loss(same, same, 1.0).item() == pytest.approx(math.log(n), abs=1e-12)
    assert ssl_loss(same, same, same, same, 1.0).item() == pytest.approx(math.log(n), abs=1e-12)
    out = Objective.from_name("mmcl+ssl")(
        image_features=same,
        text_features=same,
        image_aug_features=same,
        text_aug_features=same,
        logit_scale=1.0,
    )
    assert out["loss_mmcl"].item() == pytest.approx(math.log(n), abs=1e-12)
    assert out["loss_ssl"].item() == pytest.approx(math.log(n), abs=1e-12)
    assert out["loss"].item() == pytest.approx(2 * math.log(n), abs=1e-12)


def test_perfect_alignment_with_large_scale_gives_zero():
    eye = torch.eye(5, dtype=torch.float64)
    out = Objective(mmcl_weight=1.0, ssl_weight=1.0, ssl_symmetric=True)(
        image_features=eye,
        text_features=eye,
        image_aug_features=eye,
        text_aug_features=eye,
        logit_scale=100.0,
    )
    for value in out.values():
        assert 0 <= value.item() < 1e-40


def test_half_precision_features_are_scored_in_float32():
    u, v, _, _ = random_features(n=16, d=8, seed=4)
    got = mmcl_loss(u.bfloat16(), v.bfloat16(), torch.tensor(50.0))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        naive_mmcl(u.bfloat16().double(), v.bfloat16().double(), 50.0), abs=1e-4
    )


# --- gradients ------------------------------------------------------------------------------------------


def test_gradcheck_through_features_and_scale():
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    log_scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    objective = Objective(mmcl_weight=0.6, ssl_weight=1.3)
    symmetric = Objective(mmcl_weight=0.0, ssl_weight=1.0, ssl_symmetric=True)

    def total(objective, u, v, u_aug, v_aug, log_scale):
        u, v, u_aug, v_aug = (F.normalize(x, dim=-1) for x in (u, v, u_aug, v_aug))
        out = objective(
            image_features=u,
            text_features=v,
            image_aug_features=u_aug,
            text_aug_features=v_aug,
            logit_scale=log_scale.exp(),
        )
        return out["loss"]

    assert torch.autograd.gradcheck(lambda *x: total(objective, *x), (*inputs, log_scale))
    assert torch.autograd.gradcheck(lambda *x: total(symmetric, *x), (*inputs, log_scale))
    assert torch.autograd.gradcheck(lambda u, v, s: mmcl_loss(u, v, s), (inputs[0], inputs[1], log_scale))


# --- which terms exist ------------------------------------------------------------------------------------


def test_terms_present_only_when_weighted():
    u, v, u_aug, v_aug = random_features(seed=6)
    aug = {"image_aug_features": u_aug, "text_aug_features": v_aug}
    mmcl = Objective.from_name("mmcl")
    assert set(mmcl(image_features=u, text_features=v, logit_scale=S)) == {"loss", "loss_mmcl"}
    # Views are ignored, not even shape-checked, when the SSL term is off.
    assert set(mmcl(image_features=u, text_features=v, logit_scale=S, image_aug_features=u_aug[:2])) == {
        "loss",
        "loss_mmcl",
    }
    ssl = Objective.from_name("ssl")
    assert set(ssl(image_features=u, text_features=v, logit_scale=S, **aug)) == {"loss", "loss_ssl"}
    both = Objective.from_name("mmcl+ssl")
    assert set(both(image_features=u, text_features=v, logit_scale=S, **aug)) == {
        "loss",
        "loss_mmcl",
        "loss_ssl",
    }


def test_names_properties_and_description():
    assert Objective() == Objective.from_name("mmcl")
    assert Objective.from_name(" MMCL+SSL ") == Objective(mmcl_weight=1.0, ssl_weight=1.0)
    assert Objective.from_name("ssl") == Objective(mmcl_weight=0.0, ssl_weight=1.0)
    assert Objective.from_name("ssl", ssl_symmetric=True).ssl_symmetric
    assert not Objective.from_name("mmcl").uses_ssl and Objective.from_name("ssl").uses_ssl
    assert Objective.from_name("mmcl+ssl").terms == ("mmcl", "ssl")
    assert Objective.from_name("ssl").terms == ("ssl",)
    weighted = Objective.from_weights({"mmcl": 1, "ssl": 4, "ssl_symmetric": True})
    assert weighted == Objective(mmcl_weight=1.0, ssl_weight=4.0, ssl_symmetric=True)
    assert Objective.from_weights({"ssl": 2}) == Objective(mmcl_weight=0.0, ssl_weight=2.0)
    assert Objective.from_spec("mmcl+ssl") == Objective.from_name("mmcl+ssl")
    assert Objective.from_spec({"mmcl": 2}) == Objective(mmcl_weight=2.0)
    assert Objective.from_spec(weighted) is weighted
    assert weighted.describe() == {
        "objective": "mmcl+ssl",
        "mmcl_weight": 1.0,
        "ssl_weight": 4.0,
        "ssl_symmetric": True,
    }
    assert "ssl_weight=4.0" in repr(weighted)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: Objective(mmcl_weight=-1.0), "mmcl_weight"),
        (lambda: Objective(mmcl_weight=1.0, ssl_weight=-0.5), "ssl_weight"),
        (lambda: Objective(mmcl_weight=0.0, ssl_weight=0.0), "both 0"),
        (lambda: Objective(mmcl_weight=float("nan")), "mmcl_weight"),
        (lambda: Objective(mmcl_weight=True), "mmcl_weight"),
        (lambda: Objective(ssl_weight="1"), "ssl_weight"),
        (lambda: Objective(ssl_weight=1.0, ssl_symmetric="yes"), "ssl_symmetric"),
        (lambda: Objective.from_name("clip"), "unknown name 'clip'"),
        (lambda: Objective.from_weights({"mmcl": 1, "inmodal": 1}), "unknown key 'inmodal'"),
        (lambda: Objective.from_weights({}), "both 0"),
        (lambda: Objective.from_spec(3), "expected a name"),
    ],
)
def test_invalid_objectives_are_user_errors(build, fragment):
    with pytest.raises(UserError, match=fragment):
        build()


def test_missing_views_for_ssl_is_a_clear_error():
    u, v, u_aug, _ = random_features(seed=7)
    with pytest.raises(UserError, match="augmented views"):
        Objective.from_name("mmcl+ssl")(
            image_features=u, text_features=v, logit_scale=S, image_aug_features=u_aug
        )


def test_shape_mismatches_are_rejected():
    u, v, u_aug, v_aug = random_features(seed=8)
    with pytest.raises(ValueError, match="same shape"):
        mmcl_loss(u, v[:-1], S)
    with pytest.raises(ValueError, match="image_aug_features"):
        Objective.from_name("ssl")(
            image_features=u,
            text_features=v,
            image_aug_features=u_aug[:-1],
            text_aug_features=v_aug,
            logit_scale=S,
        )
    with pytest.raises(ValueError, match="scalar"):
        mmcl_loss(u, v, torch.ones(2))


# --- one forward pass, split afterwards ----------------------------------------------------------------


def test_split_views_recovers_separate_forward_passes():
    gen = torch.Generator().manual_seed(9)
    x, x_aug = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    tower = torch.nn.Linear(4, 2)
    originals, augmented = split_views(tower(torch.cat([x, x_aug])), len(x))
    torch.testing.assert_close(originals, tower(x))
    torch.testing.assert_close(augmented, tower(x_aug))
    with pytest.raises(ValueError, match="2 x 4"):
        split_views(torch.zeros(7, 2), 4)


def test_gather_is_identity_without_process_group():
    t = torch.randn(3, 2)
    assert all_gather_with_grad(t) is t


# --- two ranks on gloo equal one process on the full batch ------------------------------------------------


def test_two_rank_gloo_matches_single_process_full_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    full = make_batch()
    for case, objective, _rows in DDP_CASES:
        model = TinyTwoTower()
        expected_losses = train_step(model, full, objective)
        expected_grads = gradients(model)
        for rank in range(2):
            saved = torch.load(tmp_path / f"{case}-rank{rank}.pt")
            assert saved["losses"].keys() == expected_losses.keys(), case
            for key, value in expected_losses.items():
                assert saved["losses"][key] == pytest.approx(value, abs=1e-6), (case, rank, key)
            for name, grad in expected_grads.items():
                assert grad.abs().max() > 1e-6, (case, name)  # a gradient of zero would prove nothing
                torch.testing.assert_close(
                    saved["grads"][name], grad, rtol=0, atol=1e-6, msg=f"{case} {name}"
                )
