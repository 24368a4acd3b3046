"""Diffusion training with agent attention: the diffusers processor against a naive reference,
agent/softmax swap, training, EMA, CFG dropout, predict outputs, distillation into agent attention
on the tiny Stable Diffusion pipeline, and bad inputs."""
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from agentlit.diffusion import AgentAttnProcessor, agent_processors, build_tiny_pipeline, set_agent_attention
from agentlit.tasks.diffusion import DiffusionModule
from agentlit.errors import UserError
from agentlit.tasks.metrics import classify_digits

# A UNet small enough for CPU tests: 8x8 images, self-attention at 8x8 (64 tokens) and 4x4.
TINY_UNET = dict(
    sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16, 32],
    down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=8, norm_num_groups=8, num_class_embeds=11,
)


def tiny_module(**kw):
    args = dict(unet=TINY_UNET, img_size=8, num_classes=10, agent_downsample=[1], agent_num=4,
                num_inference_steps=3, eval_samples_per_class=1, lr=2e-3, warmup_steps=0)
    args.update(kw)
    return DiffusionModule(**args)


# ----------------------------------------------------------------------------- the processor
def _attention(dim=32, heads=4):
    from diffusers.models.attention_processor import Attention

    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True).eval()


def _reference(attn, proc, x, h, w):
    """Agent attention written from the paper's formulas with einsum + softmax (no SDPA, no core op)."""
    B, N, C = x.shape
    H, d = attn.heads, C // attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, N, C)
    ph, pw = proc.agent_grid
    a = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(B, C, h, w), (ph, pw)).flatten(2).transpose(1, 2)
    n = ph * pw
    sp = lambda t: t.reshape(B, -1, H, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, a = sp(q), sp(k), sp(v), sp(a)
    # B1[h, i, (y, x)] = an(y, x) + ah(y) + aw(x);  B2[h, (y, x), i] = na(y, x) + ha(y) + wa(x)
    an = F.interpolate(proc.an_bias, size=(h, w), mode="bilinear", align_corners=False)  # (H, n, h, w)
    na = F.interpolate(proc.na_bias, size=(h, w), mode="bilinear", align_corners=False)
    b1 = (an + proc.ah_bias[0] + proc.aw_bias[0]).reshape(H, n, h * w)
    b2 = (na.permute(0, 2, 3, 1) + proc.ha_bias[0] + proc.wa_bias[0]).reshape(H, h * w, n)
    s = d**-0.5
    s1 = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", a, k) * s + b1, -1)
    s2 = torch.softmax(torch.einsum("bhqd,bhnd->bhqn", q, a) * s**proc.broadcast_scale_exp + b2, -1)
    o = torch.einsum("bhqn,bhnd->bhqd", s2, torch.einsum("bhnm,bhmd->bhnd", s1, v))
    o = o.permute(0, 2, 1, 3).reshape(B, N, C)
    v_map = v.permute(0, 1, 3, 2).reshape(B, C, h, w)
    o = o + proc.dwc(v_map).flatten(2).transpose(1, 2) + proc.shortcut * v.permute(0, 2, 1, 3).reshape(B, N, C)
    return attn.to_out[0](o)


@pytest.mark.parametrize("exp,shortcut", [(1.0, 0.0), (0.3, 0.075)])
def test_processor_matches_naive_reference(exp, shortcut):
    attn = _attention()
    proc = AgentAttnProcessor(32, 4, feat_size=(6, 8), agent_num=(2, 3), broadcast_scale_exp=exp, shortcut=shortcut)
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.3)
    attn.set_processor(proc)
    assert "processor.an_bias" in dict(attn.named_parameters())  # trained and saved with the layer
    x = torch.randn(2, 48, 32)
    with torch.no_grad():
        ref = _reference(attn, proc, x, 6, 8)
        proc.latent_size[0] = (6, 8)
        torch.testing.assert_close(attn(x), ref, rtol=1e-4, atol=1e-5)
        # any other latent size: biases interpolated (templates and separable terms)
        proc.latent_size[0] = (10, 10)
        x2 = torch.randn(1, 100, 32)
        out = attn(x2)
    assert out.shape == x2.shape and torch.isfinite(out).all()


def test_processor_builds_large_biases_by_map_rows(monkeypatch):
    """Above the size limit the processor hands its biases to the CPU op by map rows (RowBias), as the
    vision layers do: the naive reference's output, and the whole-bias path's gradients."""
    attn = _attention()
    proc = AgentAttnProcessor(32, 4, feat_size=(6, 8), agent_num=(2, 3))
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.3)
    attn.set_processor(proc)
    proc.latent_size[0] = (6, 8)
    x = torch.randn(2, 48, 32)
    rows = []
    build_rows = type(proc).position_bias_rows
    monkeypatch.setattr(proc, "position_bias_rows", lambda size: rows.append(size) or build_rows(proc, size))

    def grads() -> dict[str, torch.Tensor]:
        attn.zero_grad()
        attn(x).square().sum().backward()
        return {name: p.grad.clone() for name, p in attn.named_parameters()}

    whole = grads()
    assert not rows
    proc.bias_cache_elements = 0
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference(attn, proc, x, 6, 8), rtol=1e-4, atol=1e-5)
    by_rows = grads()
    assert rows == [[6, 8]] * 3  # evaluation, training forward, the factors rebuilt in backward
    for name, grad in by_rows.items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero_init_starts_as_training_free_agent_attention():
    attn = _attention()
    proc = AgentAttnProcessor(32, 4, feat_size=4, agent_num=4, zero_init=True, broadcast_scale_exp=0.3, shortcut=0.075)
    assert all((p == 0).all() for p in proc.parameters())
    from agentlit.core import agent_attention

    attn.set_processor(proc)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        a = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
        sp = lambda t: t.reshape(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
        o = agent_attention(sp(q), sp(k), sp(v), sp(a), scale=8**-0.5, broadcast_scale=8**-0.15) + 0.075 * sp(v)
        expect = attn.to_out[0](o.transpose(1, 2).reshape(2, 16, 32))
        torch.testing.assert_close(attn(x), expect, rtol=1e-5, atol=1e-6)


def test_agent_softmax_swap_per_resolution():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    plain = UNet2DModel(**TINY_UNET).eval()
    agent = UNet2DModel(**TINY_UNET).eval()
    agent.load_state_dict(plain.state_dict())
    names = set_agent_attention(agent, "agent", agent_downsample=[1], agent_num=4)
    assert names == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    assert set(agent_processors(agent)) == {f"{n}.processor" for n in names}
    assert set_agent_attention(plain, "softmax") == [] and not agent_processors(plain)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.allclose(agent(x, t, class_labels=y).sample, plain(x, t, class_labels=y).sample)
    # softmax everywhere again: the original processors
    fresh = UNet2DModel(**TINY_UNET).eval()
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, class_labels=y).sample, plain(x, t, class_labels=y).sample)
    # a module's agent/softmax variants differ only in the processors' parameters
    a, s = tiny_module(attention="agent"), tiny_module(attention="softmax")
    extra = set(a.unet.state_dict()) - set(s.unet.state_dict())
    assert extra and all(".processor." in k for k in extra) and set(s.unet.state_dict()) <= set(a.unet.state_dict())


# ----------------------------------------------------------------------------- training
def _batch(n=32, seed=0):
    from agentlit.data import DigitsDataModule

    dm = DigitsDataModule(img_size=8, channels=1, augment=False, batch_size=n)
    dm.setup()
    return next(iter(dm.val_dataloader()))


def test_training_steps_decrease_loss():
    torch.manual_seed(0)
    m = tiny_module(ema_decay=None, cfg_dropout=0.0)
    opt = torch.optim.AdamW(m.unet.parameters(), lr=3e-3)
    x, y = _batch()

    def held_loss():
        m.eval()
        with torch.no_grad():
            return m.diffusion_losses((x, y), generator=torch.Generator().manual_seed(1))["loss"].item()

    before = held_loss()
    m.train()
    for _ in range(40):
        loss = m.diffusion_losses((x, y))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.7 * before, (before, after)


def test_v_prediction_target_and_ema_update():
    m = tiny_module(prediction_type="v_prediction", ema_decay=0.99)
    x, y = _batch(8)
    g = torch.Generator().manual_seed(3)
    loss = m.diffusion_losses((x, y), generator=g)["denoise"]
    # the same loss by hand: v = sqrt(a) eps - sqrt(1 - a) x0
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    ab = m.train_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.rand(8, generator=g)  # the CFG dropout draw
    m.train()
    with torch.no_grad():
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
    assert torch.isfinite(loss)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x
    torch.testing.assert_close(m.train_scheduler.get_velocity(x, noise, t), v.float())
    assert x_t.shape == x.shape
    # EMA: decay warms up as min(d, (1 + step) / (10 + step)); at step 0 it is 0.1
    old = [p.detach().clone() for p in m.ema.parameters()]
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(1.0)
    m.update_ema()
    for e, o, p in zip(m.ema.parameters(), old, m.unet.parameters()):
        torch.testing.assert_close(e, 0.1 * o + 0.9 * p)


def test_cfg_dropout_replaces_the_class_with_the_null_class():
    seen = []
    for p in (0.0, 1.0):
        m = tiny_module(cfg_dropout=p)
        m.unet.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
        m.train()
        x, y = _batch(8)
        m.diffusion_losses((x, y))
    assert torch.equal(seen[0], y) and (seen[1] == 10).all()


def test_sampling_is_seeded_and_guided():
    m = tiny_module(guidance_scale=3.0).eval()
    y = torch.tensor([0, 1, 2])
    a = m.sample(labels=y, seeds=[5, 6, 7])
    b = m.sample(labels=y[1:], seeds=[6, 7])
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    torch.testing.assert_close(a[1:], b)  # a sample depends on its seed, not on the batch
    for name in ("dpm", "ddpm"):
        m.hparams.scheduler = name
        assert torch.isfinite(m.sample(labels=y)).all()
    assert classify_digits(a).shape == (3,)


def test_predict_writes_pngs_grid_and_json(tmp_path, capsys):
    from agentlit.data import DigitsDataModule

    m = tiny_module(output_dir=str(tmp_path / "gen"))
    dm = DigitsDataModule(img_size=8, channels=1, val_fraction=0.06, batch_size=64)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.predict(m, datamodule=dm)
    out = tmp_path / "gen"
    entries = json.loads((out / "generation.json").read_text())
    assert len(entries) == 108 and {e["label"] for e in entries} == set(range(10))
    assert all(isinstance(e["label"], int) and (out / e["file"]).is_file() for e in entries)
    assert (out / "grid.png").is_file()
    from agentlit.score_digits import main as score_main

    capsys.readouterr()  # predict's own messages
    score_main([str(out / "generation.json")])  # python -m agentlit.score_digits <generation.json>
    score = json.loads(capsys.readouterr().out)
    assert score["samples"] == 108 and score["classes"] == 10 and 0.0 <= score["cond_acc"] <= 1.0
    assert set(score["per_class"]) == {str(c) for c in range(10)}
    with pytest.raises(SystemExit, match="missing.json does not exist; give the generation.json"):
        score_main([str(out / "missing.json")])


def test_fit_validates_with_cond_acc_fid_and_grid(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from agentlit.data import DigitsDataModule

    m = tiny_module()
    dm = DigitsDataModule(img_size=8, channels=1, val_fraction=0.06, batch_size=32, augment=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_train_batches=3, logger=TensorBoardLogger(tmp_path),
                        enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"val/cond_acc", "val/fid", "val/loss"} <= set(metrics)
    assert 0 <= metrics["val/cond_acc"] <= 1 and metrics["val/fid"] >= 0
    assert list(tmp_path.rglob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- fine-tuning SD
@pytest.mark.slow
def test_distillation_beats_training_free_agentsd():
    """The tiny SD pipeline's UNet, fine-tuned into agent attention by distillation from the frozen
    original, ends closer to the original on held-out latents/prompts than training-free AgentSD."""
    import copy

    from agentlit.data import DigitsDataModule
    from agentlit.diffusion import apply_patch

    torch.manual_seed(0)
    m = DiffusionModule(pipeline="tiny", img_size=32, num_classes=None, agent_downsample=[1], agent_num=16,
                        agent_init="zero", trainable="attention", distill_weight=1.0, denoise_weight=0.0,
                        ema_decay=None, lr=2e-3, warmup_steps=0, classifier=None, cfg_dropout=0.1)
    dm = DigitsDataModule(img_size=32, channels=3, augment=False, batch_size=16)
    dm.setup()
    val = [(x, y) for x, y in dm.val_dataloader()][:2]

    def held_out(unet):
        errs = []
        for i, (x, y) in enumerate(val):
            g = torch.Generator().manual_seed(100 + i)
            x0 = m.encode_images(x)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (len(x),), generator=g)
            x_t = m.train_scheduler.add_noise(x0, noise, t)
            cond = m.encode_prompts([f"a handwritten digit {int(v)}, style {j}" for j, v in enumerate(y)])
            with torch.no_grad():
                errs.append(F.mse_loss(m._call(unet, x_t, t, cond), m._call(m.teacher, x_t, t, cond)).item())
        return sum(errs) / len(errs)

    agentsd = copy.deepcopy(m.teacher)
    apply_patch(agentsd)
    err_agentsd = held_out(agentsd)
    err_start = held_out(m.unet)
    opt = torch.optim.AdamW([p for p in m.unet.parameters() if p.requires_grad], lr=2e-3)
    m.train()
    batches = iter(dm.train_dataloader())
    for _ in range(30):
        loss = m.diffusion_losses(next(batches))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    err_end = held_out(m.unet)
    print(f"held-out MSE to the teacher: AgentSD {err_agentsd:.3e}, step 0 {err_start:.3e}, after 30 steps {err_end:.3e}")
    assert err_end < 0.5 * err_start and err_end < 0.5 * err_agentsd


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match=r"scheduler='plms' must be one of \['ddim', 'dpm', 'ddpm'\]"):
        tiny_module(scheduler="plms")
    with pytest.raises(UserError, match=r"attention='linear' must be one of \['agent', 'softmax'\]"):
        tiny_module(attention="linear")
    with pytest.raises(ValueError, match=r"agent grid 8x8 cannot be pooled from a 4x4 latent map; use at most"):
        tiny_module(agent_downsample=[2], agent_num=64)
    with pytest.raises(ValueError, match=r"agent_downsample \[4\] has no self-attention layer"):
        tiny_module(agent_downsample=[4])
    with pytest.raises(ValueError, match="needs unet num_class_embeds=21"):
        tiny_module(num_classes=20)
    from agentlit.data.captions import CaptionFolderDataModule

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"")  # an image without a caption does not count
    with pytest.raises(ValueError, match="holds no image with a non-empty caption"):
        CaptionFolderDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionFolderDataModule(str(tmp_path / "missing")).setup()


def test_text_unet_non_square_latents():
    """Transformer blocks see (B, N, C) sequences: the UNet hook gives the processor the latent size,
    so a non-square latent is laid out correctly and the biases are interpolated to it."""
    pipe = build_tiny_pipeline()
    names = set_agent_attention(pipe.unet, "agent", agent_downsample=[1], agent_num=9)
    assert names and all(".attn1" in n for n in names)  # self-attention only, cross-attention untouched
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        out = pipe.unet(torch.randn(1, 4, 12, 20), torch.tensor([10]), encoder_hidden_states=text).sample
    assert out.shape == (1, 4, 12, 20) and torch.isfinite(out).all()
    assert next(iter(agent_processors(pipe.unet).values())).latent_size[0] == (12, 20)
