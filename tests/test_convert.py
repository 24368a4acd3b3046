"""agentlit.convert: softmax layers (timm, nn.MultiheadAttention, diffusers) become agent attention
with the same weights; the converted layers equal the agent formulas built from the original weights."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from agentlit.conversion import ConversionError, convert
from agentlit.core import AgentAttention, AgentMultiheadAttention
from test_agent_layouts import naive_layer


def _vit(**kw):
    args = dict(img_size=16, patch_size=4, depth=2, embed_dim=24, num_heads=3, num_classes=5)
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **{**args, **kw}).eval()


def test_timm_vit_keeps_every_weight_and_adds_zeroed_agent_parts():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qkv = model.blocks[0].attn.qkv.weight
    report = convert(model, agent_num=4)
    assert report.converted == {"blocks.0.attn": "timm Attention", "blocks.1.attn": "timm Attention"}
    attn = model.blocks[0].attn
    assert isinstance(attn, AgentAttention) and attn.qkv.weight is qkv  # the same Parameter objects
    assert attn.feat_size == (4, 4) and attn.num_prefix_tokens == 1 and attn.agent_grid == (2, 2)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    new = set(after) - set(before)
    assert new and all((after[k] == 0).all() for k in new)  # biases and conv start at zero
    assert {k.rsplit(".", 1)[-1] for k in new} >= {"an_bias", "ac_bias", "ca_bias", "weight", "bias"}


def test_converted_vit_block_is_agent_attention_on_the_original_weights():
    model = _vit()
    original = model.blocks[1].attn
    convert(model, agent_num=4, layers=["blocks.1.attn"])
    assert type(model.blocks[0].attn).__name__ == "Attention"  # only the named layer
    layer = model.blocks[1].attn
    with torch.no_grad():
        for p in layer.bias_parameters():
            p.normal_()  # as after training: every term must sit where the naive reference puts it
        x = torch.randn(2, 17, 24)
        torch.testing.assert_close(layer(x), naive_layer(layer, x, (4, 4)), rtol=1e-5, atol=1e-5)
        assert layer.qkv.weight is original.qkv.weight and layer.qkv.bias is original.qkv.bias  # same Parameters
        assert layer.proj is original.proj
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        layer(x, is_causal=True)


def test_first_k_layers_and_report():
    model = _vit(depth=3)
    report = convert(model, agent_num=4, layers=2)
    assert list(report.converted) == ["blocks.0.attn", "blocks.1.attn"] and report.num_converted == 2
    assert "converted 2 attention layer(s)" in str(report)
    assert type(model.blocks[2].attn).__name__ == "Attention"
    out = model(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_mha_adapter_matches_agent_attention_with_the_same_weights():
    """The drop-in equals AgentAttention (checked against the naive formulas) holding MHA's weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=False).eval()
    adapter = AgentMultiheadAttention.from_mha(mha, feat_size=(8,), agent_num=4)
    assert adapter.in_proj_weight is mha.in_proj_weight and adapter.out_proj is mha.out_proj
    ref = AgentAttention(24, 3, feat_size=(8,), agent_num=4).eval()
    with torch.no_grad():
        for p in adapter.bias_parameters():
            p.normal_()
        ref.qkv.weight.copy_(mha.in_proj_weight)
        ref.qkv.bias.copy_(mha.in_proj_bias)
        ref.proj.load_state_dict(mha.out_proj.state_dict())
        ref.dwc.load_state_dict(adapter.dwc.state_dict())
        for name in ("an_bias", "na_bias", "al_bias", "la_bias"):
            getattr(ref, name).copy_(getattr(adapter, name))
        x = torch.randn(11, 2, 24)  # (L, B, E): not batch_first
        mask = torch.zeros(2, 11, dtype=torch.bool)
        mask[1, 7:] = True
        out, weights = adapter(x, x, x, key_padding_mask=mask)
        assert weights is None and out.shape == x.shape
        expect = ref(x.transpose(0, 1), key_padding_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[:, 0], expect[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[:7, 1], expect[:7, 1], rtol=1e-5, atol=1e-6)
        # float mask (0 / -inf) as nn.TransformerEncoderLayer passes it; unbatched input
        fmask = torch.zeros(2, 11).masked_fill(mask, float("-inf"))
        torch.testing.assert_close(adapter(x, x, x, key_padding_mask=fmask)[0], out)
        x0 = x[:, 0]
        torch.testing.assert_close(adapter(x0, x0, x0)[0], out[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="only 0 .* and -inf"):
        adapter(x, x, x, key_padding_mask=torch.ones(2, 11))
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        adapter(x, x, x, attn_mask=torch.zeros(11, 11))


def test_transformer_encoder_with_padding_after_conversion():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(24, 4, 48, dropout=0.0, batch_first=True), 2).eval()
    report = convert(enc, agent_num=4)
    assert list(report.converted) == ["layers.0.self_attn", "layers.1.self_attn"]
    x = torch.randn(2, 12, 24)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask)  # eval + no_grad: PyTorch's fused path must not take over
        garbage = x.masked_fill(mask[..., None], 0.0) + mask[..., None] * 1e3
        out2 = enc(garbage, src_key_padding_mask=mask)
    assert not out.is_nested and torch.isfinite(out).all()
    torch.testing.assert_close(out2[~mask], out[~mask], rtol=0, atol=1e-5)
    # the adapter ran (the fast path would have computed softmax attention)
    calls = []
    enc.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        enc(x)
    assert calls


def test_mha_separate_kdim_is_cross_attention_and_decoder_self_attention_is_refused():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=10, vdim=6, batch_first=True)
    adapter = AgentMultiheadAttention.from_mha(mha, agent_num=4)
    assert adapter.k_proj_weight is mha.k_proj_weight and adapter.context_dim == 10
    assert not hasattr(adapter, "an_bias") and adapter.dwc is None  # no key layout: no B1, no conv
    q, k, v = torch.randn(2, 9, 16), torch.randn(2, 5, 10), torch.randn(2, 5, 6)
    out, _ = adapter(q, k, v)
    assert out.shape == (2, 9, 16) and torch.isfinite(out).all()

    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 1)
    report = convert(dec, agent_num=4)
    assert list(report.converted) == ["layers.0.multihead_attn"]
    assert "causal" in report.skipped["layers.0.self_attn"]
    with pytest.raises(ConversionError, match="cannot convert layers.0.self_attn .*causal"):
        convert(nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32), 1), layers=["layers.0.self_attn"])


def test_refusals_name_what_and_why():
    with pytest.raises(ConversionError, match="nothing to convert in Sequential"):
        convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConversionError, match=r"layers \['blocks.9.attn'\] match no softmax attention layer"):
        convert(_vit(), layers=["blocks.9.attn"])
    with pytest.raises(ConversionError, match="agent grid .* does not fit the \\(4, 4\\) patch grid"):
        convert(_vit(), agent_num=25)
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ConversionError, match="add_bias_kv"):
        convert(nn.ModuleDict({"attn": mha}))


def test_diffusers_unet_self_attention_gets_zero_initialised_agent_processors():
    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import AgentAttnProcessor, tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).eval()
    to_q = {n: m.to_q.weight.clone() for n, m in unet.named_modules() if hasattr(m, "to_q")}
    report = convert(unet, agent_num=4)
    assert report.converted and all(k.endswith("attn1") for k in report.converted)
    assert all("cross-attention" in why for k, why in report.skipped.items() if k.endswith("attn2"))
    for name in report.converted:
        attn = unet.get_submodule(name)
        size = (8, 8) if name.startswith("mid_block") else (16, 16)  # the latent size of the layer's level
        assert isinstance(attn.processor, AgentAttnProcessor) and attn.processor.feat_size == size
        assert all((p == 0).all() for p in attn.processor.parameters())
        assert torch.equal(attn.to_q.weight, to_q[name])
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.isfinite(unet(x, t, encoder_hidden_states=ctx).sample).all()
