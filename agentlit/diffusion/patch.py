"""AgentSD for diffusers: agent attention + token merging in Stable Diffusion's self-attention.

Training-free (docs/reference.md §4). What is patched, all removable:

* every ``BasicTransformerBlock``'s self-attention ``attn1`` gets an :class:`AgentSDAttnProcessor`
  through diffusers' own processor mechanism (``Attention.set_processor``); the original processor
  object is kept and put back by :func:`remove_patch`;
* a forward pre-hook on each such block computes the token matching from the block input (the
  metric ToMe for SD uses) and hands it to the processor; a post-hook drops it;
* a forward pre-hook on the UNet records the latent size (to tell a block's downsampling) and
  the denoising step (for the schedule).

Cross-attention ``attn2`` and the MLP run untouched on all N tokens by default, as in the reference
patch; ``merge_crossattn`` / ``merge_mlp`` (tomesd's options, off by default there too) merge their
inputs with the same matching: ``attn2`` through a processor like ``attn1``'s, the MLP through
forward hooks on the block's ``ff``. Inside ``attn1``:

    y (B, N, C) --merge--> y_m (B, N - r, C), agent tokens y_a (B, n, C)
    Q, K, V = to_q(y_m), to_k(y_m), to_v(y_m);   A = to_q(y_a)
    O = agent_attention_tokens(Q, K, V, agents=A, scale=s, broadcast_scale=s ** k_scale2, shortcut=k_shortcut)
    out = unmerge(to_out(O))                                          # (B, N, C)

with agents only while 2·n < N - r; otherwise plain softmax attention on the merged tokens.

Which blocks: those whose latent is downsampled at most ``max_downsample`` times; by default
(None) the finest resolution that has transformer blocks at all: the full latent in SD 1.x/2.x,
the 2x-downsampled level in SDXL (which has no attention at full resolution). ``share_matching``
computes the matching once per resolution per UNet call (from the first block there) instead of
once per block: cheaper, slightly different outputs.

Schedule: the first ``agent_steps`` denoising steps use (sx, sy, agent_ratio); later steps use
(late_sx, late_sy, late_agent_ratio), by default ToMe only. The step is the pipeline's own: the
UNet hook counts distinct timesteps of one generation (a repeated timestep, e.g. PNDM's first
step or guidance run as two calls, is the same step; a rising timestep starts a new generation).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import agent_attention_tokens
from .agent_processor import head_norm
from .merge import TokenMatching, bipartite_soft_matching_random2d

__all__ = [
    "AGENTSD_BROADCAST_SCALE_EXP", "AGENTSD_SHORTCUT", "AgentSDAttnProcessor", "AgentSDConfig", "AgentSDState",
    "apply_patch", "get_state", "remove_patch",
]

_STATE_ATTR = "_agentsd_state"

#: AgentSD's training-free agent attention: the broadcast softmax uses ``scale ** 0.3`` (sharper than
#: the agent softmax) and a fixed ``0.075 · V`` shortcut stands in for the DWC term
AGENTSD_BROADCAST_SCALE_EXP = 0.3
AGENTSD_SHORTCUT = 0.075


@dataclasses.dataclass(frozen=True)
class AgentSDConfig:
    """The AgentSD settings, validated on construction; the defaults are the paper's schedule.

    ``apply_patch(pipe, config)`` and ``apply_patch(pipe, **fields)`` both build one of these; the
    patch state keeps it (``get_state(pipe).config``).

    Args:
        ratio: fraction of tokens merged away for attention (r = ⌊N·ratio⌋).
        agent_ratio: fraction merged away to make the agents (n = N - ⌊N·agent_ratio⌋, at least one per sx×sy cell).
        sx: cell width for the destination tokens.
        sy: cell height for the destination tokens.
        max_downsample: patch blocks whose latent is downsampled at most this much (None: the finest level that has self-attention; 1: full resolution only, as in the paper).
        use_rand: random destination per cell (off automatically for odd batches).
        k_scale2: the broadcast softmax uses scale ** k_scale2 (sharper than scale).
        k_shortcut: weight of the V shortcut added to the agent-attention output.
        attn_precision: "fp32" to run the attention similarities in fp32 under fp16 (None: the model dtype).
        agent_steps: number of first denoising steps using agents; later steps use the late_* settings.
        late_sx: cell width from step ``agent_steps`` on.
        late_sy: cell height from step ``agent_steps`` on.
        late_agent_ratio: agent_ratio from step ``agent_steps`` on (the defaults give plain ToMe: 2·n >= N - r, so no agents).
        merge_attn: merge the self-attention's tokens (False: attn1 sees all N tokens; agents still apply).
        merge_crossattn: also merge the cross-attention's query tokens with the same matching (tomesd's option; off).
        merge_mlp: also merge the MLP's tokens with the same matching (tomesd's option; off).
        share_matching: one matching per resolution per UNet call, shared by its blocks (faster; changes outputs).
    """

    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    max_downsample: int | None = None
    use_rand: bool = True
    k_scale2: float = AGENTSD_BROADCAST_SCALE_EXP
    k_shortcut: float = AGENTSD_SHORTCUT
    attn_precision: str | None = None
    agent_steps: int = 20
    late_sx: int = 2
    late_sy: int = 2
    late_agent_ratio: float = 0.5
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    share_matching: bool = False

    def __post_init__(self) -> None:
        for key in ("ratio", "agent_ratio", "late_agent_ratio"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value}")
        for key in ("sx", "sy", "late_sx", "late_sy", "max_downsample"):
            value = getattr(self, key)
            if key == "max_downsample" and value is None:
                continue  # the finest level with self-attention
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp", "share_matching"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.agent_steps < 0:
            raise ValueError(f"agent_steps must be >= 0, got {self.agent_steps}")
        if self.attn_precision not in (None, "fp32"):
            raise ValueError(f"attn_precision must be None or 'fp32', got {self.attn_precision!r}")

    @classmethod
    def build(cls, config: "AgentSDConfig | Mapping[str, Any] | None" = None, **overrides: Any) -> "AgentSDConfig":
        """A config from another config, a mapping (e.g. a YAML block) or nothing, with ``overrides`` on top.

        Args:
            config: the starting settings (None: the defaults).
            **overrides: fields to change; an unknown name is an error listing the valid ones.
        """
        if isinstance(config, cls) and not overrides:
            return config  # frozen: sharing it is safe
        if config is None:
            base: dict[str, Any] = {}
        elif isinstance(config, cls):
            base = dataclasses.asdict(config)
        elif isinstance(config, Mapping):
            base = dict(config)
        else:
            raise TypeError(f"AgentSD settings must be an AgentSDConfig or a mapping, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - fields | set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown AgentSD setting(s) {unknown}; valid: {sorted(fields)}")
        return cls(**{**base, **overrides})

    def apply(self, pipe_or_unet: Any) -> Any:
        """``apply_patch(pipe_or_unet, self)``.

        Args:
            pipe_or_unet: a pipeline with ``.unet`` or the UNet itself.
        """
        return apply_patch(pipe_or_unet, self)


class AgentSDState:
    """Settings and run-time state shared by all patched blocks of one UNet."""

    def __init__(self, config: AgentSDConfig) -> None:
        self.config = config
        self.size: tuple[int, int] | None = None  # latent (H, W) of the current UNet call
        self.step = -1  # denoising step of the current generation
        self.last_timestep: float | None = None
        self.generator: torch.Generator | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.processors: dict[str, tuple[nn.Module, Any, Any]] = {}  # name -> (attn, original, ours)
        self.level: int | None = None  # downsample of the first patched block of this UNet call
        self.shared: dict[tuple, TokenMatching | None] = {}  # share_matching: per (N, phase) this call

    def new_call(self, size: tuple[int, int]) -> None:
        """Start a UNet call on a latent of ``size`` (H, W)."""
        self.size = size
        self.level = None
        self.shared.clear()

    def phase(self) -> tuple[int, int, float]:
        """(sx, sy, agent_ratio) for the current step."""
        c = self.config
        if self.step < c.agent_steps:
            return c.sx, c.sy, c.agent_ratio
        return c.late_sx, c.late_sy, c.late_agent_ratio

    def observe_timestep(self, t: float) -> None:
        """Advance the step counter from the timestep of a UNet call."""
        if self.last_timestep is None or t > self.last_timestep:
            self.step = 0  # a new generation (timesteps fall within one)
            # A private generator for the random destinations, copied from the global RNG without
            # consuming it: ``torch.manual_seed`` makes a patched run reproducible, and the
            # pipeline's own random draws are the same as unpatched.
            self.generator = torch.Generator().set_state(torch.get_rng_state())
        elif t < self.last_timestep:
            self.step += 1
        self.last_timestep = t

    def matching(self, x: Tensor) -> TokenMatching | None:
        """The matching for a block input x (B, N, C), or None where this block is left alone."""
        if self.size is None:
            return None
        c = self.config
        H, W = self.size
        B, N, _ = x.shape
        downsample = math.ceil(math.sqrt(H * W // N)) if N <= H * W else 1
        h, w = math.ceil(H / downsample), math.ceil(W / downsample)
        if h * w != N:  # not a latent map we can lay out
            return None
        if c.max_downsample is None:
            # the UNet runs its finest attention level first: that level is the one patched
            if self.level is None:
                self.level = downsample
            if downsample > self.level:
                return None
        elif downsample > c.max_downsample:
            return None
        sx, sy, agent_ratio = self.phase()
        key = (N, B, sx, sy)
        if c.share_matching and key in self.shared:
            return self.shared[key]
        # An odd batch cannot hold matching conditional/unconditional halves; the reference
        # (ToMe for SD) turns the random destinations off there to avoid artifacts.
        use_rand = c.use_rand and B % 2 == 0
        m = bipartite_soft_matching_random2d(
            x, w, h, sx, sy, int(N * c.ratio), int(N * agent_ratio),
            use_rand=use_rand, generator=self.generator,
        )
        if m is not None and m.r == 0 and not m.use_agents:
            m = None  # nothing would change
        if c.share_matching:
            self.shared[key] = m
        return m


class AgentSDAttnProcessor:
    """Processor for a self-attention ``attn1``: merge -> (agent) attention -> unmerge.

    Falls back to the original processor, unchanged, whenever its block has no matching (deeper
    blocks, masks, cross-attention), so other processors (SDPA, xformers, ...) keep serving there.
    """

    def __init__(self, state: AgentSDState, original: Any) -> None:
        self.state = state
        self.original = original
        self.matching: TokenMatching | None = None  # set by the block pre-hook for one forward
        params = inspect.signature(original.__call__).parameters
        self._orig_takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._orig_params = set(params)

    def _call_original(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
        if temb is not None:  # passed on only when given, as Attention.forward does
            kwargs = {**kwargs, "temb": temb}
        if not self._orig_takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self._orig_params}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        m = self.matching
        if m is None or encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self._call_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        c = self.state.config
        merged = m.merge(hidden_states) if c.merge_attn else hidden_states  # (B, M, C), M = N - r or N
        use_agents = 2 * m.num_agents < merged.shape[1]
        if use_agents or c.attn_precision == "fp32":
            # agents folded out of the merged features (no second merge of all N tokens)
            agents = m.agents(hidden_states, merged if c.merge_attn else None) if use_agents else None  # (B, n, C)
            out = self._attend(attn, merged, agents)
        elif c.merge_attn:  # plain ToMe: the original processor on the merged tokens
            out = self._call_original(attn, merged, None, None, temb, kwargs)
        else:
            return self._call_original(attn, hidden_states, None, None, temb, kwargs)
        return m.unmerge(out) if c.merge_attn else out

    def _attend(self, attn: nn.Module, x: Tensor, agents: Tensor | None) -> Tensor:
        # x (B, M, C) merged tokens, agents (B, n, C) or None -> (B, M, C)
        c = self.state.config
        B, M, _ = x.shape
        heads = attn.heads
        if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)  # one matmul (after pipe.fuse_qkv_projections())
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, M, C)
        a = attn.to_q(agents) if agents is not None else None  # (B, n, C)
        if attn.norm_q is not None:
            q = head_norm(attn.norm_q, q, heads)
            a = head_norm(attn.norm_q, a, heads) if a is not None else None
        if attn.norm_k is not None:
            k = head_norm(attn.norm_k, k, heads)
        dtype = q.dtype
        scale = attn.scale
        fp32 = c.attn_precision == "fp32"
        with torch.autocast(q.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:  # similarities in fp32: fp16 logits overflow in SD 2.x
                q, k, v = q.float(), k.float(), v.float()
                a = a.float() if a is not None else None
            if a is not None:
                # fp16 logits overflow only where the model says so (SD 2.x: upcast_attention, or
                # attn_precision="fp32" above); otherwise no upcast (the SDPA kernels accumulate in fp32).
                # The V shortcut is the training-free stand-in for the DWC term.
                upcast = bool(getattr(attn, "upcast_attention", False)) and not fp32 and dtype == torch.float16
                o = agent_attention_tokens(q, k, v, heads, [], [], agents=a, shortcut=c.k_shortcut, scale=scale,
                                           broadcast_scale=scale ** c.k_scale2, upcast=upcast)  # (B, M, C)
            else:
                d = q.shape[-1] // heads
                q, k, v = (t.view(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, M, d)
                o = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, M, heads * d)
        o = attn.to_out[1](attn.to_out[0](o.to(dtype)))  # linear, dropout
        if attn.residual_connection:
            o = o + x
        return o / attn.rescale_output_factor


class _MergedCrossAttnProcessor:
    """Processor for a cross-attention ``attn2`` with ``merge_crossattn``: the original processor on
    the merged query tokens, unmerged after (ToMe for SD's ``merge_crossattn``)."""

    def __init__(self, owner: AgentSDAttnProcessor, original: Any) -> None:
        self.owner = owner  # the block's attn1 processor holds the block's matching
        self.original = original

    def __call__(self, attn: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        m = self.owner.matching
        if m is None or hidden_states.ndim != 3 or kwargs.get("attention_mask") is not None:
            return self.original(attn, hidden_states, *args, **kwargs)
        return m.unmerge(self.original(attn, m.merge(hidden_states), *args, **kwargs))


def _unet_of(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            "apply_patch/remove_patch expect a diffusers pipeline with a `.unet` or a UNet module "
            f"(e.g. UNet2DConditionModel), got {type(pipe_or_unet).__name__}"
        )
    return unet


def _first_arg(args: tuple, kwargs: dict, name: str, pos: int) -> Any:
    return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)


def apply_patch(
    pipe_or_unet: Any,
    ratio: float | AgentSDConfig | Mapping[str, Any] | None = None,
    max_downsample: int | None = None,
    sx: int | None = None,
    sy: int | None = None,
    use_rand: bool | None = None,
    merge_attn: bool | None = None,
    merge_crossattn: bool | None = None,
    merge_mlp: bool | None = None,
    *,
    config: AgentSDConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Patch a diffusers Stable Diffusion pipeline (or its UNet) with AgentSD, in place.

    tomesd's call shapes work as they are (``apply_patch(pipe, 0.5)``,
    ``apply_patch(pipe, ratio=0.5, max_downsample=1, sx=2, sy=2, merge_crossattn=True)``), and so do
    ``apply_patch(pipe, AgentSDConfig(...))``, ``apply_patch(pipe, config=cfg, agent_steps=10)``: the
    settings are one :class:`AgentSDConfig` (see its fields), validated there. An argument left at
    None keeps the config's value.

    Args:
        pipe_or_unet: a pipeline with ``.unet`` or the UNet itself. Patching again re-patches.
        ratio: fraction of tokens merged away for attention, or the whole config (an AgentSDConfig or a mapping).
        max_downsample: deepest downsampling patched (the config's default None: the finest level with self-attention).
        sx: cell width for the destination tokens (agent phase).
        sy: cell height for the destination tokens (agent phase).
        use_rand: random destination per cell.
        merge_attn: merge the self-attention's tokens.
        merge_crossattn: merge the cross-attention's query tokens as well.
        merge_mlp: merge the MLP's tokens as well.
        config: the settings (an :class:`AgentSDConfig` or a mapping of its fields; None: the defaults).
        **kwargs: other :class:`AgentSDConfig` fields, on top of ``config``.

    Returns:
        ``pipe_or_unet``, patched.
    """
    if isinstance(ratio, (AgentSDConfig, Mapping)):
        if config is not None:
            raise ValueError("pass the settings once: either apply_patch(pipe, config) or apply_patch(pipe, config=...)")
        config, ratio = ratio, None
    named = dict(ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, merge_attn=merge_attn,
                 merge_crossattn=merge_crossattn, merge_mlp=merge_mlp)
    kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
    config = AgentSDConfig.build(config, **kwargs)
    unet = _unet_of(pipe_or_unet)
    remove_patch(unet)
    blocks = [
        (name, mod) for name, mod in unet.named_modules()
        if type(mod).__name__ == "BasicTransformerBlock" and not getattr(mod, "only_cross_attention", False)
    ]
    if not blocks:
        raise ValueError(
            f"{type(unet).__name__} has no diffusers BasicTransformerBlock to patch; AgentSD supports "
            "Stable Diffusion 1.x/2.x UNets (UNet2DConditionModel)"
        )
    state = AgentSDState(config)

    def unet_pre_hook(module, args, kwargs):
        sample = _first_arg(args, kwargs, "sample", 0)
        t = _first_arg(args, kwargs, "timestep", 1)
        state.new_call((sample.shape[-2], sample.shape[-1]))
        if t is not None:
            state.observe_timestep(float(t.flatten()[0]) if torch.is_tensor(t) else float(t))

    state.hooks.append(unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True))

    for name, block in blocks:
        proc = AgentSDAttnProcessor(state, block.attn1.processor)
        state.processors[name] = (block.attn1, block.attn1.processor, proc)
        block.attn1.set_processor(proc)

        def block_pre_hook(module, args, kwargs, proc=proc):
            x = _first_arg(args, kwargs, "hidden_states", 0)
            proc.matching = state.matching(x) if x is not None and x.ndim == 3 else None

        def block_post_hook(module, args, output, proc=proc):
            proc.matching = None

        state.hooks.append(block.register_forward_pre_hook(block_pre_hook, with_kwargs=True))
        state.hooks.append(block.register_forward_hook(block_post_hook))
        if config.merge_crossattn and getattr(block, "attn2", None) is not None:
            cross = _MergedCrossAttnProcessor(proc, block.attn2.processor)
            state.processors[name + ".attn2"] = (block.attn2, block.attn2.processor, cross)
            block.attn2.set_processor(cross)
        if config.merge_mlp and getattr(block, "ff", None) is not None:
            # the MLP on merged tokens: merge its input, unmerge its output (one matching per block)
            def ff_pre_hook(module, args, proc=proc):
                m = proc.matching
                return None if m is None or args[0].ndim != 3 else (m.merge(args[0]), *args[1:])

            def ff_post_hook(module, args, output, proc=proc):
                m = proc.matching
                return None if m is None or output.ndim != 3 else m.unmerge(output)

            state.hooks.append(block.ff.register_forward_pre_hook(ff_pre_hook))
            state.hooks.append(block.ff.register_forward_hook(ff_post_hook))

    setattr(unet, _STATE_ATTR, state)
    return pipe_or_unet


def remove_patch(pipe_or_unet: Any) -> Any:
    """Undo :func:`apply_patch`: hooks removed, original processor objects restored. No-op if unpatched.

    Args:
        pipe_or_unet: what was given to :func:`apply_patch`.

    Returns:
        ``pipe_or_unet``, as it was before the patch.
    """
    unet = _unet_of(pipe_or_unet)
    state: AgentSDState | None = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return pipe_or_unet
    for hook in state.hooks:
        hook.remove()
    for attn, original, proc in state.processors.values():
        if attn.processor is proc:  # leave a processor the user set after patching alone
            attn.set_processor(original)
    delattr(unet, _STATE_ATTR)
    return pipe_or_unet


def get_state(pipe_or_unet: Any) -> AgentSDState | None:
    """The patch state (``config``, current step) of a patched pipeline/UNet, or None."""
    return getattr(_unet_of(pipe_or_unet), _STATE_ATTR, None)
