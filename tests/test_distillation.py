"""DistillationModule: the converted student learns from the frozen softmax teacher, labels optional."""
from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from agentlit.core import AgentAttention
from agentlit.tasks import DistillationModule

TEACHER = dict(model_name="deit_tiny_patch16_224", num_classes=4, img_size=16, drop_path_rate=0.0,
               model_kwargs=dict(patch_size=4, depth=2, embed_dim=32, num_heads=2))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A softmax teacher's weights, saved the way timm / the official releases save them."""
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_patch16_224", num_classes=4, img_size=16, **TEACHER["model_kwargs"])
    with torch.no_grad():  # peaked attention and confident logits, as in a trained model
        for blk in net.blocks:
            blk.attn.qkv.weight.mul_(6)
        net.head.weight.normal_(0, 1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": net.state_dict()}, path)
    return path, net.eval()


def _module(path, **kw):
    return DistillationModule(agent_num=4, checkpoint_path=str(path), lr=5e-4, warmup_epochs=0, **{**TEACHER, **kw})


def test_student_is_the_converted_teacher_and_the_teacher_stays_frozen(teacher_file):
    path, net = teacher_file
    task = _module(path)
    assert list(task.conversion.converted) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(b.attn, AgentAttention) for b in task.model.blocks)
    assert all(type(b.attn).__name__ == "Attention" for b in task.teacher.blocks)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(task.teacher(x), net(x))  # the teacher is the loaded softmax model
    task.train()
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    opt = task.configure_optimizers  # the classification task's optimiser: student parameters only
    assert opt.__func__ is DistillationModule.__mro__[1].configure_optimizers
    # the student starts from the teacher's weights: same projections, zero agent extras
    s, t = task.model.state_dict(), task.teacher.state_dict()
    assert all(torch.equal(s[k], v) for k, v in t.items())
    assert all((s[k] == 0).all() for k in set(s) - set(t))
    rebuilt = task.with_hparams(agent_num=1)  # **kwargs reach the classification arguments
    assert rebuilt.model.blocks[0].attn.agent_num == 1 and rebuilt.hparams.model_name == TEACHER["model_name"]


def _fit(task, batches, epochs, tmp_path):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(batches, batch_size=8), DataLoader(batches, batch_size=8))
    return trainer


@pytest.mark.parametrize("labelled", [False, True], ids=["images-only", "labelled"])
def test_distillation_brings_the_student_to_the_teacher(teacher_file, tmp_path, labelled):
    path, net = teacher_file
    torch.manual_seed(1)
    x = torch.randn(32, 3, 16, 16)
    data = TensorDataset(x, net(x).argmax(-1).detach()) if labelled else TensorDataset(x)
    task = _module(path, feature_weight=0.5 if labelled else 0.0, label_weight=0.3 if labelled else 0.0)

    def gap():
        with torch.no_grad():
            return torch.nn.functional.kl_div(task.model(x).log_softmax(-1), net(x).log_softmax(-1),
                                              log_target=True, reduction="batchmean").item()

    before = gap()
    trainer = _fit(task, data, 8, tmp_path)
    after = gap()
    assert after < (0.8 if labelled else 0.5) * before, (before, after)  # labels pull a little elsewhere
    logged = trainer.callback_metrics
    assert "val/agree" in logged and "train/kd" in logged
    assert ("val/teacher_acc1" in logged) == labelled and ("train/feature" in logged) == labelled
    if labelled:
        assert logged["val/teacher_acc1"] == 1.0  # labels are the teacher's own predictions


def test_bad_settings_are_named(teacher_file):
    path, _ = teacher_file
    with pytest.raises(ValueError, match="temperature=0"):
        _module(path, temperature=0)
    with pytest.raises(ValueError, match="label_weight=2"):
        _module(path, label_weight=2)
    task = _module(path, label_weight=0.5)
    with pytest.raises(ValueError, match="needs labelled batches"):
        task.training_step((torch.randn(2, 3, 16, 16),), 0)
