"""Training diffusion models with agent attention: class- or text-conditioned, from scratch or by
fine-tuning a pretrained Stable Diffusion UNet into agent attention.

The network is a diffusers ``UNet2DModel`` (class conditioning through ``num_class_embeds``) or
``UNet2DConditionModel`` (text conditioning through a frozen CLIP text encoder), built from the
YAML's ``unet`` keyword arguments, or the UNet of a pretrained pipeline (``pipeline``). Its
self-attention layers at the chosen latent resolutions get agent attention from
:mod:`agentlit.diffusion.agent_processor` (``attention: agent``) or keep softmax attention
(``attention: softmax``), so the two train side by side from one config.

Training: the DDPM noise-prediction loss (``prediction_type: epsilon``) or v-prediction, with
classifier-free-guidance dropout of the condition, an EMA of the weights, and optionally a
distillation loss towards a frozen copy of the pretrained UNet (``distill_weight``).
Sampling: DDIM, DPM-Solver++ or DDPM with classifier-free guidance, always from the EMA weights.
Evaluation: conditional accuracy (the share of samples a digits classifier that this module does not
train assigns to the class asked for) and FID against the held-out real images with a fixed feature
extractor; a sample grid goes to TensorBoard at each validation. Predict writes PNGs, a grid and
``generation.json``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sampling import default_seed, seeded_generator
from ..diffusion.pipelines import load_pipeline, scheduler_from_config
from ..errors import UserError, check_choice
from ..predict_writers import enlarge_grid, predictions_folder
from ..utils.paths import ensure_writable_dir
from ._schedule import warmup_cosine
from .base import TaskModule, pair
from .metrics import classify_digits, fid_metric, to_uint8
from .networks import DiffusionUNet, agent_attention_layers, with_agent_attention

__all__ = ["DiffusionModule", "make_grid"]

Scheduler = Literal["ddim", "dpm", "ddpm"]
PredictionType = Literal["epsilon", "v_prediction"]
Trainable = Literal["all", "attention", "agent"]
Classifier = Literal["digits_svm"]
#: the seed stream of the fixed evaluation noise (beside the training steps' (seed, step, micro-batch))
_EVAL_STREAM = 1


# ---------------------------------------------------------------------------------- the module
class DiffusionModule(TaskModule):
    """Train, evaluate and sample a diffusion model whose self-attention is agent attention.

    The network (the UNet) is ``net`` when given (a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``,
    e.g. ``class_path: agentlit.tasks.networks.DiffusionUNet``); otherwise the flat settings ``**network``
    build one with :class:`~agentlit.tasks.networks.DiffusionUNet`, or, without ``unet`` and with a
    ``pipeline``, give the pipeline's UNet agent attention.

    Args:
        pipeline: None (pixel space), "tiny" (the tiny local Stable Diffusion pipeline, random weights)
            or a hub id / folder for ``from_pretrained``: its VAE (latent space), tokenizer and text encoder
            are used frozen, and its UNet unless ``unet`` or ``net`` is given.
        pipeline_seed: weight seed of the tiny pipeline.
        img_size: training image side in pixels (used for example batches and sampling).
        num_classes: class count for class conditioning (the UNet gets one more embedding, the
            "no class" of classifier-free guidance); None for text or unconditional models.
        prompt_template: with a text-conditioned UNet and class-labelled data, each label becomes
            ``prompt_template.format(label=…)``.
        trainable: what trains: "all" weights, "attention" (the agent-attention layers, processors included)
            or "agent" (only the agent biases and DWC).
        prediction_type: "epsilon" or "v_prediction".
        num_train_timesteps: DDPM training steps (ignored with ``pipeline``, which brings its scheduler).
        beta_schedule: DDPM beta schedule (e.g. "squaredcos_cap_v2", "linear"; ignored with ``pipeline``).
        scheduler: sampling scheduler: "ddim", "dpm" (DPM-Solver++) or "ddpm".
        num_inference_steps: sampling steps.
        guidance_scale: classifier-free guidance scale (1: none).
        cfg_dropout: probability of training a sample without its condition (enables guidance).
        distill_weight: weight of the MSE to the frozen original UNet's prediction (needs ``pipeline``; 0: off).
        denoise_weight: weight of the denoising loss on the data.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay (none on biases, norms and agent biases).
        warmup_steps: linear learning-rate warm-up steps.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        ema_decay: EMA decay of the weights (None: off); sampling uses the EMA copy.
        eval_samples_per_class: samples per class generated at each validation (class-labelled data).
        classifier: "digits_svm" scores conditional accuracy with an SVM fit on scikit-learn's digits; None: off.
        fid_feature: FID features: None (:class:`~agentlit.tasks.RandomConvFeatures`, local and fixed),
            an Inception feature size (64/192/768/2048; needs torch-fidelity and its weights) or a module.
        output_dir: where ``predict`` writes PNGs, ``grid.png`` and ``generation.json`` (None: ``predictions/`` in
            the evaluation folder, e.g. ``version_N/predict/predictions``; never a folder an earlier predict wrote into).
        predict_repeats: samples per predict item (each item gives a label or prompt).
        seed: base seed of the sampling noise (sample k uses ``seed + k``).
        compile: ``torch.compile`` the network (``compiled_modules()``): false, true or {mode: ..., fullgraph: ...}.
        net: the UNet (None: built from ``**network``); with ``pipeline`` it denoises the pipeline's latents.
        **network: the default UNet's settings, :class:`~agentlit.tasks.networks.DiffusionUNet`'s arguments: ``unet``
            (keyword arguments of a new diffusers UNet: ``block_out_channels``, ``down_block_types`` …), ``unet_class``,
            ``attention`` ("agent" or "softmax"), ``agent_downsample``, ``agent_num``, ``dwc_kernel``, ``agent_init``
            ("zero": the layers start as AgentSD's training-free agent attention, for fine-tuning a pretrained UNet).
    """

    task_name = "diffusion"
    # Class-level, as the CLI reads it before building the module: the denoising loss at fixed noise
    # is logged by every configuration (conditional accuracy only by class-labelled ones).
    monitor = "val/loss"
    monitor_mode = "min"
    network_settings = ("unet", "unet_class", "pipeline", "img_size", "num_classes", "attention", "agent_downsample",
                        "agent_num", "dwc_kernel", "net")
    network_class = DiffusionUNet
    network_passed = ()

    def __init__(
        self,
        pipeline: str | None = None,
        pipeline_seed: int = 0,
        img_size: int = 16,
        num_classes: int | None = 10,
        prompt_template: str = "a handwritten digit {label}",
        trainable: Trainable = "all",
        prediction_type: PredictionType = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        scheduler: Scheduler = "ddim",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        cfg_dropout: float = 0.1,
        distill_weight: float = 0.0,
        denoise_weight: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = 0.999,
        eval_samples_per_class: int = 10,
        classifier: Classifier | None = "digits_svm",
        fid_feature: int | nn.Module | None = None,
        output_dir: str | None = None,
        predict_repeats: int = 1,
        seed: int = 0,
        compile: bool | dict[str, Any] = False,
        net: nn.Module | None = None,
        **network: Any,
    ) -> None:
        super().__init__()
        self.save_settings(drop=("fid_feature",))
        check_choice("scheduler", scheduler, Scheduler)
        check_choice("prediction_type", prediction_type, PredictionType)
        check_choice("trainable", trainable, Trainable)
        check_choice("classifier", classifier, Classifier | None)
        if distill_weight > 0 and pipeline is None:
            raise UserError("distill_weight > 0 needs a pretrained `pipeline` (its UNet is the teacher)")
        from diffusers import DDPMScheduler

        self.vae = self.text_encoder = self.tokenizer = self.teacher = None
        pipe = load_pipeline(pipeline, seed=pipeline_seed, option="--model.pipeline") if pipeline is not None else None
        if pipe is not None:
            self.vae = pipe.vae.requires_grad_(False).eval()
            self.text_encoder = pipe.text_encoder.requires_grad_(False).eval()
            self.tokenizer = pipe.tokenizer
            self.vae_scale = pipe.vae_scale_factor
            self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
        else:
            self.vae_scale = 1
            self.train_scheduler = DDPMScheduler(
                num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type,
                clip_sample=True,
            )
        given = self.take_network(net, network)
        if given is None and network.get("unet") is None:
            given = self._pipeline_unet(pipe, network)
        self.unet = given if given is not None else DiffusionUNet(**network)
        self.agent_layers = agent_attention_layers(self.unet)
        self.text_conditioned = type(self.unet).__name__ == "UNet2DConditionModel"
        if self.text_conditioned and self.text_encoder is None:
            raise UserError("a UNet2DConditionModel needs a text encoder: set `pipeline` (e.g. tiny)")
        if not self.text_conditioned and num_classes is not None:
            embeds = self.unet.config.get("num_class_embeds")
            if embeds != num_classes + 1:
                raise UserError(
                    f"num_classes={num_classes} needs unet num_class_embeds={num_classes + 1} (one more for the "
                    f"'no class' of classifier-free guidance), got {embeds}"
                )
        self._select_trainable(trainable)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval() if ema_decay is not None else None
        self.fid_feature = fid_feature
        self.fid = None
        self._val_prompts: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._images: list[tuple[Tensor, Any]] = []
        self.output_dir: Path | None = None

    # ------------------------------------------------------------------ building blocks
    def _pipeline_unet(self, pipe: Any, network: dict[str, Any]) -> nn.Module:
        """The pipeline's UNet given agent attention by the flat settings (its softmax original kept as the
        distillation teacher)."""
        if pipe is None:
            raise UserError("give `unet` (UNet keyword arguments), a `net` or a `pipeline` to fine-tune")
        if self.hparams.distill_weight > 0:
            self.teacher = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        return with_agent_attention(pipe.unet, **{k: v for k, v in network.items() if k not in ("unet", "unet_class")})

    def _select_trainable(self, trainable: str) -> None:
        if trainable == "all":
            return
        self.unet.requires_grad_(False)
        modules = dict(self.unet.named_modules())
        for name in self.agent_layers:
            layer = modules[name]
            (layer if trainable == "attention" else layer.processor).requires_grad_(True)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises (pixels, or latents with a pipeline)."""
        h, w = pair(self.hparams.img_size)
        return self.unet.config.in_channels, h // self.vae_scale, w // self.vae_scale

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """One UNet call: x (B, C, h, w), t (B,), cond labels (B,) or text states (B, L, D) → (B, C, h, w)."""
        return self._call(self.unet, x, t, cond)

    def _call(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if self.text_conditioned:
            return unet(x, t, encoder_hidden_states=cond).sample
        return unet(x, t, class_labels=cond).sample

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """CLIP hidden states (B, L, D) of the prompts."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def _prompts_for(self, labels: Tensor) -> list[str]:
        return [self.hparams.prompt_template.format(label=int(y)) for y in labels]

    def condition(self, labels: Tensor | None = None, prompts: list[str] | None = None) -> Tensor | None:
        """The UNet's condition for class labels or prompts (text models turn labels into prompts)."""
        if self.text_conditioned:
            if prompts is None:
                prompts = self._prompts_for(labels) if labels is not None else [""]
            return self.encode_prompts(prompts)
        if labels is None or self.hparams.num_classes is None:
            return None
        return labels.to(self.device)

    def null_condition(self, batch_size: int) -> Tensor | None:
        """The "no condition" of classifier-free guidance: the extra class, or the empty prompt."""
        if self.text_conditioned:
            return self.encode_prompts([""] * batch_size)
        if self.hparams.num_classes is None:
            return None
        return torch.full((batch_size,), self.hparams.num_classes, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Data images (B, C, H, W) in [-1, 1] → what the UNet denoises (latents with a VAE)."""
        if self.vae is None:
            return images
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        if self.vae is None:
            return x.clamp(-1, 1)
        return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def _unpack(self, batch: Any) -> tuple[Tensor | None, Tensor | None, list[str] | None]:
        """(images, labels, prompts) of a batch: ``(images, labels)``, or a dict with ``image`` and
        ``target`` / ``label`` / ``prompt`` (prompt-only dicts have no images)."""
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None), None
        if isinstance(batch, dict):
            labels = batch.get("target", batch.get("label"))
            prompts = batch.get("prompt", batch.get("caption"))
            return batch.get("image"), labels, (list(prompts) if prompts is not None else None)
        return batch, None, None

    # ------------------------------------------------------------------ training
    def diffusion_losses(self, batch: Any, generator: torch.Generator | None = None,
                         shard: tuple[int, int] = (0, 1)) -> dict[str, Tensor]:
        """The denoising (and distillation) losses of one batch.

        Args:
            batch: ``(images, labels)`` or a dict with ``image`` / ``target`` / ``prompt``.
            generator: CPU generator for the noise, timesteps and guidance dropout (default: the global RNG).
            shard: ``(rank, world size)``: the random draws are made for the ``world × B`` samples of the
                global batch and this rank keeps rows ``rank::world``, the samples the strided sampler gave it,
                so R processes with batch B draw what one process with batch R·B draws.
        """
        images, labels, prompts = self._unpack(batch)
        hp = self.hparams
        rank, world = shard

        def draw(fn, *args: int, per_sample: tuple[int, ...] = ()) -> Tensor:  # (B, *per_sample), this rank's rows
            return fn(*args, (B * world, *per_sample), generator=generator)[rank::world]

        if images is not None:
            x0 = self.encode_images(images.to(self.device))
            B = x0.shape[0]
        else:  # prompts only (distillation): latents drawn from the prior
            B = len(prompts)
            x0 = draw(torch.randn, per_sample=self.sample_shape).to(self.device)
        noise = draw(torch.randn, per_sample=tuple(x0.shape[1:])).to(x0)
        t = draw(torch.randint, 0, self.train_scheduler.config.num_train_timesteps).to(self.device)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        cond = self.condition(labels, prompts)
        if cond is not None and self.training and hp.cfg_dropout > 0:
            drop = draw(torch.rand).to(self.device) < hp.cfg_dropout  # (B,)
            null = self.null_condition(B)
            cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), null, cond)
        pred = self(x_t, t, cond)
        losses: dict[str, Tensor] = {}
        if hp.denoise_weight > 0 and images is not None:
            target = noise if hp.prediction_type == "epsilon" else self.train_scheduler.get_velocity(x0, noise, t)
            losses["denoise"] = F.mse_loss(pred.float(), target.float())
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self._call(self.teacher, x_t, t, cond)
            losses["distill"] = F.mse_loss(pred.float(), teacher.float())
        if not losses:
            raise UserError("nothing to train on: the batch has no images and distill_weight is 0")
        losses["loss"] = hp.denoise_weight * losses.get("denoise", 0.0) + hp.distill_weight * losses.get("distill", 0.0)
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # Noise, timesteps and dropout from (seed, step, micro-batch), drawn for the global batch: a run
        # resumed mid-epoch and a DDP run draw what the uninterrupted one-process run draws.
        trainer = self.trainer
        micro = batch_idx % max(1, trainer.accumulate_grad_batches)
        g = seeded_generator(default_seed(), self.global_step, micro)
        losses = self.diffusion_losses(batch, generator=g, shard=(trainer.global_rank, trainer.world_size))
        loss = losses["loss"]  # a non-finite loss stops training in TaskModule.on_before_backward
        images, _, prompts = self._unpack(batch)
        bs = len(images) if images is not None else len(prompts)
        for k, v in losses.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()  # here, so a checkpoint written at this step holds the update

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step; the decay warms up as in timm's ModelEmaV3 so early samples are usable."""
        if self.ema is not None:
            from ._ema import ema_update

            ema_update(self.ema, self.unet, self.global_step, self.hparams.ema_decay)

    def configure_optimizers(self):
        from .optim import create_optimizer

        hp = self.hparams
        # the package's one rule: no decay on norms, biases and the agent processors' position biases
        optimizer = create_optimizer(self.unet, hp.lr, hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        schedule = warmup_cosine(total_steps=total, warmup_steps=hp.warmup_steps, warmup_factor=0.01,
                                 min_factor=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    def make_scheduler(self, name: str | None = None):
        """A fresh sampling scheduler ("ddim", "dpm", "ddpm") sharing the training noise schedule."""
        name = name or self.hparams.scheduler
        check_choice("scheduler", name, Scheduler)
        return scheduler_from_config(name, self.train_scheduler.config)

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None = None,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Generate images (B, C, H, W) in [-1, 1] for class labels (B,) or prompts.

        Args:
            labels: class labels (class-conditioned models; text models turn them into prompts).
            prompts: prompts (text-conditioned models).
            seeds: one noise seed per sample (default ``seed + 0 … B-1``); the same seed gives the same image.
            num_inference_steps: sampling steps (default: the configured ones).
            guidance_scale: classifier-free guidance scale (default: the configured one).
            use_ema: sample with the EMA weights when the module keeps them.
        """
        hp = self.hparams
        B = len(labels) if labels is not None else len(prompts) if prompts is not None else len(seeds or [0])
        seeds = list(seeds) if seeds is not None else [hp.seed + i for i in range(B)]
        unet = self.ema if use_ema and self.ema is not None else self.unet
        guidance = hp.guidance_scale if guidance_scale is None else guidance_scale
        sched = self.make_scheduler()
        sched.set_timesteps(num_inference_steps or hp.num_inference_steps)
        # Noise drawn on the CPU from per-sample generators seeded with the sample's own seed (diffusers'
        # convention, as GenerationModule): the same image on any device and batching.
        x = torch.stack([torch.randn(self.sample_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x.to(self.device) * sched.init_noise_sigma
        cond = self.condition(labels, prompts)
        guided = guidance != 1.0 and cond is not None
        if guided:
            cond = torch.cat([self.null_condition(B), cond])
        gen = torch.Generator().manual_seed(int(seeds[0]))
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            tt = t.to(self.device).expand(inp.shape[0] * (2 if guided else 1))
            if guided:
                uncond, cnd = self._call(unet, torch.cat([inp, inp]), tt, cond).chunk(2)
                out = uncond + guidance * (cnd - uncond)
            else:
                out = self._call(unet, inp, tt, cond)
            x = sched.step(out, t, x, generator=gen).prev_sample  # DDPM's noise; DDIM (eta 0) and DPM++ draw none
        return self.decode(x)

    # ------------------------------------------------------------------ the task protocol
    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> Any:
        h, w = img_size or self.input_size()
        channels = 3 if self.vae is not None else self.unet.config.in_channels
        images = torch.rand(batch_size, channels, h, w, device=self.device) * 2 - 1
        labels = torch.randint(0, self.hparams.num_classes or 1, (batch_size,), device=self.device)
        return images, labels

    def example_input(self, batch: Any) -> tuple[Any, ...]:
        images, labels, prompts = self._unpack(batch)
        x = self.encode_images(images.to(self.device))
        t = torch.full((x.shape[0],), 500, dtype=torch.long, device=self.device)
        return x, t, self.condition(labels, prompts)

    def inference_step(self, batch: Any) -> Tensor:
        images, labels, prompts = self._unpack(batch)
        return self.sample(labels=labels, prompts=prompts)

    def training_loss(self, batch: Any) -> Tensor:
        return self.diffusion_losses(batch)["loss"]

    def timed_modules(self) -> dict[str, nn.Module]:
        # the UNet that sampling calls once per denoising step: the EMA copy when there is one
        return {"denoising step": self.ema if self.ema is not None else self.unet}

    def input_size(self) -> tuple[int, int]:
        return pair(self.hparams.img_size)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        flat = self.flat_settings()
        info.update(model=type(self.unet).__name__, model_kwargs=dict(flat["unet"] or {}),
                    attention="agent" if self.agent_layers else "softmax", agent_layers=list(self.agent_layers))
        return info

    # ------------------------------------------------------------------ validation / test
    def setup(self, stage: str) -> None:
        if stage == "predict":  # the evaluation folder's predictions/ unless output_dir is set; never an earlier one
            self.output_dir = ensure_writable_dir(predictions_folder(self._trainer, self.hparams.output_dir),
                                                  "--model.output_dir")
        if stage in ("fit", "validate", "test") and self.fid is None:
            # Kept out of the module tree: no checkpoint entries, and it stays on the CPU.
            self.__dict__["fid"] = fid_metric(self.fid_feature)

    def _eval_step(self, batch: Any, batch_idx: int, prefix: str) -> None:
        images, labels, prompts = self._unpack(batch)
        # Fixed noise and timesteps per batch: the loss is comparable from one validation to the next.
        g = seeded_generator(default_seed(), _EVAL_STREAM, batch_idx)
        losses = self.diffusion_losses(batch, generator=g)
        bs = len(images) if images is not None else len(prompts)
        for k, v in losses.items():
            self.log(f"{prefix}/{k}", v, prog_bar=k == "loss", on_epoch=True, batch_size=bs, sync_dist=True)
        if images is not None and self.fid is not None:
            self.fid.update(to_uint8(images).cpu(), real=True)
        if prompts is not None and labels is None:
            self._val_prompts.extend(prompts)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self._val_prompts = []
        if self.fid is not None:
            self.fid.reset()

    on_test_epoch_start = on_validation_epoch_start

    def _evaluate_samples(self, prefix: str) -> None:
        hp = self.hparams
        labels = prompts = None
        if hp.num_classes:
            labels = torch.arange(hp.num_classes).repeat_interleave(hp.eval_samples_per_class)  # (K·n,)
        elif self._val_prompts:
            prompts = self._val_prompts[: max(2, hp.eval_samples_per_class * 10)]
        else:
            return
        n = len(labels) if labels is not None else len(prompts)
        # Each rank samples its share; samples of a class differ only by seed.
        seeds = [hp.seed + i for i in range(n)][self.global_rank :: self.trainer.world_size]
        labels = labels[self.global_rank :: self.trainer.world_size] if labels is not None else None
        prompts = prompts[self.global_rank :: self.trainer.world_size] if prompts is not None else None
        images = torch.cat([
            self.sample(labels=None if labels is None else labels[i : i + 128],
                        prompts=None if prompts is None else prompts[i : i + 128], seeds=seeds[i : i + 128])
            for i in range(0, len(seeds), 128)
        ])
        metrics: dict[str, float] = {}
        if labels is not None and hp.classifier == "digits_svm":
            metrics[f"{prefix}/cond_acc"] = (classify_digits(images) == labels).float().mean().item()
        if self.fid is not None and self.fid.real_features_num_samples > 1 and len(images) > 1:
            self.fid.update(to_uint8(images).cpu(), real=False)
            metrics[f"{prefix}/fid"] = float(self.fid.compute())
        for k, v in metrics.items():
            self.log(k, v, prog_bar=True, sync_dist=True)
        self._log_grid(images, labels, prefix)

    def _log_grid(self, images: Tensor, labels: Tensor | None, prefix: str) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        grid = make_grid(images, labels, self.hparams.num_classes)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{prefix}/samples", grid, self.global_step)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._evaluate_samples("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate_samples("test")

    # ------------------------------------------------------------------ predict
    def on_predict_epoch_start(self) -> None:
        self._records, self._images, self._n_pred = [], [], 0

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        """One sample per item (``predict_repeats`` each) for the item's label or prompt; writes PNGs."""
        from torchvision.utils import save_image

        _, labels, prompts = self._unpack(batch)
        r = self.hparams.predict_repeats
        if labels is not None:
            labels = torch.as_tensor(labels).repeat_interleave(r)
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(r)]
        n = len(labels) if labels is not None else len(prompts)
        offset = self._n_pred * self.trainer.world_size + self.global_rank
        index = [offset + k * self.trainer.world_size for k in range(n)]  # unique across ranks
        self._n_pred += n
        seeds = [self.hparams.seed + i for i in index]
        images = self.sample(labels=labels, prompts=prompts, seeds=seeds)
        records = []
        for k in range(n):
            name = f"{index[k]:05d}.png"
            save_image(images[k] * 0.5 + 0.5, self.output_dir / name)
            rec: dict[str, Any] = {"file": name, "seed": seeds[k], "index": index[k]}
            if labels is not None:
                rec["label"] = int(labels[k])
            if prompts is not None:
                rec["prompt"] = prompts[k]
            records.append(rec)
            self._images.append((images[k].cpu(), int(labels[k]) if labels is not None else None))
        self._records.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        from torchvision.utils import make_grid as tv_grid
        from torchvision.utils import save_image

        from ..predict_writers import report_predictions

        world = self.trainer.world_size
        name = "generation.json" if world == 1 else f"generation_rank{self.global_rank}.json"
        path = self.output_dir / name
        path.write_text(json.dumps(sorted(self._records, key=lambda r: r["index"]), indent=2))
        if self._images:
            per_class = 10
            chosen: list[tuple[Tensor, Any]] = []
            counts: dict[Any, int] = {}
            for img, lab in sorted(self._images, key=lambda p: -1 if p[1] is None else p[1]):
                if counts.get(lab, 0) < per_class:
                    counts[lab] = counts.get(lab, 0) + 1
                    chosen.append((img, lab))
            imgs = torch.stack([c[0] for c in chosen])
            save_image(enlarge_grid(tv_grid(imgs * 0.5 + 0.5, nrow=per_class, padding=1)), self.output_dir / "grid.png")
        grid = ", grid.png" if self._images else ""
        report_predictions(self.trainer, len(self._records) // self.hparams.predict_repeats,
                           "labels" if self.hparams.num_classes else "prompts",
                           f"{len(self._records)} samples{grid} and {name}", self.output_dir)


def make_grid(images: Tensor, labels: Tensor | None, num_classes: int | None, per_row: int = 10) -> Tensor:
    """A (C, H, W) grid in [0, 1]: one row per class when labelled (up to ``per_row`` samples each)."""
    from torchvision.utils import make_grid as tv_grid

    if labels is not None and num_classes:
        rows = [images[labels == c][:per_row] for c in range(num_classes) if (labels == c).any()]
        images = torch.cat(rows)
    return enlarge_grid(tv_grid(images.float() * 0.5 + 0.5, nrow=per_row, padding=1).clamp(0, 1))  # ≥ 512 px
