"""CLIP models: open_clip-identical parameter layout, CLIP initialisation, EOT pooling, causality,
deterministic seeding, and clear errors for bad configs and mismatching weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_backdoor.errors import UserError
from clip_backdoor.models import CLIP, create_model, get_model_config, list_models, load_weights
from clip_backdoor.models.resnet import AttentionPool2d

# open_clip's parameter names and shapes for RN50 and ViT-B-32 (listed from open_clip's models; facts,
# not code), shipped with the tests so the layout checks run on every clone.
REFERENCE_DIR = Path(__file__).resolve().parent / "data"
EOT = 49407

# A ViT small enough to build and run in a test; exercises dict configs too.
TINY_VIT = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _reference(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"open_clip_{name}.state_dict.json").read_text())


def _tokens(batch: int, length: int, eot_at: list[int], seed: int = 0) -> torch.Tensor:
    """Random ids below EOT, an EOT at each row's given position, zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 49406, (batch, length), generator=g)
    tokens[:, 0] = 49406
    for row, pos in enumerate(eot_at):
        tokens[row, pos] = EOT
        tokens[row, pos + 1:] = 0
    return tokens


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    return create_model("tiny", seed=0).eval()


# --- open_clip layout -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_state_dict_keys_shapes_and_count_match_open_clip(name):
    ref = _reference(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(ref["state_dict"]), set(ours) ^ set(ref["state_dict"])
    assert ours == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    # Buffers in the state dict are exactly BatchNorm statistics; the causal mask is not saved.
    buffers = {k for k, _ in model.named_buffers() if k in ours}
    assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in buffers)
    assert "attn_mask" not in ours and "attn_mask" in dict(model.named_buffers())


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_registered_config_matches_reference(name):
    ref = _reference(name)["config"]
    ours = get_model_config(name)
    assert ours["embed_dim"] == ref["embed_dim"]
    assert ours["text_cfg"] == {**ref["text_cfg"], "mlp_ratio": 4.0}
    for key, value in ref["vision_cfg"].items():
        assert ours["vision_cfg"][key] == value, key
    assert ours["quick_gelu"] is True  # the paper's models use OpenAI's QuickGELU


def test_rn50_attention_pool_has_32_heads():
    with torch.device("meta"):
        model = create_model("RN50")
    assert model.visual.attnpool.heads == 32
    assert (model.image_size, model.context_length, model.vocab_size) == (224, 77, 49408)


def test_list_models():
    assert {"tiny", "small", "RN50", "ViT-B-32"} <= set(list_models())


# --- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "small"])
def test_forward_shapes_and_unit_norm(name):
    model = create_model(name, seed=0)
    cfg = get_model_config(name)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = _tokens(3, model.context_length, [4, 7, model.context_length - 1])
    out = model(image=images, text=tokens)
    for key in ("image_features", "text_features"):
        assert out[key].shape == (3, cfg["embed_dim"])
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model(text=tokens)["image_features"] is None
    assert model(image=images)["text_features"] is None
    assert model.encode_image(images).norm(dim=-1).sub(1).abs().max() > 1e-3  # unnormalised by default


def test_vit_forward_and_init():
    model = create_model(TINY_VIT, seed=0)
    out = model(image=torch.randn(2, 3, 32, 32), text=_tokens(2, 8, [3, 7]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)
    assert model.visual.positional_embedding.shape == (17, 64)  # 4x4 patches + class token
    scale = 64 ** -0.5
    assert model.visual.proj.std().item() == pytest.approx(scale, rel=0.1)
    assert model.visual.positional_embedding.std().item() == pytest.approx(scale, rel=0.15)


def test_bf16_autocast_forward_is_finite(tiny):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(image=torch.randn(2, 3, 32, 32), text=_tokens(2, 16, [5, 15]))
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()


def test_every_parameter_receives_a_gradient(tiny):
    tiny.train()
    out = tiny(image=torch.randn(4, 3, 32, 32), text=_tokens(4, 16, [3, 5, 7, 15]))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
    F.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in tiny.named_parameters() if p.grad is None]
    tiny.zero_grad(set_to_none=True)
    tiny.eval()
    assert missing == []


def test_wrong_image_size_or_context_length_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="32x32"):
        tiny.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="context length 16"):
        tiny.encode_text(torch.ones(1, 20, dtype=torch.long))


# --- text tower: EOT pooling and causality ------------------------------------------------------

def _naive_text_encoder(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Independent re-implementation: explicit per-head causal attention, QuickGELU, pool at EOT."""
    heads = model.transformer.resblocks[0].attn.num_heads
    x = model.token_embedding.weight[tokens] + model.positional_embedding[: tokens.shape[1]]
    length = tokens.shape[1]
    for block in model.transformer.resblocks:
        h = F.layer_norm(x, x.shape[-1:], block.ln_1.weight, block.ln_1.bias)
        q, k, v = (h @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], length, heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(x.shape)
        x = x + attn @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias
        h = F.layer_norm(x, x.shape[-1:], block.ln_2.weight, block.ln_2.bias)
        h = h @ block.mlp.c_fc.weight.t() + block.mlp.c_fc.bias
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ block.mlp.c_proj.weight.t() + block.mlp.c_proj.bias
    x = F.layer_norm(x, x.shape[-1:], model.ln_final.weight, model.ln_final.bias)
    eot = [row.tolist().index(EOT) for row in tokens]
    return torch.stack([x[i, p] for i, p in enumerate(eot)]) @ model.text_projection


def test_text_encoder_matches_naive_reimplementation(tiny):
    tokens = _tokens(4, 16, [2, 6, 11, 15], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode_text(tokens), _naive_text_encoder(tiny, tokens),
                                   rtol=1e-4, atol=1e-4)
        # Shorter sequences than the context are accepted (positions and mask cut to fit).
        short = tokens[:2, :8]
        torch.testing.assert_close(tiny.encode_text(short), _naive_text_encoder(tiny, short),
                                   rtol=1e-4, atol=1e-4)


def test_tokens_after_eot_do_not_change_the_embedding(tiny):
    tokens = _tokens(2, 16, [5, 9])
    changed = tokens.clone()
    changed[0, 6:] = 1234
    changed[1, 10:] = 4321
    before_eot = tokens.clone()
    before_eot[:, 2] = 777
    with torch.no_grad():
        reference = tiny.encode_text(tokens)
        torch.testing.assert_close(tiny.encode_text(changed), reference)
        assert (tiny.encode_text(before_eot) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("train", [True, False])
def test_causal_mask_hides_later_tokens(tiny, train):
    tiny.train(train)
    tokens = _tokens(2, 16, [15, 15])
    later = tokens.clone()
    later[:, 9:15] = 4242
    with torch.no_grad():
        hidden = [tiny.transformer(tiny.token_embedding(t) + tiny.positional_embedding, tiny.attn_mask)
                  for t in (tokens, later)]
    tiny.eval()
    torch.testing.assert_close(hidden[0][:, :9], hidden[1][:, :9])
    assert (hidden[0][:, 9:] - hidden[1][:, 9:]).abs().max() > 1e-3


def test_attention_pool_equals_full_attention_read_at_the_mean_token():
    torch.manual_seed(0)
    pool = AttentionPool2d(spatial_dim=2, embed_dim=16, heads=4, output_dim=8)
    x = torch.randn(3, 16, 2, 2)
    seq = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
    seq = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding[:, None]
    full, _ = F.multi_head_attention_forward(
        seq, seq, seq, 16, 4, None, torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        None, None, False, 0.0, pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight)
    torch.testing.assert_close(pool(x), full[0], rtol=1e-5, atol=1e-5)


# --- initialisation -----------------------------------------------------------------------------

def test_clip_initialisation_statistics():
    model = create_model("small", seed=0)
    width, layers = 256, 4
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(width ** -0.5, rel=0.05)
    for block in model.transformer.resblocks:
        assert block.attn.in_proj_weight.std().item() == pytest.approx(width ** -0.5, rel=0.05)
        assert block.attn.out_proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(proj_std, rel=0.05)
        assert torch.all(block.attn.in_proj_bias == 0)
    pool = model.visual.attnpool
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        assert proj.weight.std().item() == pytest.approx(pool.c_proj.in_features ** -0.5, rel=0.05)
    bn3 = [m.bn3.weight for stage in (model.visual.layer1, model.visual.layer2, model.visual.layer3,
                                      model.visual.layer4) for m in stage]
    assert len(bn3) == 4 and all(torch.all(w == 0) for w in bn3)
    assert torch.all(model.visual.bn3.weight == 1)  # the stem's bn3 is not a residual branch


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = (create_model("tiny", seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token_embedding.weight"], c["token_embedding.weight"])


def test_clamp_logit_scale(tiny):
    with torch.no_grad():
        tiny.logit_scale.fill_(10.0)
        tiny.clamp_logit_scale()
        assert tiny.logit_scale.item() == pytest.approx(math.log(100))
        tiny.logit_scale.fill_(-1.0)
        tiny.clamp_logit_scale()
        assert tiny.logit_scale.item() == 0.0
        tiny.logit_scale.fill_(math.log(1 / 0.07))


# --- load_weights --------------------------------------------------------------------------------

def test_load_weights_round_trip_strips_module_prefix():
    source, target = create_model("tiny", seed=1), create_model("tiny", seed=2)
    load_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()})
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_load_weights_names_shape_mismatch(tiny):
    state = dict(tiny.state_dict())
    state["ln_final.weight"] = torch.ones(7)
    expected = r"ckpt\.pt: key ln_final\.weight has shape \[7\], the model expects \[128\]"
    with pytest.raises(UserError, match=expected):
        load_weights(tiny, state, source="ckpt.pt")


def test_load_weights_names_missing_and_unexpected_keys(tiny):
    state = dict(tiny.state_dict())
    del state["logit_scale"]
    state["extra.weight"] = torch.ones(1)
    with pytest.raises(UserError, match="1 missing key.*logit_scale.*1 unexpected key.*extra.weight"):
        load_weights(tiny, state)


# --- config errors -------------------------------------------------------------------------------

def test_unknown_model_lists_available_names():
    with pytest.raises(UserError, match="unknown model 'RN51'; available: .*RN50.*tiny"):
        create_model("RN51")


def _write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_config_file_is_accepted(tmp_path):
    assert get_model_config(_write(tmp_path, TINY_VIT))["vision_cfg"]["patch_size"] == 8


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_cfg"].pop("heads"), "missing required key text_cfg.heads"),
    (lambda c: c.pop("embed_dim"), "missing required key embed_dim"),
    (lambda c: c["vision_cfg"].update(width="64"), 'key vision_cfg.width must be int, got "64"'),
    (lambda c: c["vision_cfg"].update(width=True), "key vision_cfg.width must be int, got true"),
    (lambda c: c["text_cfg"].update(layers=0), "key text_cfg.layers must be positive"),
    (lambda c: c.update(quick_gelu="yes"), "key quick_gelu must be bool"),
    (lambda c: c["text_cfg"].update(width_typo=3), "unknown key text_cfg.'width_typo'"),
    (lambda c: c["vision_cfg"].pop("patch_size"), "missing required key vision_cfg.patch_size"),
    (lambda c: c["vision_cfg"].update(layers=[1, 1]), "vision_cfg.layers must be 4 positive ints"),
    (lambda c: c["text_cfg"].update(heads=3), "text_cfg.width must be a multiple of text_cfg.heads"),
])
def test_bad_config_names_file_and_key(tmp_path, edit, message):
    config = json.loads(json.dumps(TINY_VIT))
    edit(config)
    path = _write(tmp_path, config)
    with pytest.raises(UserError) as info:
        get_model_config(path)
    assert str(info.value).startswith(path) and message in str(info.value)


def test_missing_config_file_and_invalid_json(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_model_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        get_model_config(str(bad))


# --- the training-step benchmark still runs -----------------------------------------------------

def test_train_step_benchmark_smoke(tmp_path):
    from _scripts import load_script, run_keeping_threads

    bench = load_script("benchmarks/train_step.py")
    out = tmp_path / "train_step.json"
    run_keeping_threads(bench.main, ["--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1",
                                     "--precisions", "fp32", "--matmul-size", "256", "--out", str(out)])
    result = json.loads(out.read_text())
    ours = [r for r in result["runs"] if r["impl"] == "ours"]
    assert [r["impl"] for r in result["runs"]] == ["ours", "reference"] * 2  # timed in the same rounds
    mmcl, both = ours
    assert (mmcl["objective"], both["objective"]) == ("mmcl", "mmcl+ssl")
    assert "speed-up over the eager reference, mmcl fp32" in result["checks"]
    assert both["images_per_step"] == 2 * mmcl["images_per_step"] == 8
    # Two views of everything: the counted work doubles (the logit matrices are a rounding error).
    assert 1.9 < both["gflop_per_step"] / mmcl["gflop_per_step"] < 2.1
    assert mmcl["samples_per_s"] > 0 and result["matmul_peak_gflop_per_s"]["bf16"] > 0


# --------------------------------------------------------------------------------------------
# An independent implementation: the eager reference CLIP of benchmarks/reference_clip.py
# --------------------------------------------------------------------------------------------
def _reference_module():
    from _scripts import load_script

    return load_script("benchmarks/reference_clip.py")


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_our_clip_equals_the_plain_reference_written_the_open_clip_way(name):
    """Same weights, an implementation without our speed choices (NCHW, full attention pool, float
    causal mask, default attention kernels): same features and the same gradients, to float32
    rounding. The reference loads our state dict, so the names are open_clip's too."""
    reference = _reference_module()
    torch.manual_seed(0)
    ours = create_model(name, seed=3)
    with torch.no_grad():  # non-trivial BN statistics and weights, so every path matters
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
    ref = reference.reference_from(ours)
    size, ctx = ours.image_size, ours.context_length
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, size, size, generator=g)
    texts = torch.randint(1, 49406, (4, ctx), generator=g)
    texts[:, ctx // 2] = 49407
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        a, b = ours(image=images, text=texts), ref(image=images, text=texts)
        for key in ("image_features", "text_features"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{mode} {key}")
    loss_a = (a["image_features"] @ a["text_features"].T).logsumexp(0).sum()
    loss_b = (b["image_features"] @ b["text_features"].T).logsumexp(0).sum()
    loss_a.backward()
    loss_b.backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if p.grad is None:
            assert ref_grads[n].grad is None or not ref_grads[n].grad.any(), n
            continue
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-3, atol=1e-6, msg=n)
