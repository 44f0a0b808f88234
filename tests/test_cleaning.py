"""Each cleaning recipe's defining property (the training-loop runs are in test_train.py)."""

import pytest
import torch

from clip_backdoor import cleaning
from clip_backdoor.config import TrainConfig
from clip_backdoor.errors import UserError
from clip_backdoor.models import create_model


def test_registry_lists_every_method_once():
    lines = cleaning.describe_all()
    assert [line.split()[0] for line in lines] == ["cleanclip", "mmcl", "ssl", "heavy-wd", "shrink-perturb",
                                                   "deep-clustering", "par"]


@pytest.mark.parametrize("name, weights", [
    ("cleanclip", (1.0, 1.0)), ("mmcl", (1.0, 0.0)), ("ssl", (0.0, 1.0)), ("heavy-wd", (1.0, 1.0)),
    ("shrink-perturb", (1.0, 1.0)), ("deep-clustering", (1.0, 1.0)), ("par", (1.0, 0.0))])
def test_objective_weights_by_method(name, weights):
    cfg = cleaning.build_recipe(name).apply_to_config(TrainConfig())
    assert (cfg.objective.mmcl_weight, cfg.objective.ssl_weight) == weights
    assert cfg.method == name and isinstance(cfg.method_params, dict)


def test_ssl_weight_parameter_and_resolved_params_are_recorded():
    cfg = cleaning.build_recipe("cleanclip", {"ssl_weight": "4"}).apply_to_config(TrainConfig())
    assert cfg.objective.ssl_weight == 4.0 and cfg.method_params == {"ssl_weight": 4.0}


def test_heavy_wd_sets_weight_decay_and_refuses_inherited_optimizer():
    cfg = cleaning.build_recipe("heavy-wd", {"weight_decay": "10"}).apply_to_config(TrainConfig())
    assert cfg.optim.weight_decay == 10.0
    inherit = TrainConfig(optimizer_state="inherit")
    with pytest.raises(UserError, match="silently ignore"):
        cleaning.build_recipe("heavy-wd").apply_to_config(inherit)


def test_explicit_conflicting_key_is_an_error():
    cfg = TrainConfig()
    cfg.objective.ssl_weight = 0.0
    with pytest.raises(UserError, match="objective.ssl_weight=0.0 conflicts with method cleanclip"):
        cleaning.build_recipe("cleanclip").apply_to_config(cfg, explicit={"objective.ssl_weight"})


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "unknown cleaning method 'nope'; available: cleanclip, mmcl"),
    ("mmcl", {"ssl_weight": 1}, "unknown parameter --ssl-weight .it takes: none"),
    ("cleanclip", {"clusters": 3}, "unknown parameter --clusters .it takes: --ssl-weight"),
    ("heavy-wd", {"weight_decay": -1}, "must be a finite number >= 0"),
    ("cleanclip", {"ssl_weight": "abc"}, "expects a float"),
    ("cleanclip", {"ssl_weight": 0}, "must be > 0"),
])
def test_bad_method_arguments(name, params, message):
    with pytest.raises(UserError, match=message):
        cleaning.build_recipe(name, params)


def test_split_method_args():
    params, overrides = cleaning.split_method_args(["--ssl-weight", "2", "--weight-decay=5", "optim.lr=1e-3"])
    assert params == {"ssl_weight": "2", "weight_decay": "5"} and overrides == ["optim.lr=1e-3"]


def test_shrink_perturb_exact_arithmetic():
    model = create_model("tiny", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = create_model("tiny", seed=99).state_dict()
    recipe = cleaning.build_recipe("shrink-perturb", {"shrink": 0.5, "perturb": 0.25, "init_seed": 99})
    recipe.prepare_model(model)
    params = {n for n, _ in model.named_parameters()}
    after = model.state_dict()
    for key, value in after.items():
        if key in params:
            torch.testing.assert_close(value, 0.5 * before[key] + 0.25 * fresh[key], rtol=0, atol=1e-6)
        else:  # buffers (BatchNorm statistics) are left alone
            assert torch.equal(value, before[key]), key


def _naive_assign(x, centroids):
    return [max(range(len(centroids)), key=lambda c: float(x[i] @ centroids[c])) for i in range(len(x))]


def test_spherical_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    points = torch.cat([c + 0.05 * torch.randn(30, 16, generator=g) for c in centers])
    truth = torch.arange(4).repeat_interleave(30)
    labels, cents = cleaning.spherical_kmeans(points, 4, 20, seed=1)
    again, _ = cleaning.spherical_kmeans(points, 4, 20, seed=1)
    assert torch.equal(labels, again)
    # Same partition as the truth, up to renaming of the clusters.
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 4
    x = torch.nn.functional.normalize(points, dim=-1)
    assert labels.tolist() == _naive_assign(x, cents)
    assert torch.allclose(cents.norm(dim=-1), torch.ones(4))


def test_kmeans_leaves_no_cluster_empty():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    labels, _ = cleaning.spherical_kmeans(torch.cat([x, x]), 10, 5, seed=0)
    assert len(set(labels.tolist())) == 10
    with pytest.raises(UserError, match="k=30"):
        cleaning.spherical_kmeans(x, 30, 5, seed=0)
