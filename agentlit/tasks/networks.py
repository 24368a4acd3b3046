"""The networks agentlit's tasks train, as classes a config names in ``net:``.

A task receives its network (the Lightning convention, and the layout users know from
lightning-hydra-template): ``net`` holds a ``class_path`` and ``init_args``, and the task owns
loss, metrics and optimisation::

    model:
      class_path: agentlit.tasks.ClassificationModule
      init_args:
        net:
          class_path: agentlit.tasks.networks.TimmClassifier
          init_args: {model_name: agent_deit_tiny, num_classes: 10, img_size: 16}
        lr: 5.0e-4

Each class below builds the network a task builds from its flat settings when no ``net`` is given
(``model_name: …`` next to ``lr: …``, which keeps working). They are factories in class form
(as jsonargparse's ``class_from_function`` makes them): calling one returns the network itself,
a timm model, a :class:`~agentlit.models.SegmentationModel`, a torchvision detector or a diffusers
UNet, so checkpoints hold the network's own parameter names whichever way it was configured.

A checkpoint's stored ``net`` is only ever built when its class is one of :data:`NETWORKS`
(:mod:`agentlit.stored_settings`); any ``nn.Module`` can be given in a config or in Python.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from ..checkpoint import load_state_dict_file
from ..diffusion.agent_processor import ATTENTION_TYPES, agent_processors, set_agent_attention
from ..diffusion.patch import AGENTSD_BROADCAST_SCALE_EXP, AGENTSD_SHORTCUT
from ..errors import UserError, check_choice
from ..models import SegmentationModel, build_backbone, create_model, load_weights

__all__ = ["DetectionNet", "DiffusionUNet", "NETWORKS", "SegmentationNet", "TimmClassifier", "agent_attention_layers",
           "network_parameters", "with_agent_attention"]

Detector = Literal["mask_rcnn", "faster_rcnn", "retinanet"]
UNetClass = Literal["UNet2DModel", "UNet2DConditionModel"]
AgentInit = Literal["default", "zero"]


class TimmClassifier(nn.Module):
    """A timm classifier by registry name (agentlit's agent models included): what
    :class:`~agentlit.tasks.ClassificationModule` trains.
    """

    def __new__(  # type: ignore[misc]
        cls,
        model_name: str = "agent_deit_tiny",
        num_classes: int = 1000,
        img_size: int | None = None,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        drop_path_rate: float = 0.1,
        model_kwargs: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Build the network (the call returns it: a factory in class form).

        Args:
            model_name: any ``timm.create_model`` name, e.g. ``agent_deit_tiny``.
            num_classes: classifier width.
            img_size: input size (None: the model's default).
            pretrained: load the model's registered pretrained weights (from the hub).
            checkpoint_path: initial weights from a local file, through the family's ``checkpoint_filter_fn``
                (other resolutions / class counts adapted; a file of another architecture is an error).
            drop_path_rate: stochastic depth.
            model_kwargs: further model arguments (``agent_num``, ``depth``, ``patch_size`` …).
        """
        kwargs = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        model = create_model(model_name, pretrained=pretrained and checkpoint_path is None, num_classes=num_classes,
                             drop_path_rate=drop_path_rate, **kwargs)
        if checkpoint_path is not None:
            load_weights(model, checkpoint_path)
        return model


def _backbone(name: str, out_indices: Sequence[int] | None, checkpoint: str | None, pretrained: bool,
              kwargs: dict[str, Any] | None, grad_checkpointing: bool) -> nn.Module:
    state_dict = load_state_dict_file(checkpoint, what="backbone checkpoint") if checkpoint else None
    return build_backbone(name, None if out_indices is None else tuple(out_indices), state_dict, pretrained,
                          grad_checkpointing=grad_checkpointing, **(kwargs or {}))


class SegmentationNet(nn.Module):
    """A timm ``features_only`` backbone + Semantic FPN or UperNet: what
    :class:`~agentlit.tasks.SegmentationModule` trains (a :class:`~agentlit.models.SegmentationModel`).
    """

    #: the model its ``**decoder`` goes to, and the arguments it gives that model itself
    forwards = (SegmentationModel, ("backbone", "num_classes"))

    def __new__(  # type: ignore[misc]
        cls,
        backbone: str = "agent_pvt_tiny",
        num_classes: int = 150,
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: tuple[int, ...] | None = None,
        pretrained: bool = False,
        backbone_checkpoint: str | None = None,
        grad_checkpointing: bool = False,
        **decoder: Any,
    ) -> nn.Module:
        """Build the network (the call returns it: a factory in class form).

        Args:
            backbone: timm model name, e.g. ``agent_pvt_tiny``, ``agent_swin_tiny``, ``resnet50``.
            num_classes: classes (ADE20K: 150).
            backbone_kwargs: extra model arguments (``img_size``, ``agent_num``, reduced depths …).
            out_indices: which feature levels to use (None: the model's default pyramid).
            pretrained: load the backbone's registered pretrained weights.
            backbone_checkpoint: classification weights for the backbone (one of ours or an official release file).
            grad_checkpointing: recompute the backbone's block activations in backward instead of storing them:
                less training memory (docs/performance.md), one more backbone forward per step; same results.
            **decoder: :class:`~agentlit.models.SegmentationModel`'s decode-head settings: ``head`` (``fpn`` /
                ``upernet``), ``head_channels``, ``neck_channels``, ``pool_scales``, ``dropout``, ``simple_pyramid``,
                ``aux``, ``aux_index``, ``aux_channels``.
        """
        body = _backbone(backbone, out_indices, backbone_checkpoint, pretrained, backbone_kwargs, grad_checkpointing)
        return SegmentationModel(body, num_classes, **decoder)


class DetectionNet(nn.Module):
    """A torchvision Mask R-CNN, Faster R-CNN or RetinaNet over a timm ``features_only`` backbone with
    the paper's mmdet settings: what :class:`~agentlit.tasks.DetectionModule` trains.
    """

    def __new__(  # type: ignore[misc]
        cls,
        backbone: str = "agent_pvt_tiny",
        num_classes: int = 80,
        detector: Detector = "mask_rcnn",
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: tuple[int, ...] | None = None,
        pretrained: bool = False,
        backbone_checkpoint: str | None = None,
        out_norm: bool = False,
        fpn_channels: int = 256,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        size_divisible: int = 32,
        anchor_sizes: list[int] | None = None,
        representation_size: int = 1024,
        mask_head_channels: int = 256,
        roi_sampling_ratio: int = 0,
        detector_kwargs: dict[str, Any] | None = None,
        grad_checkpointing: bool = False,
    ) -> nn.Module:
        """Build the network (the call returns it: a factory in class form).

        Args:
            backbone: timm model name with ``features_only`` support, e.g. ``agent_pvt_small``.
            num_classes: object classes (background is added inside; COCO: 80).
            detector: ``mask_rcnn``, ``faster_rcnn`` or ``retinanet``.
            backbone_kwargs: extra model arguments (``img_size``, dense ``agent_num`` grids, ``drop_path_rate`` …).
            out_indices: backbone stages the FPN reads (None: 0-3 for the R-CNNs, 1-3 for RetinaNet).
            pretrained: load the backbone's registered pretrained weights.
            backbone_checkpoint: classification weights for the backbone, through the family's ``checkpoint_filter_fn``.
            out_norm: a LayerNorm on every backbone output (official Swin detection backbones).
            fpn_channels: FPN width.
            min_size: short side the detector resizes images to; a list draws one per training step (multi-scale).
            max_size: cap of the long side.
            size_divisible: batches are padded to a multiple of this.
            anchor_sizes: base anchor size per FPN level (None: 32-512).
            representation_size: box head FC width (R-CNNs).
            mask_head_channels: mask head conv width (Mask R-CNN).
            roi_sampling_ratio: RoIAlign sampling points per bin side (0: adaptive, as mmdet).
            detector_kwargs: further torchvision detector arguments (``rpn_post_nms_top_n_train`` …).
            grad_checkpointing: recompute the backbone's block activations in backward instead of storing them:
                less training memory (docs/performance.md), one more backbone forward per step; same results.
        """
        from ..models.detection import DetectionBackbone, build_detector, default_out_indices

        check_choice("detector", detector, Detector)
        indices = tuple(out_indices) if out_indices is not None else default_out_indices(detector)
        body = _backbone(backbone, indices, backbone_checkpoint, pretrained, backbone_kwargs, grad_checkpointing)
        cfg = getattr(body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        adapter = DetectionBackbone(body, fpn_channels, "p6p7" if detector == "retinanet" else "pool", out_norm)
        return build_detector(
            detector, adapter, num_classes, mean, std, min_size=min_size, max_size=max_size,
            size_divisible=size_divisible, anchor_sizes=anchor_sizes, representation_size=representation_size,
            mask_head_channels=mask_head_channels, roi_sampling_ratio=roi_sampling_ratio, **(detector_kwargs or {}),
        )


def with_agent_attention(unet: nn.Module, attention: str = "agent", agent_downsample: Sequence[int] | None = None,
                         agent_num: int = 16, dwc_kernel: int = 3, agent_init: AgentInit = "default") -> nn.Module:
    """``unet`` with agent attention at the chosen resolutions, in place (see
    :func:`agentlit.diffusion.set_agent_attention`).

    Args:
        unet: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.
        attention: "agent" or "softmax" self-attention.
        agent_downsample: latent downsampling factors (1 = full resolution) whose self-attention uses agents.
        agent_num: agents per agent-attention layer (square count).
        dwc_kernel: depthwise conv kernel on V (0: none).
        agent_init: "default" (training from scratch) or "zero" (zero biases and DWC, AgentSD's sharper
            broadcast softmax and V shortcut: the layer starts as training-free agent attention).
    """
    check_choice("attention", attention, ATTENTION_TYPES)
    check_choice("agent_init", agent_init, AgentInit)
    zero = agent_init == "zero"
    set_agent_attention(unet, attention, agent_downsample or [1], agent_num=agent_num, dwc_kernel=dwc_kernel,
                        zero_init=zero, broadcast_scale_exp=AGENTSD_BROADCAST_SCALE_EXP if zero else 1.0,
                        shortcut=AGENTSD_SHORTCUT if zero else 0.0)
    return unet


def agent_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the attention modules of ``unet`` that run agent attention.

    Args:
        unet: a diffusers UNet.
    """
    return [name.rpartition(".")[0] for name in agent_processors(unet)]


class DiffusionUNet(nn.Module):
    """A new diffusers UNet whose self-attention is agent attention: what
    :class:`~agentlit.tasks.DiffusionModule` trains from scratch.
    """

    def __new__(  # type: ignore[misc]
        cls,
        unet_class: UNetClass = "UNet2DModel",
        unet: dict[str, Any] | None = None,
        attention: str = "agent",
        agent_downsample: list[int] | None = None,
        agent_num: int = 16,
        dwc_kernel: int = 3,
        agent_init: AgentInit = "default",
    ) -> nn.Module:
        """Build the network (the call returns it: a factory in class form).

        Args:
            unet_class: "UNet2DModel" (pixels or latents, class conditioning) or "UNet2DConditionModel" (text).
            unet: the UNet's keyword arguments (``block_out_channels``, ``down_block_types``, ``num_class_embeds`` …).
            attention: "agent" or "softmax" self-attention.
            agent_downsample: latent downsampling factors (1 = full resolution) whose self-attention uses agents.
            agent_num: agents per agent-attention layer (square count).
            dwc_kernel: depthwise conv kernel on V (0: none).
            agent_init: "default" or "zero" (see :func:`with_agent_attention`).
        """
        import diffusers

        check_choice("unet_class", unet_class, UNetClass)
        try:
            net = getattr(diffusers, unet_class)(**(unet or {}))
        except TypeError as err:
            raise UserError(f"unet: {err}; see diffusers' {unet_class} for the valid keyword arguments") from None
        return with_agent_attention(net, attention, agent_downsample, agent_num, dwc_kernel, agent_init)


def network_parameters(network_class: type) -> dict[str, inspect.Parameter]:
    """The settings a network class takes: its own arguments and, through its ``**kwargs``, those of
    the model it hands them to (``forwards``), minus the ones it gives that model itself.

    Args:
        network_class: one of :data:`NETWORKS` (or any class).
    """
    own = inspect.signature(network_class).parameters.values()
    params = {p.name: p for p in own if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    target, passed = getattr(network_class, "forwards", (None, ()))
    if target is not None and any(p.kind is p.VAR_KEYWORD for p in own):
        for p in inspect.signature(target).parameters.values():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in passed:
                params.setdefault(p.name, p)
    return params


#: the network classes a checkpoint's stored ``net`` may name (anything else is refused there)
NETWORKS = (TimmClassifier, SegmentationNet, DetectionNet, DiffusionUNet)
