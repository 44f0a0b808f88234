import pytest
import torch
from torch import nn

from clip_backdoor.train.optim import build_optimizer, lr_at, split_decay


class Toy(nn.Module):
    """Every kind of parameter the CLIP models have, with names that would fool substring rules."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(10, 4)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))  # "0", "1"
        self.attn = nn.MultiheadAttention(4, 2)
        self.ln_final = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)
        self.text_projection = nn.Parameter(torch.zeros(4, 4))
        self.logit_scale = nn.Parameter(torch.zeros(()))


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_decay_groups_by_module_type():
    m = Toy()
    decay, no_decay = split_decay(m)
    assert _names(m, decay) == {"conv1.weight", "downsample.0.weight", "attn.in_proj_weight",
                                "attn.out_proj.weight", "mlp.weight", "text_projection"}
    assert _names(m, no_decay) == {"token_embedding.weight", "positional_embedding", "downsample.1.weight",
                                   "downsample.1.bias", "attn.in_proj_bias", "attn.out_proj.bias",
                                   "ln_final.weight", "ln_final.bias", "mlp.bias", "logit_scale"}


def test_optimizer_groups_carry_the_weight_decay():
    opt = build_optimizer(Toy(), lr=1e-3, weight_decay=0.1)
    wd = {g["group"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"decay": 0.1, "no_decay": 0.0}
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_steps_follow_the_adamw_formula():
    """Three steps of the (fused) optimizer against decoupled-decay Adam written out by hand."""
    torch.manual_seed(0)
    m = nn.Linear(3, 2)  # weight decays, bias does not
    opt = build_optimizer(m, lr=1e-2, weight_decay=0.5, betas=(0.9, 0.99), eps=1e-8)
    ref = {n: (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for n, p in m.named_parameters()}
    for t in range(1, 4):
        grads = {n: torch.randn_like(p) for n, p in m.named_parameters()}
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, (w, mom, var) in ref.items():
            wd = 0.5 if n == "weight" else 0.0
            w.mul_(1 - 1e-2 * wd)
            mom.mul_(0.9).add_(0.1 * grads[n])
            var.mul_(0.99).add_(0.01 * grads[n] ** 2)
            m_hat, v_hat = mom / (1 - 0.9 ** t), var / (1 - 0.99 ** t)
            w.sub_(1e-2 * m_hat / (v_hat.sqrt() + 1e-8))
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-5, atol=1e-6)


def test_clip_decay_groups_cover_every_parameter_once():
    from clip_backdoor.models import create_model

    m = create_model("tiny", seed=0)
    decay, no_decay = split_decay(m)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    names = _names(m, no_decay)
    assert "logit_scale" in names and "token_embedding.weight" in names and "positional_embedding" in names
    assert not any(n.endswith(".weight") and ("conv" in n or "c_fc" in n) for n in names)


@pytest.mark.parametrize("W, T", [(10, 100), (1, 7), (50, 51)])
def test_schedule_values_at_the_edges(W, T):
    base = 1e-3
    assert lr_at(0, base_lr=base, warmup_steps=W, total_steps=T) == pytest.approx(base / W)
    assert lr_at(W - 1, base_lr=base, warmup_steps=W, total_steps=T) == pytest.approx(base)
    if W < T:
        assert lr_at(W, base_lr=base, warmup_steps=W, total_steps=T) == pytest.approx(base)
    last = lr_at(T - 1, base_lr=base, warmup_steps=W, total_steps=T)
    assert last == pytest.approx(0.0 if T - 1 > W else base)


def test_schedule_cosine_at_known_points():
    # W = 4 warm-up steps, then 12 decay steps to T - 1 = 16: a twelfth of the way per step, so the
    # cosine's known values fall on steps (cos 0, pi/3, pi/2, 2pi/3, pi = 1, 1/2, 0, -1/2, -1).
    base, W, T = 2.0, 4, 17

    def lr(s):
        return lr_at(s, base_lr=base, warmup_steps=W, total_steps=T)

    assert [lr(s) for s in range(W)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert [lr(W + k) for k in (0, 4, 6, 8, 12)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0], abs=1e-12)
    decay = [lr(s) for s in range(W, T)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # A half-cosine is point-symmetric about its middle: lr(W + k) + lr(T - 1 - k) = base.
    assert [lr(W + k) + lr(T - 1 - k) for k in range(13)] == pytest.approx([base] * 13)


def test_schedule_warning_exactly_when_the_cosine_phase_never_comes():
    from clip_backdoor.train.optim import schedule_warning

    total = 16
    # W <= T-2: step W is followed by at least one cosine step below the peak.
    assert schedule_warning(14, total) is None and lr_at(15, base_lr=1.0, warmup_steps=14, total_steps=16) < 1
    assert schedule_warning(0, total) is None and schedule_warning(0, 1) is None
    assert "to 100% of optim.lr" in schedule_warning(15, total)  # peaks at the last step, never decays
    assert lr_at(15, base_lr=1.0, warmup_steps=15, total_steps=16) == 1.0
    assert "to 32% of optim.lr" in schedule_warning(50, total)  # the 50 warm-up steps in 16
