"""The protocol every agentlit task implements, so tools (``profile``, ``export``, the CLI) never
special-case a task.

A task is a LightningModule that also says

- how to make a batch of random data shaped like its real batches (``example_batch``), and which
  part of it one inference call takes (``example_input``);
- what one inference and one training step are (``inference_step``, ``training_loss``);
- which sub-modules are called once per "step" of a multi-step inference, e.g. the UNet in a
  denoising loop (``timed_modules``), so per-step time and MACs can be reported;
- its input size, and how to rebuild itself at another one (``input_size``, ``at_input_size``);
- which networks ``compile: true`` hands to ``torch.compile`` (``compiled_modules``);
- which of its settings shape the network (``network_settings``: a checkpoint's stored value and a
  different one given by the user are a conflict, see :mod:`agentlit.stored_settings`).

Every task also shares one policy on divergence: a non-finite training loss stops training with
one line naming the step and the last good checkpoint (before the update it would cause), and
non-finite weights are never written to a checkpoint.

:class:`TaskModule` gives defaults for everything but ``example_batch``; a new task subclasses it
(or implements the same methods: :class:`Task` is a ``typing.Protocol``) and gets ``agentlit
profile`` for free.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor, nn

from ..checkpoint import check_fit
from ..errors import UserError

__all__ = ["COMPILE_KEYS", "Task", "TaskModule", "compile_options", "pair"]

#: the ``torch.compile`` arguments a task's ``compile: {...}`` may set
COMPILE_KEYS = ("mode", "fullgraph", "dynamic", "backend", "options")


def compile_options(value: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A task's ``compile`` setting as ``torch.compile`` keyword arguments, None when off.

    Args:
        value: false/None (eager), true (``torch.compile`` defaults) or a mapping of :data:`COMPILE_KEYS`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPILE_KEYS))
        if unknown:
            raise ValueError(f"compile has unknown key(s) {unknown}; valid: {list(COMPILE_KEYS)} "
                             "(e.g. compile: {mode: max-autotune})")
        return dict(value)
    raise ValueError(f"compile must be true, false or a mapping of {list(COMPILE_KEYS)}, got {value!r}")


def pair(value: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``224`` → ``(224, 224)``; ``(h, w)`` / ``[.., h, w]`` → ``(h, w)``; None stays None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return (int(value[-2]), int(value[-1])) if len(value) >= 2 else (int(value[0]), int(value[0]))
    return int(value), int(value)


_DIVERGED_HINT = ("Lower the learning rate, enable gradient clipping (--trainer.gradient_clip_val) "
                  "or use bf16 instead of fp16.")


def _as_lists(value: Any) -> Any:
    """Tuples as lists, recursively: a setting read from a config compares equal to its Python default."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _restores_whole_module(trainer: Any) -> bool:
    """Whether the trainer's strategy restores the module's own ``state_dict()`` (one process or DDP);
    sharded strategies (FSDP, DeepSpeed) check their own shards."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return trainer is not None and isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy))


@runtime_checkable
class Task(Protocol):
    """What ``agentlit profile`` / ``export`` / the CLI need from a task module."""

    task_name: str

    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> Any: ...

    def example_input(self, batch: Any) -> tuple[Any, ...]: ...

    def inference_step(self, batch: Any) -> Any: ...

    def training_loss(self, batch: Any) -> Tensor: ...

    def timed_modules(self) -> dict[str, nn.Module]: ...

    def input_size(self) -> tuple[int, int] | None: ...

    def at_input_size(self, size: tuple[int, int]) -> "Task": ...

    def describe(self) -> dict[str, Any]: ...


class TaskModule(L.LightningModule):
    """Base class of agentlit's tasks: the :class:`Task` protocol with defaults.

    Subclasses set ``task_name`` and implement :meth:`example_batch`; the rest has defaults that
    fit a module whose ``forward`` takes the batch's images.
    """

    task_name: str = "task"
    #: the metric the default checkpoint callback monitors, and its direction
    monitor: str | None = None
    monitor_mode: str = "min"
    #: the ``__init__`` settings that shape the network (classes, architecture, sizes); None: all of them
    network_settings: tuple[str, ...] | None = None
    #: builds the default network from the task's flat settings (its ``**network`` and the ones it names);
    #: see :mod:`agentlit.tasks.networks`
    network_class: type | None = None
    #: arguments of ``network_class`` the task passes itself (not flat settings)
    network_passed: tuple[str, ...] = ("num_classes",)

    # ------------------------------------------------------------------ the network
    def save_settings(self, drop: tuple[str, ...] = ()) -> None:
        """``save_hyperparameters`` for the calling ``__init__``, with the network kept as data.

        ``net`` is recorded only as the plain ``class_path`` / ``init_args`` a config gave (LightningCLI
        hands the task its config); a network object given in Python is saved with the weights, not as a
        setting (as lightning-hydra-template does), and ``drop`` names further object-typed settings that
        are never recorded.

        Args:
            drop: settings never recorded (e.g. a feature-extractor module).
        """
        frame = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.save_hyperparameters(ignore=["net", *drop], frame=frame)
        if "_instantiator" in self.hparams:  # built by LightningCLI: every setting is the config's plain value
            self.save_hyperparameters(ignore=list(drop), frame=frame)

    @classmethod
    def flat_defaults(cls) -> dict[str, Any]:
        """The flat settings of the default network (``network_class``'s arguments but those the task
        passes itself) and their defaults."""
        from .networks import network_parameters

        if cls.network_class is None:
            return {}
        return {k: p.default for k, p in network_parameters(cls.network_class).items() if k not in cls.network_passed}

    def flat_settings(self) -> dict[str, Any]:
        """The settings the default network is (or would be) built with: defaults, then what was given."""
        return {k: self.hparams.get(k, v) for k, v in self.flat_defaults().items()}

    def take_network(self, net: nn.Module | None, network: Mapping[str, Any]) -> nn.Module | None:
        """``net`` when given (checked), else None: the caller builds the default network from its flat
        settings with ``network_class``.

        Args:
            net: the network the config or caller gave.
            network: the flat settings given (the ``__init__``'s ``**network`` and the ones it names).

        Raises:
            UserError: a flat setting the default network does not take; ``net`` given together with flat
                settings; a ``net.num_classes`` other than the task's ``num_classes``.
        """
        defaults = self.flat_defaults()
        unknown = sorted(set(network) - set(defaults))
        if unknown:
            raise UserError(f"{type(self).__name__} has no argument(s) {unknown}; its default network "
                            f"({getattr(self.network_class, '__name__', 'none')}) takes {sorted(defaults)}")
        if net is None:
            return None
        given = [k for k in defaults if k in network and _as_lists(network[k]) != _as_lists(defaults[k])]
        if given:
            raise UserError(
                f"{type(self).__name__} got its network as `net` and also {', '.join(given)}, which only describe the "
                f"default network; give those as the net's init_args, or leave out `net`")
        width, classes = getattr(net, "num_classes", None), self.hparams.get("num_classes")
        if isinstance(width, int) and isinstance(classes, int) and width != classes:
            raise UserError(f"net has {width} classes but num_classes={classes}; set num_classes: {width} (the "
                            "metrics' width) or give the net that many classes")
        self._network_object = "net" not in self.hparams  # given in Python: not rebuilt from settings
        return net

    # ------------------------------------------------------------------ divergence
    def on_before_backward(self, loss: Tensor) -> None:
        """Lightning hook: stop on a non-finite loss before its gradients reach the weights."""
        if not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(
                f"non-finite training loss ({float(loss.detach().float().sum())}) at global step {self.global_step}, "
                f"epoch {self.current_epoch}; the last good checkpoint is {self._last_checkpoint()}. " + _DIVERGED_HINT)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook: refuse to write non-finite weights (a diverged run keeps its last good
        checkpoints; the new file is not written). Subclasses that override it call ``super()``."""
        state = checkpoint.get("state_dict") or self.state_dict()  # parameters and buffers (BatchNorm statistics …)
        bad = next((name for name, t in state.items()
                    if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise FloatingPointError(
                f"non-finite weights ({bad}) at global step {self.global_step}, epoch {self.current_epoch}: the checkpoint "
                f"was not written; the last good checkpoint is {self._last_checkpoint()}. " + _DIVERGED_HINT)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook, before a checkpoint's weights are restored: weights that do not fit the
        configured network are one line naming the keys (the package's one fit rule,
        :func:`agentlit.checkpoint.check_fit`). Subclasses that override it call ``super()``."""
        state, trainer = checkpoint.get("state_dict"), self._trainer
        if not isinstance(state, Mapping) or not self.strict_loading or not _restores_whole_module(trainer):
            return
        path = getattr(trainer, "ckpt_path", None) or "(restored)"
        check_fit(self.state_dict(), state, f"checkpoint {path} does not fit the configured {type(self).__name__}",
                  hint="it was written for another architecture or task — use the config it was trained with")

    # ------------------------------------------------------------------ the data's classes
    @staticmethod
    def checked_class_names(names: list[str] | None, num_classes: int) -> list[str] | None:
        """``names`` as a list when given, refused unless there is one per class.

        Args:
            names: the configured class names (None: none configured).
            num_classes: the task's class count.
        """
        if names is not None and len(names) != num_classes:
            raise UserError(f"class_names has {len(names)} names but num_classes={num_classes}")
        return list(names) if names else None

    def check_data_classes(self, exact: bool = True) -> None:
        """Refuse data whose class count does not fit the task's ``num_classes`` (one line, before any batch).

        Args:
            exact: the counts must be equal (segmentation); False: the data may have fewer (detection,
                whose datasets may leave categories unused).
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        n, mine = getattr(dm, "num_classes", None), self.hparams.get("num_classes")
        if n is None or mine is None or n == mine or (not exact and n < mine):
            return
        source = getattr(dm, "root", None) or type(dm).__name__
        relation = "does not match" if exact else "is smaller than"
        raise UserError(f"model num_classes={mine} {relation} the {n} categories of the dataset ({source}); "
                        f"set model.init_args.num_classes: {n}")

    def _last_checkpoint(self) -> str:
        trainer = self._trainer
        paths = {p for cb in (trainer.checkpoint_callbacks if trainer is not None else [])
                 for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")) if p}
        existing = [Path(p) for p in paths if Path(p).is_file()]
        return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else "none written yet"

    # ------------------------------------------------------------------ protocol
    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> Any:
        """A batch of random data with the structure and shapes of the task's real training batches,
        on the module's device.

        Args:
            batch_size: items in the batch.
            img_size: (H, W) of the images (None: :meth:`input_size`).
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not define example_batch(batch_size, img_size)")

    def example_input(self, batch: Any) -> tuple[Any, ...]:
        """The positional arguments of one ``forward`` call for ``batch`` (used to count MACs).

        Args:
            batch: a batch from :meth:`example_batch`.
        """
        if isinstance(batch, dict):
            return (batch["image"],)
        if isinstance(batch, (tuple, list)):
            return (batch[0],)
        return (batch,)

    def inference_step(self, batch: Any) -> Any:
        """One inference as ``predict`` runs it (the caller sets eval mode and no-grad).

        Args:
            batch: a batch from :meth:`example_batch`.
        """
        return self(*self.example_input(batch))

    def training_loss(self, batch: Any) -> Tensor:
        """The loss of one training step on ``batch`` (the task's own ``training_step``).

        Args:
            batch: a batch from :meth:`example_batch`.
        """
        out = self.training_step(batch, 0)
        return out["loss"] if isinstance(out, dict) else out

    def timed_modules(self) -> dict[str, nn.Module]:
        """Sub-modules called once per step of a multi-step inference (e.g. ``{"denoising step": unet}``);
        empty for single-pass tasks."""
        return {}

    def compiled_modules(self) -> dict[str, nn.Module]:
        """The networks ``compile: true`` compiles in place (``nn.Module.compile``: parameter names and
        checkpoints stay the same): ``self.model`` when the task has one, else :meth:`timed_modules`."""
        model = getattr(self, "model", None)
        return {"model": model} if isinstance(model, nn.Module) else self.timed_modules()

    def configure_model(self) -> None:
        """Lightning hook (before fit/validate/test/predict): compile :meth:`compiled_modules` when the
        task's ``compile`` hyper-parameter asks for it. Subclasses that override it call ``super()``."""
        options = compile_options(self.hparams.get("compile") if hasattr(self, "hparams") else None)
        if options is None or getattr(self, "_compiled", False):
            return
        for module in self.compiled_modules().values():
            module.compile(**options)
        self._compiled = True

    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) the module is configured for (``img_size`` hyper-parameter, else the model's
        ``pretrained_cfg`` input size), None when it takes any size."""
        size = pair(self.hparams.get("img_size")) if hasattr(self, "hparams") else None
        if size is not None:
            return size
        for m in self.modules():
            cfg = getattr(m, "pretrained_cfg", None)
            if isinstance(cfg, dict) and cfg.get("input_size"):
                return pair(cfg["input_size"])
        return None

    def at_input_size(self, size: tuple[int, int]) -> "TaskModule":
        """This task rebuilt at another input size when its config fixes one (position embeddings and
        agent biases follow); ``self`` when the size does not change anything. ``self`` is never
        modified.

        Args:
            size: the new (H, W).
        """
        takes = "img_size" in self.hparams or "img_size" in self.flat_defaults()  # its own or its network's setting
        if not takes or pair(self.hparams.get("img_size")) == tuple(size):
            return self
        return self.with_hparams(img_size=size[0] if size[0] == size[1] else list(size))

    def with_hparams(self, **changes: Any) -> "TaskModule":
        """A new instance of this task built from its hyper-parameters with ``changes`` applied
        (fresh weights; ``self`` and its ``hparams`` stay as they are).

        Args:
            changes: ``__init__`` arguments to replace.
        """
        if getattr(self, "_network_object", False) or self.hparams.get("net") is not None:
            raise UserError(f"{type(self).__qualname__} was given its network as `net`, so it is not rebuilt with other "
                            f"settings ({', '.join(changes)}); change the net's own settings instead")
        params = inspect.signature(type(self).__init__).parameters
        forwards = any(p.kind is p.VAR_KEYWORD for p in params.values())  # **kwargs handed to a parent task
        unknown = [] if forwards else sorted(set(changes) - set(params))
        if unknown:
            valid = [p for p in params if p != "self"]
            raise ValueError(f"{type(self).__qualname__} has no argument(s) {unknown}; valid: {valid}")
        hp = {k: v for k, v in {**dict(self.hparams), **changes}.items() if not k.startswith("_")}  # not _class_path …
        return type(self)(**{k: v for k, v in hp.items() if forwards or k in params})

    def describe(self) -> dict[str, Any]:
        """What a report should say the module is: ``{"task", "module", "model", "model_kwargs"}``."""
        hp = dict(self.hparams) if hasattr(self, "hparams") else {}
        return {
            "task": self.task_name,
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": hp.get("model_name") or hp.get("backbone") or type(self).__name__,
            "model_kwargs": hp.get("model_kwargs") or hp.get("backbone_kwargs") or {},
        }
