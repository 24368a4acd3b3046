"""Text-to-image generation with Stable Diffusion, plain or with AgentSD (docs/reference.md §4).

``agentlit predict`` writes one PNG per (prompt, seed) and ``generation.json`` with prompts, seeds
and per-image times; ``agentlit test`` generates the same way and scores the images: FID against a
reference image folder (torchmetrics ``FrechetInceptionDistance``) and CLIP score where the CLIP
weights are available.

The pipeline is a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``: ``from_pretrained`` on a hub id or local
folder (the real path, e.g. SD 1.5 in fp16), or, with no path, a tiny one with random weights
built locally (:func:`agentlit.diffusion.build_tiny_pipeline`) for quickstarts and tests.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning.pytorch.utilities import rank_zero_info

from ..data.io import IMG_EXTENSIONS, image_files, load_rgb
from ..diffusion import AgentSDConfig, remove_patch
from ..diffusion.pipelines import load_pipeline, scheduler_from_config
from ..errors import UserError, check_choice
from ..predict_writers import claim_output_dir
from ..utils.paths import ensure_writable_dir
from .base import TaskModule
from .metrics import RandomConvFeatures, fid_metric

__all__ = ["GenerationModule", "RandomConvFeatures"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DType = Literal["float32", "float16", "bfloat16"]
Scheduler = Literal["ddim", "pndm", "euler"]
TinyKind = Literal["sd", "sdxl"]


class GenerationModule(TaskModule):
    """Stable Diffusion text-to-image, with AgentSD (``agentsd``) or plain (``agentsd: null``).

    Args:
        pretrained_model_name_or_path: hub id or folder of an SD 1.x/2.x or SDXL pipeline (``AutoPipelineForText2Image``;
            e.g. ``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``); None builds the tiny local pipeline.
        torch_dtype: "float32", "float16" or "bfloat16" for the pipeline weights.
        scheduler: None keeps the pipeline's own (SD 1.5: PNDM/PLMS, as in the paper); or "ddim",
            "pndm", "euler" built from its config.
        safety_checker: keep the pipeline's safety checker when it ships one.
        agentsd: AgentSD settings (:class:`agentlit.diffusion.AgentSDConfig`); None = baseline.
        num_inference_steps: denoising steps per image.
        guidance_scale: classifier-free guidance weight (1: no guidance).
        height: image height in pixels (None: the pipeline's default, 512 for SD 1.5).
        width: image width in pixels (None: the pipeline's default).
        negative_prompt: what the guidance steers away from (None: the empty prompt).
        output_dir: where PNGs and the JSON reports go.
        save_images: write PNGs in ``predict`` (``test`` only scores them).
        warmup: one short untimed generation before the first timed batch.
        tiny_seed: weight seed of the tiny pipeline.
        tiny_kind: layout of the tiny pipeline: "sd" (SD 1.x) or "sdxl" (SDXL-shaped).
        fid_reference_dir: folder of real images for FID in ``test`` (searched recursively).
        fid_feature: torchmetrics' ``feature``: 64/192/768/2048 (Inception; needs torch-fidelity and
            its weights) or a feature module such as :class:`RandomConvFeatures`.
        clip_model_name_or_path: CLIP weights for the CLIP score (e.g. ``openai/clip-vit-large-patch14``);
            None or unavailable: skipped with a warning.
        compile: ``torch.compile`` the network (``compiled_modules()``): false, true or {mode: ..., fullgraph: ...}.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        torch_dtype: DType = "float32",
        scheduler: Scheduler | None = None,
        safety_checker: bool = True,
        agentsd: AgentSDConfig | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        output_dir: str = "outputs/generation",
        save_images: bool = True,
        warmup: bool = True,
        tiny_seed: int = 0,
        tiny_kind: TinyKind = "sd",
        fid_reference_dir: str | None = None,
        fid_feature: int | nn.Module = 2048,
        clip_model_name_or_path: str | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["fid_feature"])
        check_choice("torch_dtype", torch_dtype, DType)
        check_choice("scheduler", scheduler, Scheduler | None)
        check_choice("tiny_kind", tiny_kind, TinyKind)
        if num_inference_steps < 1:
            raise UserError(f"num_inference_steps={num_inference_steps} must be >= 1")
        pipe = load_pipeline(pretrained_model_name_or_path, seed=tiny_seed, torch_dtype=_DTYPES[torch_dtype],
                             tiny_kind=tiny_kind, safety_checker=safety_checker)
        if scheduler is not None:
            pipe.scheduler = scheduler_from_config(scheduler, pipe.scheduler.config)
        if agentsd is not None:
            if isinstance(agentsd, dict):
                agentsd = AgentSDConfig(**agentsd)
            agentsd.apply(pipe)
        self.agentsd = agentsd
        self.pipe = pipe
        # registered as submodules so Lightning moves them to the run's device
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
            self.text_encoder_2 = pipe.text_encoder_2
        if getattr(pipe, "safety_checker", None) is not None:
            self.safety_checker = pipe.safety_checker
        self.fid_feature = fid_feature
        self.fid = None
        self.clip_score = None
        self._records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], seeds: list[int], output_type: str = "pil",
                 size: tuple[int, int] | None = None) -> tuple[Any, float]:
        """Generate one image per (prompt, seed); returns (images, wall seconds for the batch).

        Args:
            prompts: one prompt per image.
            seeds: one noise seed per image.
            output_type: the pipeline's ``output_type`` ("pil", "pt", "np", "latent").
            size: (H, W) of the images (None: ``height`` / ``width``, else the pipeline's default).
        """
        hp = self.hparams
        height, width = size if size is not None else (hp.height, hp.width)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]  # CPU: same noise on any device
        neg = [hp.negative_prompt] * len(prompts) if hp.negative_prompt else None
        dev = self.unet.device
        self._sync(dev)
        start = time.perf_counter()
        # AgentSD's random destinations come from a copy of the global RNG: seed it per batch so
        # images are reproducible, without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeds[0]))
            out = self.pipe(
                prompt=list(prompts), negative_prompt=neg, generator=generators,
                num_inference_steps=hp.num_inference_steps, guidance_scale=hp.guidance_scale,
                height=height, width=width, output_type=output_type,
            )
        self._sync(dev)
        return out.images, time.perf_counter() - start

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _warmup(self) -> None:
        if self.hparams.warmup:
            hp = self.hparams
            with torch.random.fork_rng(devices=[]):
                self.pipe(prompt=["warm-up"], num_inference_steps=min(2, hp.num_inference_steps),
                          guidance_scale=hp.guidance_scale, height=hp.height, width=hp.width, output_type="latent",
                          generator=torch.Generator().manual_seed(0))

    # ------------------------------------------------------------------ task protocol (agentlit profile)
    task_name = "generation"
    _EXAMPLE_PROMPTS = ("a photo of a golden retriever", "a watercolor painting of a lighthouse at dusk")

    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """A batch like :class:`agentlit.data.PromptDataModule`'s (``prompt``, ``seed``, ``index``), plus
        the image ``size`` the pipeline call makes.

        Args:
            batch_size: images in the batch.
            img_size: (H, W) of the images (None: :meth:`input_size`).
        """
        prompts = [self._EXAMPLE_PROMPTS[i % len(self._EXAMPLE_PROMPTS)] for i in range(batch_size)]
        return {"prompt": prompts, "seed": list(range(batch_size)), "index": list(range(batch_size)),
                "size": tuple(img_size or self.input_size())}

    def example_input(self, batch: dict[str, Any]) -> tuple[list[str], list[int]]:
        """(prompts, seeds) of one :meth:`generate` call.

        Args:
            batch: a batch from :meth:`example_batch`.
        """
        return batch["prompt"], batch["seed"]

    def inference_step(self, batch: dict[str, Any]) -> Tensor:
        """One full pipeline call (text encoding, denoising loop, VAE decoding) → images (B, 3, H, W).

        Args:
            batch: a batch from :meth:`example_batch` (or the prompt datamodule's).
        """
        return self.generate(batch["prompt"], batch["seed"], output_type="pt", size=batch.get("size"))[0]

    def training_loss(self, batch: Any) -> Tensor:
        """Not defined: AgentSD is training-free (``agentlit profile`` reports training as skipped).

        Args:
            batch: unused.
        """
        raise NotImplementedError(f"{type(self).__name__} has no training step (AgentSD is training-free)")

    def timed_modules(self) -> dict[str, nn.Module]:
        """The UNet, called once per denoising step (classifier-free guidance batched into the call)."""
        return {"denoising step": self.unet}

    def input_size(self) -> tuple[int, int]:
        """(``height``, ``width``), each defaulting to the pipeline's own (UNet sample size × VAE scale)."""
        default = self.unet.config.sample_size * self.pipe.vae_scale_factor
        return self.hparams.height or default, self.hparams.width or default

    def describe(self) -> dict[str, Any]:
        """Report fields: the pipeline, its call settings and the AgentSD settings."""
        hp = self.hparams
        return {
            "task": self.task_name,
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": hp.pretrained_model_name_or_path or "tiny-random (agentlit.diffusion.build_tiny_pipeline)",
            "model_kwargs": {"torch_dtype": hp.torch_dtype, "scheduler": type(self.pipe.scheduler).__name__,
                             "num_inference_steps": hp.num_inference_steps, "guidance_scale": hp.guidance_scale},
            "agentsd": None if self.agentsd is None else dict(vars(self.agentsd)),
        }

    @property
    def _run_info(self) -> dict[str, Any]:
        hp = self.hparams
        h, w = self.input_size()
        return {
            "model": hp.pretrained_model_name_or_path or "tiny-random (agentlit.diffusion.build_tiny_pipeline)",
            "torch_dtype": hp.torch_dtype,
            "scheduler": type(self.pipe.scheduler).__name__,
            "agentsd": None if self.agentsd is None else vars(self.agentsd),
            "num_inference_steps": hp.num_inference_steps,
            "guidance_scale": hp.guidance_scale,
            "height": h,
            "width": w,
            "device": str(self.unet.device),
        }

    def _report(self, name: str, extra: dict[str, Any]) -> Path:
        times = [r["time_s"] for r in self._records]
        report = {
            **self._run_info,
            **extra,
            "num_images": len(self._records),
            "mean_time_per_image_s": sum(times) / len(times) if times else None,
            "images": self._records,
        }
        out = self.output_dir
        if self.trainer is not None and self.trainer.world_size > 1:
            name = name.replace(".json", f"_rank{self.global_rank}.json")
        path = out / name
        path.write_text(json.dumps(report, indent=2))
        return path

    def _record(self, batch: dict[str, list], seconds: float, files: list[str | None]) -> list[dict[str, Any]]:
        n = len(batch["prompt"])
        recs = [
            {"index": int(i), "prompt": p, "seed": int(s), "file": f, "time_s": seconds / n, "batch_time_s": seconds}
            for i, p, s, f in zip(batch["index"], batch["prompt"], batch["seed"], files)
        ]
        self._records.extend(recs)
        return recs

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._records = []
        self._warmup()

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> list[dict[str, Any]]:
        images, seconds = self.generate(batch["prompt"], batch["seed"], output_type="pil")
        files: list[str | None] = [None] * len(images)
        if self.hparams.save_images:
            out = self.output_dir
            for k, (img, idx) in enumerate(zip(images, batch["index"])):
                name = f"{int(idx):05d}.png"
                img.save(out / name)
                files[k] = name
        return self._record(batch, seconds, files)

    def on_predict_epoch_end(self) -> None:
        from ..predict_writers import report_predictions

        path = self._report("generation.json", {})
        saved = sum(r["file"] is not None for r in self._records)
        report_predictions(self._trainer, len(self._records), "prompt/seed pairs", f"{saved} images and {path.name}",
                           self.output_dir)

    # ------------------------------------------------------------------ test (FID / CLIP score)
    def setup(self, stage: str) -> None:
        # Checked before any image is generated; an earlier run's images are never overwritten.
        self.output_dir = ensure_writable_dir(claim_output_dir(self._trainer, self.hparams.output_dir), "--model.output_dir")
        if self.output_dir != Path(self.hparams.output_dir):
            rank_zero_info(f"{self.hparams.output_dir} already holds outputs; writing to {self.output_dir}")
        if stage != "test":
            return
        if self.hparams.fid_reference_dir is not None and self.fid is None:
            self.fid = fid_metric(self.fid_feature)
        if self.hparams.clip_model_name_or_path is not None and self.clip_score is None:
            from torchmetrics.multimodal.clip_score import CLIPScore

            try:
                self.clip_score = CLIPScore(model_name_or_path=self.hparams.clip_model_name_or_path)
            except Exception as err:  # weights not cached / no network: FID still runs
                warnings.warn(f"CLIP score skipped: could not load {self.hparams.clip_model_name_or_path!r} ({err})")

    def on_test_epoch_start(self) -> None:
        self._records = []
        if self.fid is not None:
            self.fid.reset()
            info = self._run_info
            for real in _iter_reference_images(self.hparams.fid_reference_dir, (info["height"], info["width"])):
                self.fid.update(real.to(self.device), real=True)
        self._warmup()

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        images, seconds = self.generate(batch["prompt"], batch["seed"], output_type="pt")  # (B, 3, H, W) in [0, 1]
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        if self.fid is not None:
            self.fid.update(images.to(self.device), real=False)
        if self.clip_score is not None:
            self.clip_score.update(images.to(self.device), list(batch["prompt"]))
        self._record(batch, seconds, [None] * len(images))

    def on_test_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        if self.fid is not None:
            metrics["test/fid"] = float(self.fid.compute())
        if self.clip_score is not None:
            metrics["test/clip_score"] = float(self.clip_score.compute())
        times = [r["time_s"] for r in self._records]
        if times:
            metrics["test/time_per_image_s"] = sum(times) / len(times)
        for k, v in metrics.items():
            self.log(k, v, sync_dist=True)
        self._report("test_metrics.json", {"metrics": metrics, "fid_reference_dir": self.hparams.fid_reference_dir})

    def unpatch(self) -> None:
        """Remove AgentSD from the pipeline (the baseline from then on)."""
        remove_patch(self.pipe)
        self.agentsd = None


def _iter_reference_images(folder: str, size: tuple[int, int], batch: int = 16):
    """Real images from ``folder`` (recursive) as uint8 (B, 3, H, W): resized to cover (H, W), centre crop."""
    from torchvision.transforms import functional as TF

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"fid_reference_dir is not a folder: {root}")
    files = image_files(root)
    if len(files) < 2:
        raise ValueError(
            f"fid_reference_dir {root} holds {len(files)} images ({', '.join(IMG_EXTENSIONS)}); FID needs >= 2"
        )
    chunk: list[Tensor] = []
    for f in files:
        img = TF.pil_to_tensor(load_rgb(f, skippable=False))
        scale = max(size[0] / img.shape[1], size[1] / img.shape[2])
        cover = [max(size[0], round(img.shape[1] * scale)), max(size[1], round(img.shape[2] * scale))]
        img = TF.resize(img, cover, antialias=True)
        chunk.append(TF.center_crop(img, list(size)))
        if len(chunk) == batch:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)
