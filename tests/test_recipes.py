"""The ImageNet / ADE20K configs train with the release's recipes (table: tests/data/recipes.yaml).

Each config is read as YAML and compared field by field with the table, so an edit that drifts from
the release fails here; the schedule test builds the optimizer and LR scheduler the way Lightning does
(``configure_optimizers`` with the trainer's numbers) and compares the lr of every step with the
release's scheduler (timm's ``CosineLRScheduler`` stepped per iteration) and with its formula.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from agentlit.tasks import ClassificationModule

ROOT = Path(__file__).resolve().parents[1]
TABLE = yaml.safe_load((Path(__file__).parent / "data" / "recipes.yaml").read_text())
CLS, SEG = TABLE["classification"], TABLE["segmentation"]
# A tiny network in place of the full-size model: the optimizer and schedule do not depend on it.
TINY_MODEL = dict(model_name="agent_deit_tiny", img_size=32, model_kwargs=dict(patch_size=8, depth=1, agent_num=4))


def load(kind: str, name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / kind / f"{name}.yaml").read_text())


def test_every_recipe_config_is_in_the_table():
    for kind, table in (("classification", CLS), ("segmentation", SEG)):
        files = {p.stem for p in (ROOT / "configs" / kind).glob("*.yaml") if p.stem != "quickstart"}
        assert files == set(table), f"configs/{kind}: not in tests/data/recipes.yaml: {files - set(table)}; " \
                                    f"in the table without a config: {set(table) - files}"


@pytest.mark.parametrize("name", sorted(CLS))
def test_classification_config_matches_release(name):
    r, cfg = CLS[name], load("classification", name)
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    # the table is self-consistent: global batch, peak lrs and total epochs follow from its inputs
    assert r["global_batch"] == r["gpus"] * r["batch_per_gpu"]
    scale = r["global_batch"] / r["lr_reference_batch"]
    for key in ("lr", "warmup_lr", "min_lr"):
        assert r[f"peak_{key}"] == pytest.approx(r[key] * scale), key
    assert r["max_epochs"] == r["epochs"] + r["cooldown_epochs"]
    assert r["lr_reference_batch"] == 512  # the release states lr per 512 images
    # the config reproduces it
    got = {
        "gpus": trainer["devices"] * trainer.get("num_nodes", 1),
        "batch_per_gpu": data["batch_size"],
        "max_epochs": trainer["max_epochs"],
        "grad_clip": trainer.get("gradient_clip_val"),
        "lr": model["lr"],
        "lr_reference_batch": model["lr_reference_batch"],
        "warmup_epochs": model["warmup_epochs"],
        "warmup_lr": model["warmup_lr"],
        "min_lr": model["min_lr"],
        "cooldown_epochs": model.get("cooldown_epochs", 0),
        "weight_decay": model["weight_decay"],
        "drop_path": model["drop_path_rate"],
        "ema_decay": model.get("ema_decay"),
    }
    want = {k: r[k] for k in got}
    assert got == want
    assert trainer.get("accumulate_grad_batches", 1) == 1  # the global batch above is GPUs x batch per GPU


def _built_schedule(cfg: dict, steps_per_epoch: int):
    """Optimizer + scheduler from ``configure_optimizers`` with the config's init_args and trainer numbers."""
    init = {**cfg["model"]["init_args"], **TINY_MODEL}
    module = ClassificationModule(**init)
    t = cfg["trainer"]
    module.trainer = SimpleNamespace(  # what configure_optimizers reads from Lightning's Trainer
        estimated_stepping_batches=steps_per_epoch * t["max_epochs"], max_epochs=t["max_epochs"],
        datamodule=SimpleNamespace(batch_size=cfg["data"]["init_args"]["batch_size"]),
        world_size=t["devices"] * t.get("num_nodes", 1), accumulate_grad_batches=1,
    )
    out = module.configure_optimizers()
    assert out["lr_scheduler"]["interval"] == "step"  # the release steps its scheduler every iteration
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize("name", sorted(CLS))
def test_module_scales_lr_warmup_lr_and_min_lr_with_the_global_batch(name):
    r = CLS[name]
    optimizer, scheduler = _built_schedule(load("classification", name), steps_per_epoch=4)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(r["peak_warmup_lr"], rel=1e-9)  # step 0: warm-up lr, scaled
    base = scheduler.base_lrs[0]
    assert base == pytest.approx(r["peak_lr"], rel=1e-9)
    end_of_cosine = 4 * r["epochs"]  # min lr from here on (through the cool-down, if any)
    assert scheduler.lr_lambdas[0](end_of_cosine) * base == pytest.approx(r["peak_min_lr"], rel=1e-9)


def release_lr(t: int, *, base: float, warmup_lr: float, min_lr: float, warmup_t: int, t_initial: int) -> float:
    """The release's per-iteration lr (timm CosineLRScheduler, warmup_prefix False, cycle_limit 1), written out."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    if t >= t_initial:  # the cool-down: the cosine has ended, min lr until training stops
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / t_initial))


def test_agent_pvt_small_schedule_matches_the_release():
    from timm.scheduler import CosineLRScheduler

    name, steps_per_epoch = "agent_pvt_small_imagenet", 10
    r, cfg = CLS[name], load("classification", name)
    optimizer, scheduler = _built_schedule(cfg, steps_per_epoch)
    total = steps_per_epoch * cfg["trainer"]["max_epochs"]
    ours = []
    for _ in range(total):  # the lr each optimizer step uses, as Lightning steps the scheduler
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    # The release: lr, warm-up lr and min lr scaled by global batch / 512; num_steps = epochs x iterations,
    # warm-up steps = warmup_epochs x iterations; it trains epochs + cooldown_epochs.
    g = r["global_batch"] / 512
    spec = dict(base=r["lr"] * g, warmup_lr=r["warmup_lr"] * g, min_lr=r["min_lr"] * g,
                warmup_t=int(r["warmup_epochs"] * steps_per_epoch), t_initial=int(r["epochs"] * steps_per_epoch))
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec["base"])
    timm_sched = CosineLRScheduler(dummy, t_initial=spec["t_initial"], lr_min=spec["min_lr"],
                                   warmup_lr_init=spec["warmup_lr"], warmup_t=spec["warmup_t"], cycle_limit=1,
                                   t_in_epochs=False)
    formula = [release_lr(t, **spec) for t in range(total)]
    timm_lrs = [timm_sched._get_lr(t)[0] for t in range(total)]
    torch.testing.assert_close(torch.tensor(formula, dtype=torch.float64), torch.tensor(timm_lrs, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(formula, dtype=torch.float64),
                               rtol=1e-9, atol=0)

    w, T = spec["warmup_t"], spec["t_initial"]
    checkpoints = {
        "start": (0, spec["warmup_lr"]),
        "last warm-up step": (w - 1, spec["warmup_lr"] + (w - 1) * (spec["base"] - spec["warmup_lr"]) / w),
        "peak (first cosine step)": (w, spec["min_lr"] + 0.5 * (spec["base"] - spec["min_lr"]) * (1 + math.cos(math.pi * w / T))),
        "mid cosine": (T // 2, spec["min_lr"] + 0.5 * (spec["base"] - spec["min_lr"])),
        "end of cosine": (T - 1, spec["min_lr"] + 0.5 * (spec["base"] - spec["min_lr"]) * (1 + math.cos(math.pi * (T - 1) / T))),
        "cool-down start": (T, spec["min_lr"]),
        "cool-down end": (total - 1, spec["min_lr"]),
    }
    for what, (step, lr) in checkpoints.items():
        print(f"{name} step {step:5d} ({what}): lr {ours[step]:.6e}, release {lr:.6e}")
        assert ours[step] == pytest.approx(lr, rel=1e-9), what
    assert max(ours) == pytest.approx(spec["base"], rel=1e-3) and max(ours) <= spec["base"]
    assert T == steps_per_epoch * (cfg["trainer"]["max_epochs"] - cfg["model"]["init_args"]["cooldown_epochs"])


def test_cooldown_needs_room_in_max_epochs():
    cfg = load("classification", "agent_pvt_small_imagenet")
    cfg["trainer"]["max_epochs"] = 10  # = cooldown_epochs: no cosine left
    with pytest.raises(ValueError, match=r"cooldown_epochs=10 .*max_epochs"):
        _built_schedule(cfg, steps_per_epoch=2)


@pytest.mark.parametrize("name", sorted(SEG))
def test_segmentation_config_matches_release(name):
    r, cfg = SEG[name], load("segmentation", name)
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert r["global_batch"] == r["gpus"] * r["batch_per_gpu"] == 16
    got = {
        "backbone": model["backbone"],
        "head": model["head"],
        "max_iters": model["max_iters"],
        "lr": model["lr"],
        "weight_decay": model["weight_decay"],
        "warmup_iters": model["warmup_iters"],
        "power": model["power"],
        "min_lr": model["min_lr"],
        "drop_path": model["backbone_kwargs"]["drop_path_rate"],
        "batch_per_gpu": data["batch_size"],
        "gpus": trainer["devices"] * trainer.get("num_nodes", 1),
        "crop_size": data["crop_size"],
        "agent_grids": model["backbone_kwargs"]["agent_num"],
    }
    assert got == {k: r[k] for k in got}
    assert trainer["max_steps"] == r["max_iters"]
    if r["betas"] is not None:
        assert list(model["betas"]) == r["betas"]
    if r["warmup_ratio"] is not None:
        assert model["warmup_ratio"] == r["warmup_ratio"]


def test_lightning_trainer_builds_the_release_schedule(tmp_path):
    """A real Trainer.fit (tiny model, 4 steps per epoch, 3 cosine + 2 cool-down epochs): the lr of every
    optimizer step equals the release's formula with lr, warm-up lr and min lr scaled by batch / 512."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Data(L.LightningDataModule):
        batch_size = 8

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            ds = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
            return DataLoader(ds, batch_size=self.batch_size)

    lrs: list[float] = []

    class Record(L.Callback):  # the lr each optimizer step uses (before that step's scheduler update)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = ClassificationModule(**TINY_MODEL, num_classes=10, lr=5e-4, lr_reference_batch=512, warmup_epochs=1,
                                  warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=2, mixup_alpha=0.0, cutmix_alpha=0.0)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=Data())
    g = 8 / 512
    spec = dict(base=5e-4 * g, warmup_lr=1e-6 * g, min_lr=1e-5 * g, warmup_t=4, t_initial=3 * 4)
    assert len(lrs) == 20
    assert lrs == pytest.approx([release_lr(t, **spec) for t in range(20)], rel=1e-9)
    assert lrs[-8:] == pytest.approx([spec["min_lr"]] * 8, rel=1e-9)  # the two cool-down epochs
