"""Object detection / instance segmentation: detectors over agent backbones, the COCO data path
(built here as a small COCO folder), metrics, predictions, bad inputs and the two-config CLI path."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from agentlit.data.coco import (
    COCODetectionDataModule,
    COCOInstances,
    InstanceShapesDataModule,
    build_detection_transform,
    read_coco,
)
from agentlit.data.instances import export_coco, render_instances
from agentlit.data.sampling import EpochSeededDataset
from agentlit.models.detection import DetectionBackbone
from agentlit.tasks.detection import DetectionModule, coco_results, warmup_step_decay
from cli_helpers import ROOT, run_agentlit

PVT_KW = dict(img_size=64, embed_dims=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1],
              mlp_ratios=[2, 2, 2, 2], agent_num=[4, 4, 4, 1])
HEADS = dict(fpn_channels=32, representation_size=64, mask_head_channels=16, min_size=64, max_size=64,
             anchor_sizes=[8, 16, 32, 64, 128], warmup_iters=2)
CLASSES = ("circle", "square", "triangle")
CAT_IDS = [3, 7, 11]  # non-contiguous, as COCO's own ids


def tiny_module(detector: str = "mask_rcnn", num_classes: int = 3, **kw) -> DetectionModule:
    return DetectionModule("agent_pvt_tiny", num_classes=num_classes, detector=detector, backbone_kwargs=PVT_KW,
                           **{**HEADS, **kw})


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def make_coco(root: Path, n_train: int = 12, n_val: int = 6, size: int = 64) -> Path:
    """A COCO folder with non-contiguous category ids, grayscale images, an image without
    annotations and a crowd region in each split."""
    export_coco(root, {"train2017": n_train, "val2017": n_val}, img_size=size, seed=1, category_ids=CAT_IDS,
                classes=CLASSES, num_shapes=(1, 3), radius=(0.15, 0.3), hue_jitter=0.06)
    for split in ("train2017", "val2017"):
        ann_file = root / "annotations" / f"instances_{split}.json"
        data = json.loads(ann_file.read_text())
        for img in data["images"][:2]:  # grayscale files
            path = root / split / img["file_name"]
            Image.open(path).convert("L").save(path)
        empty_id = max(i["id"] for i in data["images"]) + 1
        Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(root / split / "empty.png")
        data["images"].append({"id": empty_id, "file_name": "empty.png", "height": size, "width": size})
        crowd = np.zeros((size, size), bool)
        y0, y1, x1 = size * 5 // 8, size * 15 // 16, size // 2
        crowd[y0:y1, 2:x1] = True
        data["annotations"].append({
            "id": 10_000, "image_id": data["images"][1]["id"], "category_id": CAT_IDS[1], "iscrowd": 1,
            "bbox": [2, y0, x1 - 2, y1 - y0], "area": float(crowd.sum()), "segmentation": _uncompressed_rle(crowd),
        })
        ann_file.write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("detector", ["mask_rcnn", "faster_rcnn", "retinanet"])
def test_each_detector_trains_and_infers(detector):
    m = tiny_module(detector)
    batch = m.example_batch(2, (64, 64))
    m.train()
    loss = m.training_loss(batch)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    body_grads = [p.grad for p in m.model.backbone.body.parameters() if p.grad is not None]
    assert body_grads and any(g.abs().sum() > 0 for g in body_grads)  # the loss reaches the agent backbone
    m.eval()
    with torch.no_grad():
        out = m.inference_step(batch)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    assert ("masks" in out[0]) == (detector == "mask_rcnn")
    # input normalisation comes from the backbone's pretrained_cfg (ImageNet mean/std)
    assert m.model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])


def test_fpn_levels_and_retinanet_p6_from_c5():
    m = tiny_module("mask_rcnn")
    feats = m.model.backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]  # strides 4-64
    r = tiny_module("retinanet")
    assert r.model.backbone.strides == [8, 16, 32]  # stages 2-4
    feats = r.model.backbone(torch.randn(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "p6", "p7"] and [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    extra = r.model.backbone.fpn.extra_blocks
    assert extra.p6.in_channels == PVT_KW["embed_dims"][-1] and not extra.use_P5  # mmdet 'on_input': from C5
    # the paper's settings where torchvision's defaults differ
    full = DetectionModule("agent_pvt_tiny", num_classes=80, backbone_kwargs=PVT_KW, fpn_channels=32)
    assert full.model.rpn._post_nms_top_n["training"] == 1000 and full.model.roi_heads.detections_per_img == 100
    assert full.model.transform.min_size == (800,) and full.model.transform.max_size == 1333
    assert full.model.transform.size_divisible == 32


def test_out_norm_adds_layernorm_per_stage():
    m = tiny_module("faster_rcnn", out_norm=True)
    assert len(m.model.backbone.norms) == 4
    x = torch.randn(1, 3, 64, 64)
    feats = m.model.backbone.features(x)
    for f in feats:  # each channel vector normalised
        assert torch.allclose(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-4)


@pytest.mark.parametrize("name,kw", [
    ("agent_pvt_small", dict(img_size=(800, 1344), embed_dims=[16, 32, 64, 128], num_heads=[1, 1, 2, 4],
                             depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], agent_num=[[12, 12], [16, 16], [28, 28], [28, 28]])),
    ("agent_swin_tiny", dict(img_size=(800, 1344), embed_dim=16, depths=[1, 1, 1, 2], num_heads=[1, 1, 2, 2],
                             agent_num=[[9, 9], [12, 12], [14, 14], [7, 7]], strict_img_size=False, dynamic_img_size=True)),
])
def test_dense_agent_backbones_at_detection_sizes(name, kw):
    # Dense agent grids, and input sizes other than the configured one (1333x800 padded to 32).
    body = DetectionBackbone(__import__("agentlit").models.build_backbone(name, (0, 1, 2, 3), None, False, **kw), 16)
    for H, W in [(800, 1344), (736, 1024)]:
        with torch.no_grad():
            feats = body(torch.randn(1, 3, H, W))
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [
            (H // 4, W // 4), (H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32), (-(-H // 64), -(-W // 64))]
        assert all(torch.isfinite(f).all() for f in feats.values())
    if name.startswith("agent_swin"):  # the last stage keeps Swin's shifted 7x7 windows at these sizes
        blk = body.body.model.layers[3].blocks[1]
        assert tuple(blk.window_size) == (7, 7) and tuple(blk.shift_size) == (3, 3)


# ----------------------------------------------------------------------------- data
def test_instances_are_visible_parts_with_tight_boxes():
    for i in range(20):
        s = render_instances(i, 64, num_shapes=(2, 4))
        assert s["masks"].shape[0] == len(s["labels"]) == len(s["boxes"]) == len(s["area"])
        if len(s["labels"]) > 1:  # visible masks never overlap
            assert s["masks"].sum(0).max() <= 1
        for m, b, a in zip(s["masks"], s["boxes"], s["area"]):
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(b) and a == m.sum()
    assert (render_instances(3, 64)["image"] == render_instances(3, 64)["image"]).all()  # pure function of (seed, index)


def test_coco_folder_labels_crowd_empty_and_grayscale(coco_root):
    dm = COCODetectionDataModule(str(coco_root), batch_size=2, num_workers=0)
    assert dm.category_ids == tuple(CAT_IDS) and dm.class_names == CLASSES and dm.num_classes == 3
    dm.setup("fit")
    val = dm.val_set
    raw = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    assert len(val) == len(raw["images"])  # the image without annotations is evaluated
    by_image = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(len(val)):
        s = val[i]
        anns = by_image.get(s["image_id"], [])
        assert s["image"].shape[0] == 3 and s["image"].dtype == torch.uint8  # grayscale files read as RGB
        assert len(s["labels"]) == len(anns) == len(s["masks"]) == len(s["boxes"])
        # contiguous labels, mapped back to the dataset's own ids
        assert [CAT_IDS[int(k) - 1] for k in s["labels"]] == [a["category_id"] for a in anns]
        assert s["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
    assert sum(int(val[i]["iscrowd"].sum()) for i in range(len(val))) == 1
    train_ids = {dm.train_set.dataset[i]["image_id"] for i in range(len(dm.train_set))}
    empty = next(i["id"] for i in json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())["images"]
                 if i["file_name"] == "empty.png")
    assert empty not in train_ids  # images without annotations are left out of training only


def test_crowd_regions_are_not_training_targets(coco_root):
    dm = COCODetectionDataModule(str(coco_root), num_workers=0)
    dm.setup("fit")
    sample = next(dm.val_set[i] for i in range(len(dm.val_set)) if dm.val_set[i]["iscrowd"].any())
    m = tiny_module()
    (target,) = m._train_targets([sample])
    assert len(target["boxes"]) == int((sample["iscrowd"] == 0).sum()) == len(target["masks"])


def test_swin_augmentation_is_seeded_and_keeps_boxes_on_masks():
    ds = InstanceShapesDataModule(num_train=8, num_val=2, img_size=96, num_shapes=(2, 3)).build_datasets()[0]
    t = build_detection_transform("multiscale_crop", crop_prob=1.0, crop_resize=(80, 96, 112), crop_size=(48, 72))
    seeded = EpochSeededDataset(ds, t, seed=5)
    for i in range(8):
        a, b = seeded[(2, i)], seeded[(2, i)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])  # same (epoch, index)
        H, W = a["image"].shape[-2:]
        assert 48 <= H <= 72 and 48 <= W <= 72
        assert len(a["boxes"]) == len(a["masks"]) == len(a["labels"]) == len(a["area"])
        for box, mask in zip(a["boxes"], a["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[2] > box[0] and box[3] > box[1]
            if len(xs):
                assert xs.min() >= box[0] - 1 and xs.max() < box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() < box[3] + 1
    assert any(not torch.equal(seeded[(0, i)]["image"], seeded[(1, i)]["image"]) for i in range(8))  # epochs differ


# ----------------------------------------------------------------------------- metrics, schedule, results
def test_ground_truth_as_prediction_scores_one_and_crowd_is_ignored(coco_root):
    dm = COCODetectionDataModule(str(coco_root), num_workers=0)
    dm.setup("validate")
    m = tiny_module()
    batch = [dm.val_set[i] for i in range(len(dm.val_set))]

    class Oracle(torch.nn.Module):  # returns the non-crowd ground truth, plus a detection on each crowd region
        def forward(self, images, targets=None):
            outs = []
            for s in batch:
                keep = torch.ones(len(s["labels"]), dtype=torch.bool)  # crowd matches must not count as false positives
                outs.append({"boxes": s["boxes"].as_subclass(torch.Tensor)[keep].float(), "labels": s["labels"][keep],
                             "scores": torch.ones(int(keep.sum())), "masks": s["masks"][keep][:, None].float()})
            return outs

    m.model = Oracle()
    m._eval_step(batch, m.val_metric)
    res = m.val_metric.compute()
    assert res["bbox_map"] == pytest.approx(1.0) and res["segm_map"] == pytest.approx(1.0)


def test_warmup_step_decay_matches_naive_schedule():
    f = warmup_step_decay(steps_per_epoch=10, warmup_steps=5, warmup_factor=0.001, milestones=(2, 3), gamma=0.1)
    for step in range(45):
        naive = (0.001 + 0.999 * step / 5 if step < 5 else 1.0) * (0.1 if step >= 20 else 1.0) * (0.1 if step >= 30 else 1.0)
        assert f(step) == pytest.approx(naive)


def test_coco_results_use_dataset_ids_and_xywh():
    from pycocotools import mask as mask_utils

    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:5, 3:9] = 0.9
    out = {"boxes": torch.tensor([[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1, 3]),
           "scores": torch.tensor([0.9, 0.2]), "masks": masks}
    bbox, segm = coco_results(out, 42, CAT_IDS)
    assert [b["category_id"] for b in bbox] == [3, 11] and bbox[0]["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert all(b["image_id"] == 42 for b in bbox)
    decoded = mask_utils.decode(segm[0]["segmentation"])
    assert decoded.shape == (20, 30) and decoded.sum() == 18 and decoded[2:5, 3:9].all()


# ----------------------------------------------------------------------------- trainer paths
def _trainer(tmp_path, **kw):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, accelerator="cpu", **kw)


def test_fit_test_predict_on_coco_folder(coco_root, tmp_path, capsys):
    dm = COCODetectionDataModule(str(coco_root), batch_size=4, val_batch_size=4, num_workers=0)
    m = tiny_module(output_dir=str(tmp_path / "pred"), detector_kwargs={"box_score_thresh": 0.0, "box_detections_per_img": 5},
                    score_threshold=0.0)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(m, dm)
    res = trainer.test(m, dm, verbose=False)[0]
    for key in ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l", "segm_mAP", "segm_mAP_l"):
        assert -1.0 <= res[f"test/{key}"] <= 1.0
    paths = [p for batch in trainer.predict(m, dm) for p in batch]
    val = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    assert len(paths) == len(val["images"]) and all(Path(p).is_file() for p in paths)
    assert Image.open(paths[0]).size == (512, 512)  # drawn enlarged to a readable size
    bbox = json.loads((tmp_path / "pred" / "results.bbox.json").read_text())
    segm = json.loads((tmp_path / "pred" / "results.segm.json").read_text())
    assert bbox and len(bbox) == len(segm)
    assert {b["category_id"] for b in bbox} <= set(CAT_IDS)  # the dataset's own ids, not labels
    assert {b["image_id"] for b in bbox} <= {i["id"] for i in val["images"]}
    assert "results.bbox.json" in capsys.readouterr().out
    # the results load as COCO detections against the annotation file
    from pycocotools.coco import COCO

    gt = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    assert len(gt.loadRes(bbox).getAnnIds()) == len(bbox)


def test_exact_resume_mid_epoch(tmp_path):
    from agentlit.callbacks import StepSeed

    def data():
        return InstanceShapesDataModule(num_train=16, num_val=2, img_size=64, classes=list(CLASSES), batch_size=4, seed=0)

    def run(max_steps, ckpt=None):
        L.seed_everything(0)
        m = tiny_module()
        cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
        t = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[StepSeed(), cb], default_root_dir=tmp_path, accelerator="cpu")
        t.fit(m, data(), ckpt_path=ckpt)
        return m

    full = run(6)
    run(3)  # interrupted mid-epoch (4 steps per epoch)
    resumed = run(6, str(tmp_path / "last.ckpt"))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_two_ranks_sample_what_one_process_samples(detector):
    """Each image's RPN / RoI sampling depends on (seed, step, its place in the global batch) only:
    ranks 0 and 1 of 2, with rows 0::2 and 1::2 of a batch of 4, draw what one process draws for
    the 4, so every loss that averages over a fixed number of samples per image (the RPN's, the
    box head's; RetinaNet's per-image losses) is the mean of the ranks' (what DDP's gradient average
    takes), and for Faster R-CNN and RetinaNet so is the gradient. Mask R-CNN's mask loss averages
    over the positive RoIs of a process's batch, a count that differs between ranks (torchvision's
    and mmdet's normalisation; docs/detection.md).

    In float64: the backbone's rounding depends on how many images share a GEMM, and in float32 such a
    difference (1e-7) can reorder two near-equal RPN scores, so one image's RoIs come from a different
    proposal (seen after a kernel change: one box 33 px away). That is rounding, not sampling."""
    L.seed_everything(0)
    m = tiny_module(detector).double().train()
    data = InstanceShapesDataModule(num_train=4, num_val=1, img_size=64, classes=list(CLASSES), batch_size=4, seed=0)
    data.setup("fit")
    batch = [data.train_set[(0, i)] for i in range(4)]

    def losses_and_grads(samples, shard):
        m.zero_grad()
        m.seed_samplers(len(samples), step=3, shard=shard)
        torch.manual_seed(shard[0])  # the global RNG differs per rank (StepSeed) and must not matter
        targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in m._train_targets(samples)]
        losses = m.model([image.double() for image in m._images(samples)], targets)
        sum(losses.values()).backward()
        return {k: v.detach() for k, v in losses.items()}, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    one, one_grads = losses_and_grads(batch, (0, 1))
    ranks = [losses_and_grads(batch[r::2], (r, 2)) for r in range(2)]
    assert len(one) >= 2
    # rtol 1e-4: the RPN's objectness loss stays in float32 (torchvision); a different sample moves a
    # loss by far more
    for k in one.keys() - {"loss_mask"}:
        torch.testing.assert_close((ranks[0][0][k] + ranks[1][0][k]) / 2, one[k], rtol=1e-4, atol=1e-6, msg=k)
    if detector != "mask_rcnn":
        for n, g in one_grads.items():
            torch.testing.assert_close((ranks[0][1][n] + ranks[1][1][n]) / 2, g, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- bad input
def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _edit(root: Path, split: str, fn) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def fresh_coco(tmp_path) -> Path:
    return make_coco(tmp_path / "coco", n_train=3, n_val=2, size=48)


def test_missing_annotation_file_and_root(fresh_coco, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        COCODetectionDataModule(str(tmp_path / "nowhere")).setup("fit")
    assert "does not exist" in _one_line(e)
    (fresh_coco / "annotations" / "instances_train2017.json").unlink()
    dm = COCODetectionDataModule(str(fresh_coco))  # categories from the val file; training needs the train file
    dm.setup("test")  # evaluation reads the validation split only
    assert len(dm.val_set) == 3 and dm.train_set is None
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("fit")
    assert "instances_train2017.json does not exist" in _one_line(e)


def test_malformed_json(fresh_coco):
    (fresh_coco / "annotations" / "instances_train2017.json").write_text('{"images": [1, 2')
    with pytest.raises(ValueError) as e:
        COCODetectionDataModule(str(fresh_coco)).setup("fit")
    assert "is not valid JSON" in _one_line(e)


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d["annotations"][0].update(image_id=999), "refers to image_id 999, which is not in 'images'"),
    (lambda d: d["annotations"][0].update(category_id=5), "unknown category_id 5; valid ids (from 'categories'): [3, 7, 11]"),
    (lambda d: d["annotations"][0].update(bbox=[40.0, 40.0, 20.0, 20.0]), "outside the image"),
    (lambda d: d["annotations"][0].update(bbox=[4.0, 4.0, 0.0, 5.0]), "non-positive size"),
    (lambda d: d["images"][0].update(file_name="gone.png"), "image 'gone.png'"),
])
def test_bad_annotations_name_file_and_fix(fresh_coco, edit, expected):
    _edit(fresh_coco, "train2017", edit)
    with pytest.raises(ValueError) as e:
        COCODetectionDataModule(str(fresh_coco)).setup("fit")
    msg = _one_line(e)
    assert expected in msg and "instances_train2017.json" in msg


def test_num_classes_smaller_than_dataset(fresh_coco, tmp_path):
    m = tiny_module(num_classes=2)
    with pytest.raises(ValueError) as e:
        _trainer(tmp_path, max_steps=1).fit(m, COCODetectionDataModule(str(fresh_coco), num_workers=0))
    assert "num_classes=2 is smaller than the 3 categories" in _one_line(e) and "num_classes: 3" in str(e.value)


def test_read_coco_accepts_boxes_within_rounding_of_border(fresh_coco):
    _edit(fresh_coco, "val2017", lambda d: d["annotations"][0].update(bbox=[-0.5, 0.0, 48.4, 10.0]))
    data = read_coco(fresh_coco / "annotations" / "instances_val2017.json", fresh_coco / "val2017")
    ds = COCOInstances(fresh_coco / "val2017", data, CAT_IDS)
    s = next(ds[i] for i in range(len(ds)) if ds.ids[i] == data["annotations"][0]["image_id"])
    assert s["boxes"][:, 0].min() >= 0 and s["boxes"][:, 2].max() <= 48  # clamped


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_two_config_coco_path_trains_and_tests(coco_root, tmp_path):
    quick = str(ROOT / "configs" / "detection" / "quickstart.yaml")
    mine = tmp_path / "my_coco.yaml"
    mine.write_text(
        "data:\n  class_path: agentlit.data.COCODetectionDataModule\n"
        f"  init_args:\n    root: {coco_root}\nmodel:\n  init_args:\n    num_classes: 3\n"
    )
    tiny = ["--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "4", "--model.min_size", "64", "--model.max_size", "64",
            "--model.backbone_kwargs", json.dumps(PVT_KW)]
    run_agentlit("fit", "--config", quick, "--config", str(mine), *tiny, "--trainer.max_epochs", "2",
                 "--trainer.check_val_every_n_epoch", "1", cwd=tmp_path)
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    cfg = (tmp_path / "runs" / "version_0" / "config.yaml").read_text()
    assert "COCODetectionDataModule" in cfg and "num_classes: 3" in cfg
    out = run_agentlit("test", "--config", quick, "--config", str(mine), *tiny, "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert "test/bbox_mAP" in out.stdout and "test/segm_mAP" in out.stdout


# ----------------------------------------------------------------------------- recipes
# The paper's mmdet COCO recipes: (lr, weight decay, decay on every parameter, drop path, milestones).
RECIPES = {
    **{f"coco_mask_rcnn_agent_pvt_{k}_1x": (2e-4, 1e-4, True, dp, [8, 11]) for k, dp in zip("tsml", (0.1, 0.2, 0.1, 0.2))},
    **{f"coco_retinanet_agent_pvt_{k}_1x": (1e-4, 1e-4, True, dp, [8, 11]) for k, dp in zip("tsml", (0.1, 0.1, 0.2, 0.3))},
    **{f"coco_mask_rcnn_agent_swin_{k}_1x": (1e-4, 0.05, False, 0.1, [8, 11]) for k in "ts"},
    **{f"coco_mask_rcnn_agent_swin_{k}_3x": (1e-4, 0.05, False, 0.1, [27, 33]) for k in "ts"},
}


def test_every_coco_recipe_is_listed():
    files = {p.stem for p in (ROOT / "configs" / "detection").glob("coco_*.yaml")}
    assert files == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_coco_recipe_matches_paper_and_builds(name, monkeypatch):
    import yaml

    monkeypatch.setattr(DetectionModule, "_metric", lambda self: torch.nn.Identity())  # metrics hold no meta state

    cfg = yaml.safe_load((ROOT / "configs" / "detection" / f"{name}.yaml").read_text())
    lr, wd, decay_all, dp, milestones = RECIPES[name]
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert (m["lr"], m["weight_decay"], m["decay_all"], m["backbone_kwargs"]["drop_path_rate"]) == (lr, wd, decay_all, dp)
    assert m["milestones"] == milestones and t["max_epochs"] == (36 if "3x" in name else 12)
    assert (m["warmup_iters"], m["warmup_ratio"], m["num_classes"], m["max_size"]) == (500, 1e-3, 80, 1333)
    assert t["devices"] * d["batch_size"] == 16 and "gradient_clip_val" not in t
    swin = "swin" in name
    assert m["backbone_kwargs"]["agent_num"] == ([[9, 9], [12, 12], [14, 14], [7, 7]] if swin else [[12, 12], [16, 16], [28, 28], [28, 28]])
    assert m["min_size"] == (list(range(480, 801, 32)) if swin else 800)
    assert d["augment"] == ("multiscale_crop" if swin else "flip") and m.get("out_norm", False) == swin
    with torch.device("meta"):
        module = DetectionModule(**m)
    assert module.model.backbone.fpn.inner_blocks[0][0].out_channels == 256


def test_predict_root_is_recursive_counts_unreadable_files_and_draws_readably(coco_root, tmp_path, capsys):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "sub" / "a.png")  # same stem in a sub-folder
    (folder / "sub" / "bad.jpg").write_bytes(b"not an image")
    dm = COCODetectionDataModule(str(tmp_path / "no coco here"), val_batch_size=2, num_workers=0,
                                 predict_root=str(folder), skip_bad_images=True)
    dm.__dict__["_categories"] = ((3, 7, 11), ("a", "b", "c"))  # the classes a checkpoint would bring
    m = tiny_module(output_dir=str(tmp_path / "pred"), detector_kwargs={"box_score_thresh": 0.0, "box_detections_per_img": 3},
                    score_threshold=0.0)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*sub/bad.jpg"):
        paths = [p for batch in _trainer(tmp_path).predict(m, dm) for p in batch]
    assert sorted(Path(p).name for p in paths) == ["a.png.png", "sub_a.png.png"]
    assert Image.open(tmp_path / "pred" / "a.png.png").size == (512, 384)  # 8x: readable labels
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"agentlit: predict read 3 images from {folder} (1 unreadable, skipped: sub/bad.jpg); wrote 2 drawings and "
        f"results.bbox.json + results.segm.json to {tmp_path / 'pred'}")
