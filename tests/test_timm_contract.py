"""timm's model contract for every model agentlit registers.

The checks of timm's own ``tests/test_models.py`` (forward, backward, default cfgs with
``device=`` / meta-device construction, ``forward_features`` / ``forward_head``, ``features_only``,
FX tracing forward and backward, TorchScript, FX + TorchScript), written out for our models.
timm classifies ``deit*`` as a "non-standard" (token-output) model; ``agent_deit_*`` is checked
the same way. To keep CI short the full checks run on the smallest variant of each family (the
larger ones are the same classes with more blocks); every registered name is built with
``device=`` / ``dtype=`` and run on the meta device. ``scripts/timm_model_tests.py`` runs timm's own
test file against all of them.
"""
from __future__ import annotations

import fnmatch
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim

import agentlit  # noqa: F401  (registers the models)

OURS = sorted(set(timm.list_models(["agent_*", "pvt_v1_*", "cswin_*"])))
SMALLEST = ["agent_deit_tiny", "agent_pvt_tiny", "pvt_v1_tiny", "agent_swin_tiny", "agent_cswin_tiny", "cswin_tiny"]
TOKEN_OUTPUT = ["agent_deit_*"]  # forward_features returns (B, tokens, C), as timm's deit*


def _input_size(name: str, target: int) -> tuple[int, int, int]:
    """timm's rule: the cfg's size, shrunk to ``target`` unless the model fixes its input size."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size
    return tuple(min(s, target) for s in size) if max(size) > target else size


def _fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """The traced feature extractor timm's tests build: leaf modules / functions from timm's registry,
    returning the graph's output node(s)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import (
        NodePathTracer, create_feature_extractor, get_graph_node_names,
    )

    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    train_return, eval_return = [train_nodes[-1]], [eval_nodes[-1]]
    if train:
        graph = NodePathTracer(**kw).trace(model)
        nodes = list(reversed(graph.nodes))
        outputs = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(o)] for o in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                    tracer_kwargs=kw)


def test_registry_lists_every_family():
    assert len(OURS) == 20
    for prefix in ("agent_deit_", "agent_pvt_", "agent_swin_", "agent_cswin_", "pvt_v1_", "cswin_"):
        assert any(n.startswith(prefix) for n in OURS), prefix


# ----------------------------------------------------------------------------- compute checks
@pytest.mark.parametrize("name", SMALLEST)
def test_forward(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, 384))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000) and not out.isnan().any()


def _block_calls_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Forward calls of the model's first transformer block during one training step, and the gradients."""
    block = next(m for n, m in model.named_modules() if type(m).__name__.endswith("Block") and n)
    calls = []
    forward = block.forward  # wrapped on the instance: checkpoint's recomputation skips module hooks

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    try:
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
    finally:
        del block.forward
    return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", SMALLEST)
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0, num_classes=5).train()
    x = torch.randn(2, *_input_size(name, 64))
    plain_calls, plain = _block_calls_and_grads(model, x)
    model.set_grad_checkpointing(True)
    ckpt_calls, ckpt = _block_calls_and_grads(model, x)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block's activations are recomputed in backward
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", SMALLEST)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "fx"])
def test_backward_reaches_every_parameter(name, traced):
    model = timm.create_model(name, num_classes=42).train()
    n_params = sum(p.numel() for p in model.parameters())
    if traced:
        model = _fx_model(model, train=True)
    out = model(torch.randn(2, *_input_size(name, 128)))
    out = torch.cat(tuple(out.values())) if isinstance(out, dict) else out
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert sum(p.grad.numel() for p in model.parameters()) == n_params
    assert out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize("name", SMALLEST)
def test_fx_trace_matches_eager(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, 128))
    with torch.inference_mode():
        out = model(x)
        traced = torch.cat(tuple(_fx_model(model)(x).values()))
    torch.testing.assert_close(traced, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALLEST)
@pytest.mark.parametrize("via_fx", [False, True], ids=["script", "fx_script"])
def test_torchscript_matches_eager(name, via_fx):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, 128))
    with torch.inference_mode():
        expected = model(x)
    scripted = torch.jit.script(_fx_model(model) if via_fx else model)
    with torch.inference_mode():
        out = scripted(x)
    out = torch.cat(tuple(out.values())) if isinstance(out, dict) else out
    assert out.shape[0] == 1 and not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in SMALLEST if not any(fnmatch.fnmatch(n, p) for p in TOKEN_OUTPUT)])
def test_features_only_channels_and_strides(name):
    model = timm.create_model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = _input_size(name, 96)
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[1] == c
        for s, dim in zip(size[-2:], o.shape[-2:]):
            assert s / (2 * r) < dim <= math.ceil(s / r) + 1, f"reduction {r} does not match a {dim}-wide map"


# ----------------------------------------------------------------------------- configuration contract
def _on_meta(model: torch.nn.Module) -> bool:
    return all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", OURS)
def test_every_registered_model_builds_on_the_requested_device(name):
    """create_model(device=, dtype=) — what current timm passes — for every name, feature shapes on meta."""
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16).eval()
    assert _on_meta(model) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    cfg = model.default_cfg
    feats = model.forward_features(torch.randn(1, *cfg["input_size"], device="meta", dtype=torch.bfloat16))
    if not any(fnmatch.fnmatch(name, p) for p in TOKEN_OUTPUT):
        fmt = getattr(model, "output_fmt", "NCHW")  # timm's Swin keeps NHWC maps
        h_axis, w_axis = get_spatial_dim(fmt)
        assert (feats.shape[h_axis], feats.shape[w_axis]) == tuple(cfg["pool_size"])
        assert feats.shape[get_channel_dim(fmt)] == model.num_features
    assert model.forward_head(feats).shape == (1, cfg["num_classes"])


@pytest.mark.parametrize("name", SMALLEST)
def test_default_cfg_contract_on_meta_device(name):
    token_output = any(fnmatch.fnmatch(name, p) for p in TOKEN_OUTPUT)
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
        with pytest.raises(TypeError):  # unknown constructor arguments are errors, not ignored
            timm.create_model(name, device="meta", not_a_model_arg=1)
    # created without the context too: every tensor on the requested device
    assert _on_meta(timm.create_model(name, device="meta", dtype=torch.float32))
    cfg, state = model.default_cfg, model.state_dict()
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg["input_size"][0]
    for key in (cfg["first_conv"], *([cfg["classifier"]] if isinstance(cfg["classifier"], str) else cfg["classifier"])):
        assert f"{key}.weight" in state
    params = [n for n, _ in model.named_parameters()]
    for pattern in model.no_weight_decay():  # each entry names a parameter (or an attribute this config lacks)
        if not any(fnmatch.fnmatch(n, pattern) for n in params):
            obj = model
            for attr in pattern.split("."):
                obj = getattr(obj, attr, None) if obj is not None else None
            assert obj is None, f"no_weight_decay() entry {pattern!r} matches no parameter"

    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    if token_output:
        assert feats.shape[-1] == model.num_features
    else:
        fmt = getattr(model, "output_fmt", "NCHW")
        h_axis, w_axis = get_spatial_dim(fmt)
        assert (feats.shape[h_axis], feats.shape[w_axis]) == tuple(cfg["pool_size"])
        assert feats.shape[get_channel_dim(fmt)] == model.num_features
    model.to(torch.bfloat16)  # a dtype change after a forward leaves nothing behind in float32
    assert model(x.bfloat16()).dtype == torch.bfloat16
    model.to(torch.float32)

    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    if not token_output:
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and (out.shape[h_axis], out.shape[w_axis]) == tuple(cfg["pool_size"])
        pooled = timm.create_model(name, num_classes=0, global_pool="", device="meta", dtype=torch.float32).eval()
        assert pooled(x).shape == out.shape
    assert timm.create_model(name, num_classes=0, device="meta", dtype=torch.float32).eval()(x).shape == pre.shape

    # reset_classifier builds the new head on the model's device / dtype and in its train/eval mode
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(2)
    head = model.get_classifier()
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in head.parameters())
    assert all(not m.training for m in model.modules())

    # frozen weights stay frozen through reset_classifier
    frozen = timm.create_model(name, device="meta", dtype=torch.float32).requires_grad_(False)
    frozen.reset_classifier(0)
    if not token_output:
        frozen.reset_classifier(0, "")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
