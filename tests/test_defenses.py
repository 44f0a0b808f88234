"""Pre-training defences (SafeCLIP, RoCLIP): the memory bank and nearest-neighbour pool on constructed
embeddings, the GMM split on a bimodal sample, the safe share's schedule, the per-sample loss, exact
resume (banks and pool included) and the bad-input lines."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_backdoor import defenses
from clip_backdoor.cli import main as cli
from clip_backdoor.config import TrainConfig, load_config
from clip_backdoor.defenses import MemoryBank, RoCLIP, SafeCLIP
from clip_backdoor.errors import UserError
from clip_backdoor.fileio import read_jsonl
from clip_backdoor.objectives import Objective, mmcl_loss, ssl_loss
from clip_backdoor.train.loop import RunContext, train
from clip_backdoor.weights import load_checkpoint


def ce(logits):
    return F.cross_entropy(logits, torch.arange(len(logits)))


# --------------------------------------------------------------------------------------------
# The memory bank (lightly 1.2.39 semantics)
# --------------------------------------------------------------------------------------------
def test_bank_starts_as_seeded_random_unit_vectors():
    a, b, c = MemoryBank(6, seed=1), MemoryBank(6, seed=1), MemoryBank(6, seed=2)
    x = torch.zeros(2, 4)
    for bank in (a, b, c):
        bank.query(x)
    assert torch.equal(a.bank, b.bank) and not torch.equal(a.bank, c.bank)
    torch.testing.assert_close(a.bank.norm(dim=1), torch.ones(6))


def test_bank_is_first_in_first_out_and_drops_what_overflows():
    bank = MemoryBank(5, seed=0)
    rows = torch.arange(1.0, 12.0)[:, None].repeat(1, 3)  # row r is (r, r, r)
    bank.push(rows[0:3])
    assert bank.ptr == 3 and bank.bank[:3, 0].tolist() == [1, 2, 3]
    bank.push(rows[3:6])  # 3 + 3 >= 5: fills slots 3, 4 with rows 4, 5; row 6 is dropped; back to 0
    assert bank.ptr == 0 and bank.bank[:, 0].tolist() == [1, 2, 3, 4, 5]
    bank.push(rows[6:8])
    assert bank.ptr == 2 and bank.bank[:, 0].tolist() == [7, 8, 3, 4, 5]
    bank.push(rows[8:11])  # exactly to the end: all three written, pointer back to 0
    assert bank.ptr == 0 and bank.bank[:, 0].tolist() == [7, 8, 9, 10, 11]


def test_bank_query_is_the_cosine_nearest_neighbour_and_returns_the_stored_entry():
    bank = MemoryBank(3, seed=0)
    entries = torch.tensor([[10.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    bank.push(entries)
    q = torch.tensor([[1.0, 0.3], [1.0, 0.0]])  # q0: Euclidean-nearest is entry 1, cosine-nearest entry 0
    got = bank.query(q)
    assert torch.equal(got[0], entries[0]) and torch.equal(got[1], entries[0])
    q2 = torch.tensor([[0.55, 0.8]])
    assert torch.equal(bank.query(q2)[0], entries[1])
    assert not got.requires_grad


def test_bank_state_round_trips():
    bank = MemoryBank(4, seed=3)
    bank.push(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    copy = MemoryBank(4, seed=99)
    copy.load_state_dict(bank.state_dict())
    assert copy.ptr == 3 and torch.equal(copy.bank, bank.bank)


# --------------------------------------------------------------------------------------------
# RoCLIP: each image is matched with the pool's caption nearest to the *image* embedding
# --------------------------------------------------------------------------------------------
def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_roclip_pairs_each_image_with_the_pool_caption_nearest_to_its_image_embedding():
    roclip = RoCLIP(pool_size=3, augment=False)
    pool = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    roclip.pool.push(pool)
    u = unit([0.9, 0.1, 0], [0.1, 0.1, 0.9])  # nearest pool captions: 0 and 2
    v = unit([0, 1, 0], [0, 0.9, 0.1])  # their own captions would pick 1 and 1
    u.requires_grad_(True)
    v.requires_grad_(True)
    s = torch.tensor(10.0)
    loss = roclip.nn_clip_loss(u, v, s)
    p = pool[[0, 2]]
    logits = s * u @ p.T
    assert loss.item() == pytest.approx(((ce(logits) + ce(logits.T)) / 2).item(), rel=1e-6)
    # then the captions join the pool (FIFO from slot 0 after a full pool)
    assert torch.allclose(roclip.pool.bank[:2], v.detach()) and torch.equal(roclip.pool.bank[2], pool[2])
    loss.backward()
    assert u.grad.abs().sum() > 0
    assert v.grad is None  # no gradient reaches the text tower through the pool


def test_roclip_uses_the_pool_every_period_th_epoch_only():
    roclip = RoCLIP(period=2, pool_size=8, augment=False)
    assert [e for e in range(1, 7) if roclip.matches(e)] == [2, 4, 6]
    g = torch.Generator().manual_seed(0)
    feats = {"image_features": F.normalize(torch.randn(4, 3, generator=g), dim=1),
             "text_features": F.normalize(torch.randn(4, 3, generator=g), dim=1),
             "logit_scale": torch.tensor(5.0)}
    objective = Objective(1.0, 0.0)
    ctx = RunContext(cfg=TrainConfig(epochs=6), env=None, device=torch.device("cpu"), model=None, loader=None,
                     objective=objective, epoch=1)
    plain = roclip.losses(feats, objective, {}, ctx)
    assert set(plain) == {"loss", "loss_mmcl"} and roclip.pool.bank is None  # pool untouched
    assert plain["loss"].item() == pytest.approx(mmcl_loss(feats["image_features"], feats["text_features"],
                                                           5.0).item())
    ctx.epoch = 2
    nn = roclip.losses(feats, objective, {}, ctx)
    assert set(nn) == {"loss", "loss_roclip"} and roclip.pool.ptr == 4


def test_roclip_keeps_the_objectives_ssl_term():
    roclip = RoCLIP(pool_size=8, augment=True)
    g = torch.Generator().manual_seed(1)
    f = {k: F.normalize(torch.randn(4, 3, generator=g), dim=1)
         for k in ("image_features", "text_features", "image_aug_features", "text_aug_features")}
    f["logit_scale"] = torch.tensor(3.0)
    objective = Objective(1.0, 2.0)
    ctx = RunContext(cfg=TrainConfig(epochs=4), env=None, device=torch.device("cpu"), model=None, loader=None,
                     objective=objective, epoch=1)
    out = roclip.losses(f, objective, {}, ctx)
    ssl = ssl_loss(f["image_features"], f["image_aug_features"], f["text_features"], f["text_aug_features"],
                   3.0)
    mm = mmcl_loss(f["image_aug_features"], f["text_aug_features"], 3.0)  # augment: the views are the pairs
    assert out["loss_ssl"].item() == pytest.approx(ssl.item())
    assert out["loss"].item() == pytest.approx((mm + 2 * ssl).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# SafeCLIP: the GMM split, the safe share, the per-sample loss
# --------------------------------------------------------------------------------------------
def bimodal(n_low=900, n_high=100, seed=0):
    g = np.random.default_rng(seed)
    sims = np.concatenate([g.normal(0.10, 0.02, n_low), g.normal(0.50, 0.03, n_high)]).astype(np.float32)
    order = g.permutation(len(sims))
    return sims[order], order >= n_low


def test_gmm_split_finds_the_high_mode_of_a_bimodal_sample():
    sims, high = bimodal()
    p, fit = defenses.clean_probability(sims)
    assert fit["mean_low"] == pytest.approx(0.10, abs=0.01)
    assert fit["mean_high"] == pytest.approx(0.50, abs=0.01)
    safe = defenses.safe_rows(p, sims, threshold=0.9)
    assert set(safe.tolist()) == set(np.flatnonzero(high).tolist())
    assert p[high].min() > 0.99 and p[~high].max() < 0.01


def test_gmm_is_fitted_as_the_reference_fits_it():
    """SafeCLIP fits GaussianMixture(2, random_state=0) on the similarities sorted descending and takes
    the posterior of the component with the larger mean (src/samplers.py fit_gmm_to_cos_sim)."""
    from sklearn.mixture import GaussianMixture

    def reference(values):
        gmm = GaussianMixture(n_components=2, random_state=0).fit(values.reshape(-1, 1))
        return gmm.predict_proba(sims.reshape(-1, 1))[:, np.argmax(gmm.means_)]

    # three modes for two components: the fit depends on the order (k-means initialisation)
    g = np.random.default_rng(1)
    sims = np.concatenate([g.normal(m, 0.03, 100) for m in (0.1, 0.3, 0.5)]).astype(np.float32)
    g.shuffle(sims)
    want = reference(np.sort(sims)[::-1].copy())
    assert not np.allclose(want, reference(sims), atol=0.1)  # the order matters on this sample
    p, _ = defenses.clean_probability(sims)
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-12)


def test_safe_share_grows_by_the_step_up_to_the_cap():
    assert defenses.safe_shares(0.30, 4) == pytest.approx([0.30, 0.31, 0.32, 0.33])
    assert defenses.safe_shares(0.84, 3) == pytest.approx([0.84, 0.85, 0.85])
    assert defenses.safe_shares(0.90, 3) == pytest.approx([0.90, 0.85, 0.85])  # the reference's min()
    assert defenses.safe_shares(0.0, 3, step=0.25, cap=0.6) == pytest.approx([0.0, 0.25, 0.5])


def test_top_share_ranks_by_p_clean_then_similarity():
    p = np.array([1.0, 0.2, 1.0, 0.9, 1.0])
    sims = np.array([0.3, 0.9, 0.5, 0.8, 0.4])
    assert defenses.safe_rows(p, sims, share=0.4).tolist() == [2, 4]  # int(5 * 0.4) = 2; ties by sim
    assert defenses.safe_rows(p, sims, share=0.59).tolist() == [2, 4]
    assert defenses.safe_rows(p, sims, share=0.8).tolist() == [0, 2, 3, 4]


def test_safeclip_epochs_shares_and_safe_sets(monkeypatch):
    """Epoch by epoch with stubbed similarities: the first filtering epoch takes p_clean >= 0.9, then
    the share grows by the step from there."""
    sims, high = bimodal(80, 20, seed=2)
    ids = [str(i) for i in range(len(sims))]
    monkeypatch.setattr(defenses, "embed_images", lambda *a, **k: (ids, torch.tensor(sims)))
    monkeypatch.setattr("clip_backdoor.train.checkpoint.unwrap", lambda m: m)
    safeclip = SafeCLIP(inmodal_warmup=2, multimodal_warmup=1, share_step=0.05, share_cap=0.3)
    ctx = RunContext(cfg=TrainConfig(epochs=7), env=None, device=torch.device("cpu"), model=None, loader=None,
                     objective=Objective())
    sizes = []
    for epoch in range(1, 8):
        ctx.epoch = epoch
        safeclip.on_epoch_start(ctx)
        sizes.append(len(safeclip.safe) if safeclip.phase(epoch) == "filtered" else None)
    assert [safeclip.phase(e) for e in range(1, 8)] == ["inmodal"] * 2 + ["multimodal"] + ["filtered"] * 4
    assert sizes == [None, None, None, 20, 25, 30, 30]  # 20 above 0.9, then 25%, 30%, capped
    assert safeclip.adjust_lr(1e-3, RunContext(**{**ctx.__dict__, "epoch": 3})) == 5e-6
    assert safeclip.adjust_lr(1e-3, RunContext(**{**ctx.__dict__, "epoch": 4})) == 1e-3


def test_safeclip_loss_is_clip_on_safe_pairs_and_in_modal_on_the_rest():
    g = torch.Generator().manual_seed(0)
    f = {k: F.normalize(torch.randn(6, 4, generator=g), dim=1)
         for k in ("image_features", "text_features", "image_aug_features", "text_aug_features")}
    f["logit_scale"] = torch.tensor(4.0)
    batch = {"row_ids": ["a", "b", "c", "d", "e", "f"]}
    safeclip = SafeCLIP(inmodal_warmup=1, multimodal_warmup=1, bank_size=0)
    safeclip.safe = {"b", "c", "f"}
    objective = Objective(1.0, 0.0)
    ctx = RunContext(cfg=TrainConfig(epochs=5), env=None, device=torch.device("cpu"), model=None, loader=None,
                     objective=objective, epoch=3)
    out = safeclip.losses(f, objective, batch, ctx)
    s, safe, unsafe = 4.0, [1, 2, 5], [0, 3, 4]
    u, v = f["image_features"], f["text_features"]
    ua, va = f["image_aug_features"], f["text_aug_features"]
    clip = mmcl_loss(u[safe], v[safe], s)
    inmodal = (ce(s * ua[unsafe] @ u[unsafe].T) + ce(s * va[unsafe] @ v[unsafe].T)) / 2
    assert out["loss_mmcl"].item() == pytest.approx(clip.item(), rel=1e-6)
    assert out["loss_inmodal"].item() == pytest.approx(inmodal.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((0.5 * clip + 0.5 * inmodal).item(), rel=1e-6)


def test_safeclip_in_modal_positives_are_the_banks_nearest_neighbours_of_view_one():
    safeclip = SafeCLIP(bank_size=3)
    stored_u = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    stored_v = unit([0, 0, 1], [1, 0, 0], [0, 1, 0])
    safeclip.banks["image"].push(stored_u)
    safeclip.banks["text"].push(stored_v)
    u, v = unit([0.1, 0.9, 0], [0.8, 0.1, 0.1]), unit([0.9, 0, 0.1], [0, 0.2, 0.9])
    ua, va = unit([0.2, 0.7, 0.1], [0.5, 0.5, 0]), unit([0.3, 0.3, 0.3], [0, 1, 1])
    loss = safeclip.inmodal_loss(u, ua, v, va, 2.0)
    pu, pv = stored_u[[1, 0]], stored_v[[1, 0]]  # cosine-nearest stored entries of u and of v
    want = (ce(2.0 * ua @ pu.T) + ce(2.0 * va @ pv.T)) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(safeclip.banks["image"].bank[:2], u)  # view 1 pushed after the query


# --------------------------------------------------------------------------------------------
# Schedules that do not fit, and the command line
# --------------------------------------------------------------------------------------------
def test_schedules_that_exceed_the_run_are_refused():
    with pytest.raises(UserError, match=r"inmodal_warmup \+ multimodal_warmup = 4 \+ 1 leaves no filtering "
                                         r"epoch in a run of epochs=5"):
        SafeCLIP(inmodal_warmup=4).apply_to_config(TrainConfig(epochs=5))
    SafeCLIP(inmodal_warmup=3).apply_to_config(TrainConfig(epochs=5))
    with pytest.raises(UserError, match="period=6 exceeds epochs=5"):
        RoCLIP(period=6).apply_to_config(TrainConfig(epochs=5))
    with pytest.raises(UserError, match="replaces the MMCL term"):
        RoCLIP().apply_to_config(load_config(TrainConfig, None, ["objective.mmcl_weight=0",
                                                                  "objective.ssl_weight=1"]))
    with pytest.raises(UserError, match="does not combine with a cleaning method"):
        RoCLIP().apply_to_config(TrainConfig(method="cleanclip"))
    with pytest.raises(UserError, match="unknown defense 'safe-clip'; available: safeclip, roclip"):
        defenses.build_defense("safe-clip")
    with pytest.raises(UserError, match="defense roclip: unknown parameter --pool"):
        defenses.build_defense("roclip", {"pool": 3})


def test_pretrain_command_bad_defense_input_is_one_line(tmp_path, capsys):
    cases = [
        (["--defense", "safeclip", "--inmodal-warmup", "3", "--epochs", "3"], "leaves no filtering epoch"),
        (["--defense", "roclip", "--period", "4", "--epochs", "3"], "period=4 exceeds epochs=3"),
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--pool-size", "3"], "--pool-size: unknown option (defence parameters follow --defense NAME)"),
    ]
    for flags, message in cases:
        assert cli(["pretrain", "--run-dir", str(tmp_path / "r"), *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (flags, err)
    assert cli(["pretrain", "--list-defenses"]) == 0
    assert "safeclip" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Exact resume through the one loop, banks and pool included
# --------------------------------------------------------------------------------------------
SMALL = ["data.num_samples=96", "data.workers=0", "batch_size=48", "eval.every=0", "optim.warmup_steps=2",
         "optim.lr=2e-3", "threads=1", "save_every=0"]


def cfg_for(run_dir, *extra):
    return load_config(TrainConfig, None, [f"run_dir={run_dir}", *SMALL, *extra])


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in rows]


def killed_at(cls, epoch):
    class Killed(cls):
        def on_epoch_start(self, ctx):
            if ctx.epoch == epoch:
                raise KeyboardInterrupt
            super().on_epoch_start(ctx)

    return Killed


@pytest.mark.parametrize(("cls", "params", "epochs", "kill", "extra"), [
    (SafeCLIP, {"inmodal_warmup": 1, "multimodal_warmup": 1, "bank_size": 64, "first_threshold": 0.5},
     4, 4, []),
    (RoCLIP, {"period": 2, "pool_size": 40}, 3, 3, ["objective.ssl_weight=1"]),
])
def test_resume_is_exact_with_banks_and_pool(tmp_path, cls, params, epochs, kill, extra):
    def cfg(name):
        c = cfg_for(tmp_path / name, f"epochs={epochs}", *extra)
        return cls(**params).apply_to_config(c)

    train(cfg("full"), cls(**params))
    with pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), killed_at(cls, kill)(**params))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, kill))
    train(cfg("cut"), cls(**params))  # resumed: its recipe state comes from latest.pt
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert comparable(full) == comparable(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "latest.pt") for n in ("full", "cut"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    banks = [(a["recipe"], b["recipe"])]
    if cls is SafeCLIP:
        assert a["recipe"]["share"] == b["recipe"]["share"] is not None
        pairs = [(a["recipe"]["banks"][m], b["recipe"]["banks"][m]) for m in ("image", "text")]
        assert full[1]["lr"] == 5e-6  # the multimodal warm-up epoch at filter_lr
        assert set(full[0]) >= {"loss_inmodal"} and set(full[3]) >= {"loss_mmcl", "loss_inmodal"}
    else:
        pairs = [(a["recipe"]["pool"], b["recipe"]["pool"])]
        assert "loss_roclip" in full[1] and "loss_mmcl" in full[2] and "loss_ssl" in full[0]
    for x, y in pairs:
        assert x["ptr"] == y["ptr"] and torch.equal(x["bank"], y["bank"])
    del banks
    assert not math.isnan(full[-1]["loss"])


# --------------------------------------------------------------------------------------------
# Two gloo processes: the pool sees the global batch, as one process does
# --------------------------------------------------------------------------------------------
VIT = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
       "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
ROCLIP_DDP = {"period": 1, "pool_size": 64, "augment": False}  # 64 = 2 global batches: nothing dropped


def _ddp_config(run_dir, model_path):
    cfg = load_config(TrainConfig, None, [
        f"run_dir={run_dir}", f"model={model_path}", "batch_size=32", "epochs=1", "data.num_samples=128",
        "data.workers=0", "eval.every=0", "optim.warmup_steps=1", "optim.lr=1e-3", "threads=1",
        "save_every=0", "data.world.image_size=32", "optim.eps=1e-4"])
    return RoCLIP(**ROCLIP_DDP).apply_to_config(cfg)


def _ddp_worker(rank, port, run_dir, model_path):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    train(_ddp_config(run_dir, model_path), RoCLIP(**ROCLIP_DDP))


def test_roclip_under_two_process_ddp_matches_one_process(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    model_path = tmp_path / "vit.json"
    model_path.write_text(json.dumps(VIT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp"), str(model_path)), nprocs=2, join=True)
    train(_ddp_config(tmp_path / "single", model_path), RoCLIP(**ROCLIP_DDP))
    ddp, single = (load_checkpoint(tmp_path / n / "checkpoints" / "latest.pt") for n in ("ddp", "single"))
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the same captions in the pool (rank order permutes the rows of a global batch)
    a, b = ddp["recipe"]["pool"]["bank"], single["recipe"]["pool"]["bank"]
    torch.testing.assert_close(a[a[:, 0].argsort()], b[b[:, 0].argsort()], rtol=1e-4, atol=1e-5)
