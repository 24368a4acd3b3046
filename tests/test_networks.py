"""Tasks receive their network (``net:`` with a class_path), and the flat settings build the same one.

- every quickstart has a ``configs/net/`` twin that gives the network as ``net``; both build the same
  network, weight for weight;
- a network object given in Python is used as is and not recorded as a setting;
- a checkpoint stores ``net`` as data; ``--ckpt_path`` builds a stored ``net`` only when it names one of
  agentlit's own networks, without its initial weights or download locations.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import QUICKSTART, ROOT, assert_one_line_error, run_main

from agentlit.errors import UserError
from agentlit.tasks import ClassificationModule
from agentlit.tasks.networks import NETWORKS, TimmClassifier

TINY_NET = dict(model_name="agent_deit_tiny", num_classes=3, img_size=16, drop_path_rate=0.0,
                model_kwargs=dict(patch_size=8, depth=1, embed_dim=32, num_heads=2, agent_num=4))
TINY_ARGS = ["--model.net.init_args.model_kwargs", "{patch_size: 8, depth: 1, agent_num: 4, embed_dim: 32, num_heads: 2}",
             "--model.net.init_args.img_size", "16", "--data.img_size", "16", "--trainer.enable_progress_bar", "false"]
NET_CONFIG = str(ROOT / "configs" / "net" / "classification.yaml")
TWINS = {
    "classification": (QUICKSTART, NET_CONFIG),
    "segmentation": (str(ROOT / "configs" / "segmentation" / "quickstart.yaml"), str(ROOT / "configs" / "net" / "segmentation.yaml")),
    "detection": (str(ROOT / "configs" / "detection" / "quickstart.yaml"), str(ROOT / "configs" / "net" / "detection.yaml")),
    "diffusion": (str(ROOT / "configs" / "generation" / "digits.yaml"), str(ROOT / "configs" / "net" / "diffusion.yaml")),
}


def _built(config: str, root: Path) -> torch.nn.Module:
    from agentlit.cli import cli

    return cli(["--config", config, "--trainer.default_root_dir", str(root), "--trainer.logger", "false"],
               run=False).model


@pytest.mark.parametrize("task", sorted(TWINS))
def test_net_config_builds_the_flat_configs_network(task, tmp_path):
    flat, net = (_built(c, tmp_path / str(i)) for i, c in enumerate(TWINS[task]))
    assert type(flat) is type(net) and type(flat.hparams.get("net")) is not dict
    assert net.hparams["net"]["class_path"].startswith("agentlit.tasks.networks.")  # recorded as data
    a, b = flat.state_dict(), net.state_dict()
    assert list(a) == list(b)  # the same parameter names: checkpoints of either form load into the other
    for key in a:
        assert torch.equal(a[key], b[key]), key  # and the same initial weights from the same seed


def test_a_network_object_is_used_and_not_recorded():
    torch.manual_seed(0)
    flat = ClassificationModule(**TINY_NET)
    torch.manual_seed(0)
    given = ClassificationModule(num_classes=3, net=TimmClassifier(**TINY_NET))
    assert "net" not in given.hparams and flat.hparams.get("net") is None
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(given.eval()(x), flat.eval()(x))
    with pytest.raises(UserError, match=r"got its network as `net` and also model_name, model_kwargs"):
        ClassificationModule(num_classes=3, model_name="resnet18", model_kwargs={"depth": 2}, net=TimmClassifier(**TINY_NET))
    with pytest.raises(UserError, match=r"net has 3 classes but num_classes=5; set num_classes: 3"):
        ClassificationModule(num_classes=5, net=TimmClassifier(**TINY_NET))
    with pytest.raises(UserError, match=r"was given its network as `net`, so it is not rebuilt"):
        given.with_hparams(lr=0.1)


def test_every_network_class_returns_a_network_of_the_task():
    """The classes of the allow-list are factories: what they return is the network itself."""
    net = TimmClassifier(**TINY_NET)
    assert type(net).__name__ == "AgentVisionTransformer" and not isinstance(net, TimmClassifier)
    assert {c.__name__ for c in NETWORKS} == {"TimmClassifier", "SegmentationNet", "DetectionNet", "DiffusionUNet"}


@pytest.fixture(scope="module")
def net_checkpoint(tmp_path_factory) -> Path:
    """``last.ckpt`` of a 2-step fit of the tiny classifier given as ``net``."""
    root = tmp_path_factory.mktemp("net_checkpoint")
    code, _, err = run_main("fit", "--config", NET_CONFIG, *TINY_ARGS, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                            "--trainer.default_root_dir", str(root / "runs"), cwd=root)
    assert code == 0, err[-3000:]
    return root / "runs" / "version_0" / "checkpoints" / "last.ckpt"


def _bare_config(tmp_path: Path) -> str:
    """A config naming the task and the data only: the network comes from the checkpoint."""
    path = tmp_path / "bare.yaml"
    path.write_text("model:\n  class_path: agentlit.tasks.ClassificationModule\n"
                    "data:\n  class_path: agentlit.data.DigitsDataModule\n  init_args: {img_size: 16, batch_size: 32}\n"
                    "trainer: {accelerator: cpu, devices: 1, enable_progress_bar: false}\n")
    return str(path)


def _forged(source: Path, tmp_path: Path, **net: object) -> Path:
    ckpt = torch.load(source, weights_only=True)
    ckpt["hyper_parameters"]["net"] = {**ckpt["hyper_parameters"]["net"], **net}
    out = tmp_path / "forged.ckpt"
    torch.save(ckpt, out)
    return out


def test_checkpoint_stores_net_as_data_and_builds_it_without_a_config(net_checkpoint, tmp_path):
    stored = torch.load(net_checkpoint, weights_only=True)["hyper_parameters"]["net"]
    assert stored["class_path"] == "agentlit.tasks.networks.TimmClassifier"
    assert stored["init_args"]["model_kwargs"]["embed_dim"] == 32
    for config in (NET_CONFIG, _bare_config(tmp_path)):  # the same net given, or none: the stored one is built
        args = TINY_ARGS if config == NET_CONFIG else []
        code, out, err = run_main("test", "--config", config, *args, "--ckpt_path", str(net_checkpoint),
                                  "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
                                  cwd=tmp_path)
        assert code == 0, err[-3000:]
        assert "test/acc1" in out


def test_checkpoint_naming_a_foreign_network_is_refused(net_checkpoint, tmp_path):
    forged = _forged(net_checkpoint, tmp_path, class_path="timm.models.resnet.ResNet")
    code, out, err = run_main("test", "--config", _bare_config(tmp_path), "--ckpt_path", str(forged),
                              "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(code, err, r"forged.ckpt stores net.class_path='timm.models.resnet.ResNet'; a checkpoint may "
                                     r"only name one of agentlit's networks .*it was not built, nothing was run")


def test_checkpoint_net_with_a_download_location_is_refused_and_initial_weights_dropped(net_checkpoint, tmp_path):
    args = json.loads(json.dumps(torch.load(net_checkpoint, weights_only=True)["hyper_parameters"]["net"]["init_args"]))
    forged = _forged(net_checkpoint, tmp_path, init_args={**args, "model_name": "hf-hub:someone/agent_deit_tiny"})
    code, out, err = run_main("test", "--config", _bare_config(tmp_path), "--ckpt_path", str(forged),
                              "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(code, err, r"stores net.init_args.model_name='hf-hub:someone/agent_deit_tiny', a place to "
                                     r"fetch weights from")
    forged = _forged(net_checkpoint, tmp_path, init_args={**args, "checkpoint_path": str(tmp_path / "elsewhere.pth"),
                                                         "pretrained": True})
    code, out, err = run_main("test", "--config", _bare_config(tmp_path), "--ckpt_path", str(forged),
                              "--trainer.limit_test_batches", "1",
                              "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert code == 0, err[-3000:]  # neither the missing file nor a download was attempted: the checkpoint's weights
