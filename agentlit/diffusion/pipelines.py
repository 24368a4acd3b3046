"""Where the tasks get their diffusers pipelines and schedulers: one loader for the tiny local
pipeline and ``from_pretrained`` checkpoints, one table of sampling schedulers by name."""
from __future__ import annotations

from typing import Any, Literal

import torch

from ..hub import from_pretrained

__all__ = ["SCHEDULERS", "SchedulerName", "load_pipeline", "scheduler_from_config"]

#: the sampling schedulers a task may name (each task allows the subset its ``Literal`` lists)
SchedulerName = Literal["ddim", "dpm", "ddpm", "pndm", "euler"]
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
}


def load_pipeline(name_or_path: str | None, seed: int = 0, torch_dtype: torch.dtype = torch.float32,
                  tiny_kind: str = "sd", safety_checker: bool = False,
                  option: str = "--model.pretrained_model_name_or_path") -> Any:
    """A text-to-image pipeline: the tiny local one (random weights) or a pretrained one.

    Args:
        name_or_path: None or ``"tiny"`` for :func:`~agentlit.diffusion.build_tiny_pipeline`; else a hub id
            or folder of an SD 1.x/2.x or SDXL pipeline (``AutoPipelineForText2Image.from_pretrained``).
        seed: weight seed of the tiny pipeline.
        torch_dtype: dtype of the pipeline's weights.
        tiny_kind: layout of the tiny pipeline: "sd" (SD 1.x) or "sdxl".
        safety_checker: keep the pretrained pipeline's safety checker when it ships one.
        option: the setting that named the pipeline (a hub miss names it: :func:`agentlit.hub.from_pretrained`).

    Returns:
        The pipeline, with its progress bar off.
    """
    if name_or_path is None or name_or_path == "tiny":
        from .tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=seed, torch_dtype=torch_dtype, kind=tiny_kind)
    from diffusers import AutoPipelineForText2Image  # SD 1.x/2.x or SDXL, from model_index.json

    extra = {} if safety_checker else dict(safety_checker=None, requires_safety_checker=False)
    pipe = from_pretrained(AutoPipelineForText2Image.from_pretrained, name_or_path, option, torch_dtype=torch_dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_from_config(name: SchedulerName, config: Any) -> Any:
    """A fresh diffusers sampling scheduler of kind ``name`` sharing the noise schedule of ``config``.

    Args:
        name: a key of :data:`SCHEDULERS` (the caller checks it against the choices its setting allows).
        config: another scheduler's ``config`` (betas, timesteps, prediction type …).
    """
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
