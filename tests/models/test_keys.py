"""The SGM <-> diffusers key map: acceptance against sd-mecha's real SDXL key list, hand-checked
names, and bijection on both presets (meta device: no weights allocated)."""

from __future__ import annotations

import pytest
import torch

from tunelab.models import keys as K
from tunelab.models.arch import build_components


def _sgm_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    comps = build_components(arch, device="meta")
    state = {n: m.state_dict() for n, m in comps.modules().items()}
    return {r.sgm: K.sgm_shape(r, [tuple(state[r.component][n].shape) for n in r.names]) for r in K.rules_for_arch(arch)}


def test_sdxl_keys_and_shapes_equal_sd_mecha_sdxl_sgm():
    from sd_mecha.extensions import model_configs

    ref = model_configs.resolve("sdxl-sgm").keys()
    ours = _sgm_shapes("sdxl")
    assert set(ours) <= set(ref), sorted(set(ours) - set(ref))[:5]
    required = {k for k, meta in ref.items() if not meta.optional}
    assert required <= set(ours), sorted(required - set(ours))[:5]
    assert {k: tuple(ref[k].shape) for k in ours} == ours
    # Our optional set is exactly sd-mecha's optional keys that belong to a module.
    assert K.optional_keys("sdxl") == {k for k, meta in ref.items() if meta.optional and k in ours}


@pytest.mark.parametrize(
    "hf, sgm",
    [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.attentions.0.proj_in.weight", "input_blocks.4.1.proj_in.weight"),
        ("down_blocks.2.resnets.0.conv_shortcut.bias", "input_blocks.7.0.skip_connection.bias"),
        ("mid_block.resnets.1.time_emb_proj.weight", "middle_block.2.emb_layers.1.weight"),
        ("mid_block.attentions.0.transformer_blocks.3.attn2.to_k.weight", "middle_block.1.transformer_blocks.3.attn2.to_k.weight"),
        ("up_blocks.0.resnets.2.norm2.weight", "output_blocks.2.0.out_layers.0.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        ("up_blocks.2.resnets.0.conv2.weight", "output_blocks.6.0.out_layers.3.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
    ],
)
def test_unet_names_by_hand(hf, sgm):
    assert K.unet_name(hf, 2, (True, True, False)) == sgm


@pytest.mark.parametrize(
    "hf, sgm",
    [
        ("encoder.down_blocks.3.resnets.1.norm2.weight", "encoder.down.3.block.1.norm2.weight"),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
        ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
        ("decoder.up_blocks.3.resnets.0.conv_shortcut.bias", "decoder.up.0.block.0.nin_shortcut.bias"),
        ("decoder.up_blocks.1.upsamplers.0.conv.weight", "decoder.up.2.upsample.conv.weight"),
        ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
        ("decoder.mid_block.resnets.1.conv2.bias", "decoder.mid.block_2.conv2.bias"),
        ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
        ("quant_conv.weight", "quant_conv.weight"),
    ],
)
def test_vae_names_by_hand(hf, sgm):
    assert K.vae_name(hf, 4) == sgm


def test_te2_names_by_hand():
    assert K.te2_name("text_model.encoder.layers.5.mlp.fc1.weight") == "transformer.resblocks.5.mlp.c_fc.weight"
    assert K.te2_name("text_model.embeddings.position_embedding.weight") == "positional_embedding"
    assert K.te2_name("text_model.final_layer_norm.bias") == "ln_final.bias"
    assert K.te2_name("text_projection.weight") == "text_projection"


@pytest.mark.parametrize("arch", ["toy", "sdxl"])
def test_map_is_a_bijection_with_consistent_shapes(arch):
    comps = build_components(arch, device="meta")
    state = {n: m.state_dict() for n, m in comps.modules().items()}
    rules = K.rules_for_arch(arch)
    sgm = [r.sgm for r in rules]
    assert len(sgm) == len(set(sgm))
    covered = [(r.component, n) for r in rules for n in r.names]
    assert len(covered) == len(set(covered)) == sum(len(s) for s in state.values())
    for rule in rules:  # the inverse operation restores every module shape (meta tensors: no memory)
        parts = [state[rule.component][n] for n in rule.names]
        back = K.from_sgm_tensor(rule, K.to_sgm_tensor(rule, parts))
        assert [tuple(b.shape) for b in back] == [tuple(p.shape) for p in parts]


def test_tensor_ops_invert_exactly():
    q, k, v = (torch.randn(4, 3) for _ in range(3))
    rule = K.KeyRule("x", "text_encoder_2", ("q", "k", "v"), "qkv")
    assert all(torch.equal(a, b) for a, b in zip(K.from_sgm_tensor(rule, K.to_sgm_tensor(rule, [q, k, v])), [q, k, v]))
    w = torch.randn(6, 5)
    t = K.KeyRule("x", "text_encoder_2", ("w",), "transpose")
    assert K.to_sgm_tensor(t, [w]).shape == (5, 6)
    assert torch.equal(K.from_sgm_tensor(t, K.to_sgm_tensor(t, [w]))[0], w)
    c = K.KeyRule("x", "vae", ("w",), "conv1x1")
    assert K.to_sgm_tensor(c, [w]).shape == (6, 5, 1, 1)


@pytest.mark.parametrize("arch", ["toy", "sdxl"])
def test_shipped_key_table_is_what_the_map_generates(arch):
    """configs/<arch>/sgm_keys.json (what header-only tools read) is a snapshot of the generated map."""
    shipped, generated = K.sgm_key_shapes(arch), _sgm_shapes(arch)
    assert list(shipped.items()) == list(generated.items()), (
        f"configs/{arch}/{K.KEY_TABLE} is stale; regenerate it: "
        f".venv/bin/python -c \"from tunelab.models.keys import write_key_table; write_key_table('{arch}')\"")
