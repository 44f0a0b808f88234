"""PAR (Perturb and Recover): its loss against a naive implementation, the cap, gradients by hand,
the frozen anchor (fresh start and resume), the reference's schedule and augmentation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_backdoor import cleaning
from clip_backdoor.cli import main as cli
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.data.transforms import CLIP_MEAN, normalize
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.objectives import Objective, mmcl_loss
from clip_backdoor.train import distributed as D
from clip_backdoor.train.loop import RunContext, _forward_losses, step_seed, train
from clip_backdoor.weights import load_checkpoint, model_from_checkpoint

SMALL = ["data.num_samples=256", "data.workers=0", "batch_size=64", "eval.n=60", "eval.batch_size=64",
         "optim.lr=2e-3", "threads=1"]


def cfg_for(run_dir, *extra):
    return load_config(TrainConfig, None, [f"run_dir={run_dir}", *SMALL, "optim.warmup_steps=2", *extra])


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A tiny model pre-trained for 2 epochs: PAR's starting checkpoint."""
    run = tmp_path_factory.mktemp("pre") / "run"
    train(cfg_for(run, "epochs=2", "eval.every=0"))
    return run / "checkpoints" / "latest.pt"


def par_cfg(run_dir, ckpt, *extra, **params):
    recipe = cleaning.build_recipe("par", params)
    cfg = cfg_for(run_dir, f"init_checkpoint={ckpt}", "eval.every=0", "optim.lr=1e-3", *extra)
    return recipe.apply_to_config(cfg), recipe


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def naive_ce(logits):
    return sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(len(logits))) / len(logits)


def naive_distance(x, y):
    return sum(sum((x[i, d] - y[i, d]) ** 2 for d in range(x.shape[1])) for i in range(len(x))) / len(x)


def test_one_step_loss_equals_a_naive_implementation(poisoned):
    cfg, recipe = par_cfg("unused", poisoned, threshold=3.9)
    student, _ = model_from_checkpoint(poisoned)
    with torch.no_grad():  # move the student away from its anchor so the distances are not ~0
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ctx = RunContext(cfg=cfg, env=D.DistEnv(), device=torch.device("cpu"), model=student, loader=None,
                     objective=Objective(1.0, 0.0), step=7)
    recipe.setup(student, ctx)
    student.train()
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
             "texts": torch.randint(1, 49000, (6, 16), generator=g)}
    losses = _forward_losses(student, batch, Objective(1.0, 0.0), None, recipe, ctx, ctx.device, None)

    # Naive: the same augmented images into the student (train mode) and the anchor (eval mode).
    seed = step_seed(cfg.seed, 7, 0) ^ cleaning._PAR_SALT
    x = normalize(cleaning.par_augment(batch["images"].float() / 255, torch.Generator().manual_seed(seed)))
    anchor, _ = model_from_checkpoint(poisoned)
    anchor.eval()
    with torch.no_grad():
        u = F.normalize(student.encode_image(x), dim=-1)
        v = F.normalize(student.encode_text(batch["texts"]), dim=-1)
        u0 = F.normalize(anchor.encode_image(x), dim=-1)
        v0 = F.normalize(anchor.encode_text(batch["texts"]), dim=-1)
    s = student.logit_scale.exp().item()
    clip = (naive_ce(s * u @ v.T) + naive_ce(s * v @ u.T)) / 2
    d_img, d_txt = naive_distance(u, u0), naive_distance(v, v0)
    assert 0.01 < d_img < 3.9 and 0.01 < d_txt < 3.9
    expected = clip - 0.5 * (d_img + d_txt)
    torch.testing.assert_close(losses["loss_mmcl"], clip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["stat_par_dist_image"], d_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["stat_par_dist_text"], d_txt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], expected, rtol=1e-5, atol=1e-5)
    # The anchor never receives gradient and the temperature is a constant.
    losses["loss"].backward()
    assert all(p.grad is None for p in recipe.anchor.parameters())
    assert student.logit_scale.grad is None and not student.logit_scale.requires_grad
    assert student.visual.attnpool.c_proj.weight.grad is not None


def test_the_cap_drops_a_term_above_threshold_but_keeps_it_at_threshold():
    e = torch.eye(4, dtype=torch.float64)
    u = e[:2].clone()                      # rows e1, e2
    far = -u                               # distance 4 per row
    mid = torch.stack([e[1], e[0]])        # distance 2 per row
    t = cleaning.par_terms(u, u, far, mid, threshold=2.0)
    assert t["loss_par_image"].item() == 0.0                    # 4 > 2: dropped
    assert t["loss_par_text"].item() == pytest.approx(-0.5 * 2.0)  # exactly 2: kept (strict >)
    assert t["stat_par_dist_image"].item() == pytest.approx(4.0)
    t = cleaning.par_terms(u, u, far, mid, threshold=1.999)
    assert t["loss_par_text"].item() == 0.0
    t = cleaning.par_terms(u, u, far, mid, threshold=4.5, weight=0.25)
    assert t["loss_par_image"].item() == pytest.approx(-1.0)


def test_the_cap_is_one_decision_for_the_batch_mean_not_per_sample():
    e = torch.eye(3, dtype=torch.float64)
    u = torch.stack([e[0], e[0]])
    u0 = torch.stack([-e[0], e[0]])        # per-sample distances 4 and 0: mean 2
    t = cleaning.par_terms(u, u, u0, u, threshold=2.15)
    assert t["loss_par_image"].item() == pytest.approx(-1.0)    # one sample above τ does not drop it


def test_gradients_equal_a_hand_computation():
    # Features as leaves: L = L_CLIP(u, v; s) − ½ (cap D(u, u0) + cap D(v, v0)).
    g = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    v = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    u0 = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    v0 = -v.detach()                       # D(v, v0) = 4 > τ: the text term is capped
    s, n = 5.0, 3
    terms = cleaning.par_terms(u, v, u0, v0, threshold=2.15)
    assert terms["stat_par_dist_image"] < 2.15 < terms["stat_par_dist_text"]
    loss = mmcl_loss(u, v, s) + terms["loss_par_image"] + terms["loss_par_text"]
    du, dv = torch.autograd.grad(loss, [u, v])
    with torch.no_grad():
        P = torch.softmax(s * u @ v.T, dim=1)          # image -> text
        Q = torch.softmax(s * v @ u.T, dim=1)          # text -> image
        eye = torch.eye(n, dtype=torch.float64)
        du_clip = s / (2 * n) * ((P - eye) @ v + (Q - eye).T @ v)
        dv_clip = s / (2 * n) * ((P - eye).T @ u + (Q - eye) @ u)
        du_hand = du_clip - 0.5 * 2 * (u - u0) / n     # −½ · d/du mean ‖u − u0‖²
        dv_hand = dv_clip                              # capped: no gradient from the text term
    torch.testing.assert_close(du, du_hand)
    torch.testing.assert_close(dv, dv_hand)


# --------------------------------------------------------------------------------------------
# The anchor, through the training loop
# --------------------------------------------------------------------------------------------
def _same(state_a, state_b):
    return all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_anchor_never_changes_while_the_model_does(poisoned, tmp_path):
    cfg, recipe = par_cfg(tmp_path / "p", poisoned)
    train(cfg, recipe)
    start = load_checkpoint(poisoned)["state_dict"]
    end = load_checkpoint(tmp_path / "p" / "checkpoints" / "latest.pt")
    assert _same(recipe.anchor.state_dict(), start)
    assert not _same(end["state_dict"], start)
    assert torch.equal(end["state_dict"]["logit_scale"], start["logit_scale"])  # frozen temperature
    assert end["recipe"] == {"anchor_sha256": cleaning.state_fingerprint(recipe.anchor)}
    assert end["scheduler"]["kind"] == "recipe par"
    rows = read_jsonl(tmp_path / "p" / "metrics.jsonl")
    for r in rows:  # logged terms add up; the distances are logged, not optimised
        assert r["loss"] == pytest.approx(r["loss_mmcl"] + r["loss_par_image"] + r["loss_par_text"])
        assert r["stat_par_dist_image"] > 0 and r["stat_par_dist_text"] > 0
    assert rows[-1]["stat_par_dist_image"] > rows[0]["stat_par_dist_image"]  # perturbed away


class KilledAt(cleaning.PerturbAndRecover):
    def __init__(self, epoch, **params):
        super().__init__(**params)
        self.kill = epoch

    def on_epoch_start(self, ctx):
        if ctx.epoch == self.kill:
            raise KeyboardInterrupt


def test_resume_is_exact_and_the_anchor_is_the_starting_checkpoint(poisoned, tmp_path):
    full_cfg, full = par_cfg(tmp_path / "full", poisoned, "epochs=3")
    train(full_cfg, full)
    cut_cfg, _ = par_cfg(tmp_path / "cut", poisoned, "epochs=3")
    with pytest.raises(KeyboardInterrupt):
        train(cut_cfg, KilledAt(2))
    resumed = cleaning.PerturbAndRecover()
    train(cut_cfg, resumed)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "cut" /
                                                                                         "metrics.jsonl"))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "latest.pt")["state_dict"]
    assert _same(a, b)
    # After the resume the anchor is the poisoned start, not the epoch-1 weights it resumed from.
    assert _same(resumed.anchor.state_dict(), load_checkpoint(poisoned)["state_dict"])


def test_resume_refuses_a_changed_starting_checkpoint():
    recipe = cleaning.PerturbAndRecover()
    recipe.anchor_sha256 = "abc"
    with pytest.raises(UserError, match="starting checkpoint has changed"):
        recipe.load_state_dict({"anchor_sha256": "def"})


def test_threshold_must_be_positive_one_line_exit_2(poisoned, tmp_path, capsys):
    code = cli(["clean", "--checkpoint", str(poisoned), "--method", "par", "--threshold", "0",
                "--run-dir", str(tmp_path / "x"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--threshold must be > 0" in err
    with pytest.raises(UserError, match="--threshold must be a finite number >= 0"):
        cleaning.build_recipe("par", {"threshold": -1})


def test_recipe_owns_par_optimizer_settings():
    cfg = cleaning.build_recipe("par").apply_to_config(TrainConfig())
    assert (cfg.objective.mmcl_weight, cfg.objective.ssl_weight) == (1.0, 0.0)
    o = cfg.optim
    assert (o.beta1, o.beta2, o.weight_decay, o.warmup_steps) == (0.9, 0.98, 1e-4, 0)
    cfg = cleaning.build_recipe("par", {"schedule": "warmup"}).apply_to_config(TrainConfig())
    assert cfg.optim.warmup_steps == TrainConfig().optim.warmup_steps
    with pytest.raises(UserError, match="schedule 'cosine' is not one of reference, warmup"):
        cleaning.build_recipe("par", {"schedule": "cosine"})


# --------------------------------------------------------------------------------------------
# Schedule and augmentation
# --------------------------------------------------------------------------------------------
def reference_schedule(base, final, total, warmup, start):
    """The reference's utils.cosine_scheduler, written out with numpy (for T steps)."""
    warm = np.linspace(start, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("total, fraction", [(40, 0.5), (41, 0.5), (10, 0.0), (7, 0.2)])
def test_reference_schedule(total, fraction):
    ref = reference_schedule(3e-6, 1e-9, total, int(fraction * total), 3e-5)
    ours = [cleaning.par_lr(t, total, peak_lr=3e-6, start_lr=3e-5, end_lr=1e-9, warmup_fraction=fraction)
            for t in range(total)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)
    if fraction:
        assert ours[0] == pytest.approx(3e-5) and max(ours) == ours[0]  # it starts 10x above the "peak"


def test_augment_noise_only_brightens_in_reference_mode():
    x = torch.full((4, 3, 16, 16), 0.5)
    out = cleaning.par_augment(x, torch.Generator().manual_seed(0), noise_p=1.0, erase_p=0.0)
    assert (out >= x).all() and (out > x).float().mean() > 0.4
    noise = torch.randn((3, 16, 16), generator=_after_coin(0)) * 0.2
    torch.testing.assert_close(out[0], (0.5 + noise.clamp(0, 1)).clamp(0, 1))
    both = cleaning.par_augment(x, torch.Generator().manual_seed(0), noise_p=1.0, erase_p=0.0,
                                noise_sign="both")
    torch.testing.assert_close(both[0], (0.5 + noise).clamp(0, 1))
    off = cleaning.par_augment(x, torch.Generator().manual_seed(0), noise_p=0.0, erase_p=0.0)
    assert torch.equal(off, x)


def _after_coin(seed):
    g = torch.Generator().manual_seed(seed)
    torch.rand(1, generator=g)
    return g


def test_augment_erases_one_square_to_the_clip_mean():
    x = torch.full((8, 3, 32, 32), 0.9)
    out = cleaning.par_augment(x, torch.Generator().manual_seed(1), noise_p=0.0, erase_p=1.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    for img in out:
        erased = (img != 0.9).any(0)
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        side = len(rows)
        assert side == len(cols) and side in (2, 3)   # round(sqrt(1024 · [0.005, 0.01]))
        assert erased.sum() == side * side            # one square
        block = img[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        torch.testing.assert_close(block, mean.expand_as(block))
        assert torch.allclose(normalize(block), torch.zeros_like(block), atol=1e-6)  # 0 after Normalize
    assert not torch.equal(out[0], out[1])            # positions differ per image


def test_augment_is_seeded():
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    a = cleaning.par_augment(x, torch.Generator().manual_seed(5))
    b = cleaning.par_augment(x, torch.Generator().manual_seed(5))
    c = cleaning.par_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_erasing_gives_up_when_no_square_fits():
    # 8 px: a side must be < 4, and 0.5-1% of 64 px rounds to a side of 1: fits; 30-40% does not.
    x = torch.full((2, 3, 8, 8), 0.9)
    out = cleaning.par_augment(x, torch.Generator().manual_seed(0), noise_p=0.0, erase_p=1.0,
                               erase_scale=(0.3, 0.4))
    assert torch.equal(out, x)
    assert math.isclose(round(math.sqrt(64 * 0.35)), 5)
