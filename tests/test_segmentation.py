"""Semantic segmentation: metrics against hand-computed cases, inference modes, data loading and
its errors, heads on several backbones, checkpoint initialisation, prediction files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from agentlit.data.seg_transforms import Pad, PhotoMetricDistortion, RandomFlip, hue_matrix, saturation_matrix
from agentlit.data.segmentation import (
    ADE20KDataModule,
    FolderSegmentationDataModule,
    ShapesDataModule,
    ShapesDataset,
    check_mask_labels,
    seg_collate,
)
from agentlit.data.shapes import SHAPE_CLASSES, render_shapes
from agentlit.tasks.metrics import SegmentationMetrics, format_iou_table
from agentlit.tasks.segmentation import SegmentationModule, build_backbone, palette, slide_inference

# A reduced Agent-PVT: one block per stage, 64-px inputs (maps 16/8/4/2).
PVT_KW = dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
              mlp_ratios=[2, 2, 2, 2], agent_num=[9, 16, 16, 4])
# A reduced Agent-DeiT: single stride 8 → the simple pyramid makes strides 2/4/8/16 from 4 depths.
DEIT_KW = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, agent_num=16, out_indices=(0, 1, 2, 3))


def _module(backbone: str, kw: dict, head: str = "fpn", **extra) -> SegmentationModule:
    kw = dict(kw)
    extra.setdefault("out_indices", kw.pop("out_indices", None))
    return SegmentationModule(backbone, num_classes=4, head=head, backbone_kwargs=kw, head_channels=16,
                              neck_channels=16, aux_channels=16, **extra)


# ----------------------------------------------------------------------------- metrics
def test_miou_hand_computed_absent_class_and_ignore():
    K = 4  # class 3 never appears in gt nor predictions → excluded from the mean
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 1]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 3, 0, 0]])  # the two ignore pixels are predicted 3 and 0: no effect
    m = SegmentationMetrics(K, ignore_index=255)
    m.update(preds[None], target[None])
    r = m.compute()
    # class 0: I=1 (pixel 0,0), gt area 2, pred area 2 (pixel 0,0 and 1,3) → U=3 → 1/3
    # class 1: gt (0,2),(0,3),(1,3); pred (0,1),(0,2),(0,3) → I=2, U=4 → 0.5
    # class 2: I=1, U=1 → 1
    expected = torch.tensor([1 / 3, 0.5, 1.0])
    assert torch.allclose(r["iou"][:3], expected)
    assert torch.isnan(r["iou"][3])
    assert r["mIoU"].item() == pytest.approx(expected.mean().item())
    assert r["aAcc"].item() == pytest.approx(4 / 6)  # 4 of 6 labeled pixels right
    assert r["mAcc"].item() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_miou_predicted_but_absent_class_scores_zero():
    m = SegmentationMetrics(3, ignore_index=255)
    m.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    r = m.compute()
    assert r["iou"][0].item() == pytest.approx(0.5) and r["iou"][2].item() == 0.0 and torch.isnan(r["iou"][1])
    assert r["mIoU"].item() == pytest.approx(0.25)


def test_miou_is_dataset_level_not_per_image_mean():
    m = SegmentationMetrics(2, ignore_index=255)
    # image A: 1 pixel of class 1, predicted right; image B: 3 class-1 pixels, 1 right, 2 predicted 0.
    m.update(torch.tensor([[[1, 0, 0, 0]]]), torch.tensor([[[1, 0, 0, 0]]]))
    m.update(torch.tensor([[[1, 0, 0, 0]]]), torch.tensor([[[1, 1, 1, 0]]]))
    r = m.compute()
    # summed: class 1 I=2, U=4 → 0.5; class 0 I=4 (3 + 1), U=6 → 2/3
    assert r["iou"].tolist() == pytest.approx([4 / 6, 0.5])
    per_image = (((3 / 3 + 1) / 2) + ((1 / 3 + 1 / 3) / 2)) / 2
    assert r["mIoU"].item() != pytest.approx(per_image)
    table = format_iou_table(r["iou"], r["acc"], ["bg", "thing"])
    assert "thing" in table and "50.00" in table and "mean" in table


# ----------------------------------------------------------------------------- inference
def test_slide_equals_whole_when_crop_is_image():
    torch.manual_seed(0)
    m = _module("agent_pvt_tiny", PVT_KW, inference="whole").eval()
    x = torch.randn(2, 3, 64, 64)
    whole = m(x)
    m.hparams.inference, m.hparams.crop_size, m.hparams.stride = "slide", 64, 32
    assert torch.allclose(m(x), whole, atol=1e-5)
    assert whole.shape == (2, 4, 64, 64)


def test_slide_averages_overlapping_windows():
    # A pointwise "model" gives the same logits in every window: any crop/stride must reproduce it.
    conv = nn.Conv2d(3, 5, 1)
    x = torch.randn(1, 3, 37, 50)
    out = slide_inference(conv, x, 5, crop=(16, 20), stride=(10, 7))
    assert torch.allclose(out, conv(x), atol=1e-6)
    # A position-dependent model: each window sees a constant = its own x1; overlaps must average.
    marker = lambda t: torch.full((1, 1, *t.shape[-2:]), float(t[0, 0, 0, 0]))  # noqa: E731
    grid = torch.arange(10.0).repeat(1, 3, 1, 1)  # (1, 3, 1, 10) with value = column
    out = slide_inference(marker, grid, 1, crop=(1, 4), stride=(1, 3))
    # windows start at columns 0, 3, 6 (last flush: 6); column 3 is covered by windows 0 and 3.
    assert out[0, 0, 0, 3].item() == pytest.approx((0 + 3) / 2)
    assert out[0, 0, 0, 9].item() == pytest.approx(6.0)


def test_flip_inference_is_average_of_both_passes():
    m = _module("agent_pvt_tiny", PVT_KW).eval()
    x = torch.randn(1, 3, 64, 64)
    plain = m(x)
    m.hparams.flip = True
    flipped = m._whole(x.flip(-1)).flip(-1)
    assert torch.allclose(m(x), (plain + flipped) / 2, atol=1e-5)


# ----------------------------------------------------------------------------- training steps
@pytest.mark.parametrize("head", ["fpn", "upernet"])
@pytest.mark.parametrize("backbone,kw", [("agent_pvt_tiny", PVT_KW), ("agent_deit_tiny", DEIT_KW), ("resnet18", {})])
def test_one_training_step_updates_backbone_and_head(backbone, kw, head):
    m = _module(backbone, kw, head, aux_weight=0.4 if head == "upernet" else 0.0, lr=1e-3)
    if backbone == "agent_deit_tiny":
        assert m.model.pyramid is not None and m.model.strides == [2, 4, 8, 16]
    optimizer = torch.optim.AdamW(m.param_groups(), lr=1e-3)
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 4, (2, 64, 64))}
    batch["mask"][:, :4] = 255
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    m.train()
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    after = m.model.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if v.dtype.is_floating_point and not torch.equal(before[k], v)}
    assert {"backbone", "decode_head"} <= changed
    if head == "upernet":
        assert "aux_head" in changed


def test_no_weight_decay_on_norms_position_and_agent_biases():
    m = _module("agent_pvt_tiny", PVT_KW)
    decay, no_decay = m.param_groups()
    names = {id(p): n for n, p in m.model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("pos_embed1") for n in nd)
    assert any(n.endswith("attn.an_bias") for n in nd) and any(n.endswith("attn.wa_bias") for n in nd)
    assert any(".norm1." in n for n in nd) and any("decode_head" in n and n.endswith(".1.weight") for n in nd)  # BN
    assert any(n.endswith("attn.qkv.weight") for n in d) and not any("an_bias" in n for n in d)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == m.hparams.weight_decay


def test_poly_schedule_with_warmup():
    import lightning as L

    m = _module("agent_pvt_tiny", PVT_KW, lr=1e-2, warmup_iters=10, power=1.0, max_iters=100)
    m.trainer = L.Trainer(logger=False, enable_checkpointing=False)
    cfg = m.configure_optimizers()
    sched = cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        cfg["optimizer"].step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-2 * 1e-6) and lrs[5] < lrs[10]
    assert lrs[50] == pytest.approx(1e-2 * 0.5) and lrs[99] == pytest.approx(1e-2 * 0.01)


def test_backbone_without_features_only_lists_alternatives():
    from timm.models import is_model, register_model

    if not is_model("segtest_plain_classifier"):  # a registered model that ignores features_only

        @register_model
        def segtest_plain_classifier(pretrained: bool = False, **kwargs):
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    with pytest.raises(ValueError, match=r"does not support features_only.*agent_pvt_tiny"):
        build_backbone("segtest_plain_classifier")


def test_unknown_head_and_backbone_names():
    with pytest.raises(ValueError, match="head="):
        _module("agent_pvt_tiny", PVT_KW, head="deeplab")
    with pytest.raises(ValueError, match="closest registered names"):
        build_backbone("agent_pvt_tinyy")
    with pytest.raises(ValueError, match="out_indices"):  # a 2-block ViT has no "last 3 blocks"
        build_backbone("agent_deit_tiny", img_size=32, embed_dim=16, depth=2, num_heads=1, agent_num=4)


def test_backbone_checkpoint_from_classification(tmp_path):
    import timm

    # One of ours: a Lightning checkpoint of a classifier (state_dict with the "model." prefix),
    # trained at 32 px — the segmentation backbone runs at 64 px, so position embeddings resize.
    cls_kw = {**PVT_KW, "img_size": 32, "agent_num": [9, 9, 4, 1]}
    clf = timm.create_model("agent_pvt_tiny", num_classes=7, **cls_kw)
    path = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in clf.state_dict().items()}, "epoch": 3}, path)
    m = _module("agent_pvt_tiny", PVT_KW, backbone_checkpoint=str(path))
    seg = m.model.backbone.model.state_dict()
    ref = clf.state_dict()
    assert torch.equal(seg["block2.0.attn.qkv.weight"], ref["block2.0.attn.qkv.weight"])
    assert torch.equal(seg["patch_embed1.proj.weight"], ref["patch_embed1.proj.weight"])
    assert seg["pos_embed1"].shape == (1, 16 * 16, 16) and ref["pos_embed1"].shape == (1, 8 * 8, 16)
    assert seg["block1.0.attn.ah_bias"].shape[3] == 16  # agent biases resized to the new map
    assert "head.weight" not in seg
    # The classification task's own checkpoint layout (ClassificationModule.state_dict()).
    from agentlit.tasks import ClassificationModule

    task = ClassificationModule("agent_pvt_tiny", num_classes=7, img_size=32, drop_path_rate=0.0,
                                model_kwargs={k: v for k, v in cls_kw.items() if k != "img_size"})
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, tmp_path / "task.ckpt")
    m3 = _module("agent_pvt_tiny", PVT_KW, backbone_checkpoint=str(tmp_path / "task.ckpt"))
    assert torch.equal(m3.model.backbone.model.state_dict()["block3.0.attn.proj.weight"],
                       task.model.state_dict()["block3.0.attn.proj.weight"])
    # An official-style release file {'model': state_dict} goes through the same path.
    torch.save({"model": clf.state_dict()}, tmp_path / "official.pth")
    m2 = _module("agent_pvt_tiny", PVT_KW, backbone_checkpoint=str(tmp_path / "official.pth"))
    assert torch.equal(m2.model.backbone.model.state_dict()["block4.0.mlp.fc1.weight"], ref["block4.0.mlp.fc1.weight"])


# ----------------------------------------------------------------------------- data
def _write_ade(root, n_train=3, n_val=2, size=(40, 56)):
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = f"ADE_{split[:3]}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            mask = rng.integers(0, 151, size, dtype=np.uint8)
            mask[0, :3] = [0, 1, 150]
            Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")


def test_ade20k_loader_on_small_folder(tmp_path):
    _write_ade(tmp_path)
    dm = ADE20KDataModule(str(tmp_path), crop_size=32, scale=(128, 32), batch_size=2, val_batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 150 and len(dm.train_set) == 3 and len(dm.val_set) == 2
    raw = np.asarray(Image.open(dm.val_set.masks[0]), dtype=np.int64)
    sample = dm.val_set[0]
    # reduce-zero-label: 0 → 255 (ignore), k → k-1
    assert sample["mask"][0, :3].tolist() == [255, 0, 149]
    assert torch.equal(sample["mask"][raw > 0], torch.from_numpy(raw[raw > 0] - 1))
    # evaluation: image resized to short side 32, mask kept at the original 40x56
    assert sample["image"].shape == (3, 32, 45) and sample["mask"].shape == (40, 56)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 32, 32)
    assert batch["mask"].max() <= 255 and batch["mask"].dtype == torch.int64
    vb = next(iter(dm.val_dataloader()))
    assert vb["mask"].shape == (2, 40, 56) and vb["name"][0].startswith("ADE_val")


def test_ade20k_missing_layout_and_bad_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/"):
        ADE20KDataModule(str(tmp_path), num_workers=0).setup("fit")
    _write_ade(tmp_path, n_train=1, n_val=1)
    bad = tmp_path / "annotations" / "validation" / "ADE_val_00000000.png"
    m = np.zeros((40, 56), np.uint8)
    m[0, 0], m[0, 1] = 151, 200
    Image.fromarray(m).save(bad)
    dm = ADE20KDataModule(str(tmp_path), num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"ADE_val_00000000\.png has labels \[151, 200\]"):
        dm.val_set[0]


def test_folder_module_size_mismatch_names_both_files(tmp_path):
    for d in ("ti", "tm", "vi", "vm"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ti" / "a.png")
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(tmp_path / "tm" / "a.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "vi" / "b.jpg")
    Image.fromarray(np.full((20, 30), 2, np.uint8)).save(tmp_path / "vm" / "b.png")
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    dm = FolderSegmentationDataModule(
        str(tmp_path / "ti"), str(tmp_path / "tm"), str(tmp_path / "vi"), str(tmp_path / "vm"),
        str(tmp_path / "classes.txt"), crop_size=16, scale=None, num_workers=0,
    )
    dm.setup("fit")
    assert dm.class_names == ("sky", "road", "car") and dm.num_classes == 3
    assert dm.val_set[0]["mask"].unique().tolist() == [2]
    with pytest.raises(ValueError, match=r"ti/a\.png.*tm/a\.png"):
        dm.train_set[0]
    dm.predict_root = str(tmp_path / "vi")  # predict on a folder of images: no masks needed
    batch = next(iter(dm.predict_dataloader()))
    assert batch["name"] == ["b"] and "mask" not in batch and batch["orig_size"] == [(20, 30)]
    assert batch["file"] == ["b.jpg"] and batch["unreadable"] == [""]


def test_label_check_allows_ignore_and_rejects_out_of_range():
    ok = check_mask_labels(np.array([[0, 2, 255]]), "m.png", num_classes=3)
    assert ok.tolist() == [[0, 2, 255]]
    with pytest.raises(ValueError, match=r"m\.png has labels \[3\]"):
        check_mask_labels(np.array([[0, 3]]), "m.png", num_classes=3)


def test_shapes_deterministic_and_valid():
    a, ma = render_shapes(5, size=48, seed=1)
    b, mb = render_shapes(5, size=48, seed=1)
    c, _ = render_shapes(5, size=48, seed=2)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and ma.max() < len(SHAPE_CLASSES)
    masks = np.stack([render_shapes(i, 32)[1] for i in range(40)])
    assert set(np.unique(masks)) == set(range(len(SHAPE_CLASSES)))  # every class occurs
    dm = ShapesDataModule(num_train=8, num_val=4, img_size=32, batch_size=4, val_batch_size=4)
    dm.setup("fit")
    assert isinstance(dm.val_set, ShapesDataset) and dm.val_set.offset != dm.train_set.dataset.offset
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)
    # augmentation is a function of (seed, epoch, index): repeatable, and new each epoch
    a, b, c = dm.train_set[(1, 3)], dm.train_set[(1, 3)], dm.train_set[(2, 3)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


def test_joint_transforms_keep_image_and_mask_aligned():
    img = torch.arange(2 * 3).float().reshape(1, 2, 3).repeat(3, 1, 1)
    mask = torch.arange(6).reshape(2, 3)
    torch.manual_seed(0)
    s = RandomFlip(1.0)({"image": img.clone(), "mask": mask.clone()})
    assert torch.equal(s["image"][0].long(), s["mask"])
    s = Pad(4, ignore_index=255)(s)
    assert s["mask"].shape == (4, 4) and (s["mask"][2:] == 255).all() and (s["image"][:, 2:] == 0).all()
    grey = torch.full((3, 2, 2), 120.0)
    assert torch.allclose(hue_matrix(25.0) @ grey[:, 0, 0], grey[:, 0, 0], atol=1e-3)  # greys keep their hue
    assert torch.allclose(saturation_matrix(0.0) @ torch.tensor([255.0, 0, 0]), torch.full((3,), 0.299 * 255))
    out = PhotoMetricDistortion()({"image": torch.rand(3, 8, 8) * 255, "mask": mask})
    assert out["image"].min() >= 0 and out["image"].max() <= 255


def test_collate_lists_for_mixed_sizes():
    b = seg_collate([{"image": torch.zeros(3, 4, 5), "name": "a"}, {"image": torch.zeros(3, 6, 5), "name": "b"}])
    assert isinstance(b["image"], list) and b["name"] == ["a", "b"]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_fit_validate_predict_with_trainer(tmp_path, capsys):
    import lightning as L

    dm = ShapesDataModule(num_train=4, num_val=3, img_size=64, batch_size=2, val_batch_size=3)
    m = SegmentationModule("agent_pvt_tiny", num_classes=6, backbone_kwargs=PVT_KW, head_channels=16,
                           neck_channels=16, output_dir=str(tmp_path / "pred"))
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(m, dm)
    out = trainer.test(m, dm, verbose=False)[0]
    assert 0.0 <= out["test/mIoU"] <= 1.0 and 0.0 <= out["test/aAcc"] <= 1.0
    printed = capsys.readouterr().out
    assert "test per-class IoU" in printed and "triangle" in printed
    paths = trainer.predict(m, dm)[0]
    assert len(paths) == 3
    png = Image.open(paths[0])
    assert png.mode == "P" and png.size == (64, 64) and paths[0].endswith("shapes_val_00000.png")
    assert np.asarray(png).max() < 6
    assert tuple(png.getpalette()[3:6]) == tuple(palette(6)[1])


@pytest.mark.slow
def test_quickstart_config_runs_one_step(tmp_path):
    from pathlib import Path

    from agentlit.cli import cli

    config = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "quickstart.yaml"
    run = cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path), "--data.num_train", "32", "--data.num_val", "8"])
    assert isinstance(run.model, SegmentationModule) and run.model.hparams.backbone == "agent_pvt_tiny"
    assert run.trainer.global_step == 1 and "val/mIoU" in run.trainer.callback_metrics


def test_shapes_hue_bands():
    # With a small hue jitter each class keeps its own hue band; with 0.5 hues are uniform.
    import colorsys

    def band_distances(hue_jitter: float) -> dict[int, list[float]]:
        """Per class, how far the hue of each clearly visible shape is from the class's band centre."""
        out = {c: [] for c in range(1, 6)}
        for i in range(30):
            img, mask = render_shapes(i, 48, num_shapes=(1, 1), hue_jitter=hue_jitter, shape_contrast=0.0, noise=0.0)
            c = int(mask.max())
            if c and (mask == c).sum() > 20:  # skip shapes too small to measure a hue on
                h = colorsys.rgb_to_hsv(*(img[mask == c].mean(0) / 255))[0]
                d = abs(h - (c - 1) / 5)
                out[c].append(min(d, 1 - d))
        return out

    narrow = band_distances(0.02)
    # the filter must leave shapes of every class to check, else the bands below prove nothing
    assert all(len(ds) >= 2 for ds in narrow.values()), {c: len(ds) for c, ds in narrow.items()}
    assert all(d < 0.06 for ds in narrow.values() for d in ds), narrow
    wide = band_distances(0.5)
    assert sum(d >= 0.06 for ds in wide.values() for d in ds) >= 5  # the check tells the two apart
