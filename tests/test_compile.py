"""``compile`` for every task: TaskModule.configure_model compiles compiled_modules() in place."""
import inspect

import pytest
import torch

import agentlit.tasks as tasks
from agentlit.tasks import ClassificationModule
from agentlit.tasks.base import TaskModule, compile_options


def _tiny(**kw):
    return ClassificationModule(model_name="agent_deit_tiny", num_classes=3, img_size=16, model_kwargs=dict(
        patch_size=4, depth=1, embed_dim=32, num_heads=2, agent_num=4), **kw)


def test_compile_options():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"mode": "max-autotune", "fullgraph": True}) == {"mode": "max-autotune", "fullgraph": True}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mdoe'\]; valid: \['mode'"):
        compile_options({"mdoe": "x"})
    with pytest.raises(ValueError, match="compile must be true, false or a mapping"):
        compile_options("yes")


def test_compile_true_compiles_the_network_in_place_with_the_same_outputs():
    torch.manual_seed(0)
    eager = _tiny().eval()
    torch.manual_seed(0)
    task = _tiny(compile={"backend": "eager", "fullgraph": True}).eval()
    keys = list(task.state_dict())
    assert task.compiled_modules() == {"model": task.model}
    assert task.model._compiled_call_impl is None
    task.configure_model()
    task.configure_model()  # Lightning may call it again: compiled once
    assert task.model._compiled_call_impl is not None
    assert list(task.state_dict()) == keys  # checkpoints keep their parameter names
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), eager.model(x))
    eager.configure_model()  # compile false: nothing happens
    assert eager.model._compiled_call_impl is None


#: every task agentlit ships; each must be exported by agentlit.tasks (none may go missing unnoticed)
TASKS = ["ClassificationModule", "DetectionModule", "DiffusionModule", "GenerationModule", "SegmentationModule"]
EXPORTED = sorted(n for n in tasks.__all__ if isinstance(getattr(tasks, n), type) and issubclass(getattr(tasks, n), TaskModule))


def test_the_task_list_is_exported():
    assert set(TASKS) <= set(EXPORTED), sorted(set(TASKS) - set(EXPORTED))


@pytest.mark.parametrize("name", sorted(set(TASKS) | set(EXPORTED)))
def test_every_task_takes_compile(name):
    cls = getattr(tasks, name)
    params = inspect.signature(cls.__init__).parameters
    if "compile" not in params:  # a task that forwards **kwargs to its parent task takes the parent's
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), f"{name} takes no compile argument"
        params = inspect.signature(cls.__mro__[1].__init__).parameters
    assert params["compile"].default is False
