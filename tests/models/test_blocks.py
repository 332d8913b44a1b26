"""Component / UNet block / kind of SGM key names: the real SDXL key list from sd-mecha's
`sdxl-sgm` config (names and shapes only, no weights), plus hand-written edge cases."""

from __future__ import annotations

import collections

import pytest

from tunelab.models import blocks, vocab


@pytest.fixture(scope="module")
def sdxl_keys() -> list[str]:
    from sd_mecha.extensions import model_configs

    return list(model_configs.resolve("sdxl-sgm").keys())


def test_components_of_real_sdxl_keys(sdxl_keys):
    counts = collections.Counter(blocks.component_of(k) for k in sdxl_keys)
    # te1 is CLIP ViT-L (12 layers), te2 OpenCLIP bigG (32 layers, fused qkv); the UNet's 1680
    # tensors are 574 input + 226 middle + 868 output + 12 embedding/final; "other" holds the
    # noise-schedule buffers sd-mecha lists as optional keys.
    assert counts == {"te1": 197, "te2": 390, "unet": 1680, "vae": 248, "other": 16}
    assert all(not k.startswith(("model.", "conditioner.", "first_stage_model."))
               for k in sdxl_keys if blocks.component_of(k) == "other")


def test_unet_blocks_of_real_sdxl_keys(sdxl_keys):
    unet = [k for k in sdxl_keys if blocks.component_of(k) == "unet"]
    per_block = collections.Counter(blocks.unet_block_of(k) for k in unet)
    assert tuple(sorted(per_block, key=blocks.block_order)) == blocks.UNET_BLOCKS  # all 21, nothing else
    assert per_block["EMB"] == 8 and per_block["FINAL"] == 4  # time_embed.{0,2}, label_emb.0.{0,2}; out.{0,2}
    assert per_block["IN00"] == 2  # the stem conv
    assert all(blocks.unet_block_of(k) is None for k in sdxl_keys if blocks.component_of(k) != "unet")


def test_attention_kinds_of_real_sdxl_keys(sdxl_keys):
    kinds = collections.Counter(blocks.kind_of(k) for k in sdxl_keys if blocks.component_of(k) == "unet")
    # 70 transformer blocks (IN04/05: 2 each, IN07/08: 10, M00: 10, OUT00-02: 10, OUT03-05: 2), and
    # each attention has to_q, to_k, to_v (no bias), to_out.0.weight, to_out.0.bias.
    assert kinds[blocks.SELF_ATTENTION] == 70 * 5
    assert kinds[blocks.CROSS_ATTENTION] == 70 * 5
    with_cross = {blocks.unet_block_of(k) for k in sdxl_keys if blocks.kind_of(k) == blocks.CROSS_ATTENTION}
    assert with_cross == {"IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"}
    # Text-encoder and VAE attention is not a UNet kind.
    assert {blocks.kind_of(k) for k in sdxl_keys if blocks.component_of(k) != "unet"} == {blocks.OTHER}


def test_merge_blocks_agree_with_sd_mecha(sdxl_keys):
    """`merge_block_of` must place every key where sd-mecha's supermerger-blocks conversion does."""
    from sd_mecha.extensions import merge_methods

    conv = getattr(merge_methods.resolve("convert_sdxl_blocks_to_sgm"), "__wrapped__", None)
    if conv is None or not hasattr(conv, "map_keys"):
        pytest.skip("this sd-mecha version hides its block conversion table")

    class _Echo:
        def __getitem__(self, block):
            return block

    class _Builder:  # the two operations map_keys uses: `b.keys[block]` and `b[sgm_key] = ...`
        keys = _Echo()

        def __init__(self):
            self.placed: dict[str, str] = {}

        def __setitem__(self, key, block):
            self.placed[key] = block

    b = _Builder()
    conv.map_keys(b)
    assert len(b.placed) == len(sdxl_keys)
    assert {k: blocks.merge_block_of(k) for k in b.placed} == b.placed


@pytest.mark.parametrize(
    ("key", "component", "block", "kind"),
    [
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "te1", None, "other"),
        ("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight", "te2", None, "other"),
        ("model.diffusion_model.time_embed.0.weight", "unet", "EMB", "other"),
        ("model.diffusion_model.label_emb.0.2.bias", "unet", "EMB", "other"),
        ("model.diffusion_model.input_blocks.0.0.weight", "unet", "IN00", "other"),
        ("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "unet", "IN08", "cross-attention"),
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.bias", "unet", "M00", "self-attention"),
        ("model.diffusion_model.output_blocks.11.1.proj_out.weight", "unet", "OUT11", "other"),  # SD1 has 12
        ("model.diffusion_model.out.2.weight", "unet", "FINAL", "other"),
        ("model.diffusion_model.some_future_layer.weight", "unet", "SOME_FUTURE_LAYER", "other"),
        ("first_stage_model.decoder.mid.attn_1.q.weight", "vae", None, "other"),
        ("alphas_cumprod", "other", None, "other"),
        ("model.diffusion_modelx.weight", "other", None, "other"),  # a prefix needs its dot
    ],
)
def test_hand_written_keys(key, component, block, kind):
    assert blocks.component_of(key) == component
    assert blocks.unet_block_of(key) == block
    assert blocks.kind_of(key) == kind


def test_components_agree_with_sd_mecha_components():
    """sd-mecha's `sdxl-sgm` config splits its keys into clip_l / clip_g / diffuser / vae (+ scheduler):
    the `mecha` column of our table names the same keys."""
    from sd_mecha.extensions import model_configs

    for name, comp in model_configs.resolve("sdxl-sgm").components().items():
        ours = {blocks.component_of(k) for k in comp.keys()}
        if name == "scheduler":
            assert ours == {"other"}
        elif name == "diffuser":  # the UNet plus the files' prediction flags (v_pred, edm_vpred.*)
            assert "unet" in ours and ours <= {"unet", "other"}
        else:
            (cid,) = ours
            assert vocab.component(cid).mecha == name


@pytest.mark.parametrize(
    ("rel", "kohya", "merge"),
    [
        ("time_embed.0.weight", "BASE", "BASE"),
        ("label_emb.0.2.bias", "BASE", "BASE"),
        ("input_blocks.0.0.weight", "IN00", "IN00"),
        ("input_blocks.8.1.proj_in.weight", "IN08", "IN08"),
        ("middle_block.0.in_layers.0.weight", "MID00", "M00"),
        ("middle_block.1.transformer_blocks.3.attn2.to_k.weight", "MID01", "M00"),
        ("middle_block.2.skip_connection.weight", "MID02", "M00"),
        ("output_blocks.2.2.conv.weight", "OUT02", "OUT02"),
        ("output_blocks.8.0.out_layers.3.bias", "OUT08", "OUT08"),
        ("out.2.weight", "OUT", "OUT08"),
        ("input_blocks.9.0.op.weight", None, "IN09"),  # SD1 layout: no kohya SDXL id
        ("middle_block.3.weight", None, "M00"),
        ("some_future_layer.weight", None, "SOME_FUTURE_LAYER"),
    ],
)
def test_kohya_and_merge_blocks_by_hand(rel, kohya, merge):
    key = "model.diffusion_model." + rel
    assert blocks.kohya_block_of(key) == blocks.block_of(key, "kohya") == kohya
    assert blocks.merge_block_of(key) == blocks.block_of(key, "merge") == merge
    assert blocks.block_of(key) == blocks.unet_block_of(key)


def test_kohya_block_of_a_head_that_spells_an_id():
    # an unknown UNet layer is reported by its upper-cased head, which must not pass for a kohya id
    assert blocks.unet_block_of("model.diffusion_model.base.weight") == "BASE"
    assert blocks.kohya_block_of("model.diffusion_model.base.weight") is None


def test_block_of_outside_the_unet():
    te = "conditioner.embedders.1.model.ln_final.weight"
    assert [blocks.block_of(te, s) for s in ("kohya", "unet", "merge")] == [None, None, "BASE"]
    vae = "first_stage_model.decoder.conv_in.bias"
    assert (blocks.block_of(vae, "kohya"), blocks.block_of(vae, "merge")) == (None, "VAE")
    with pytest.raises(ValueError, match="schemes: kohya, unet, merge"):
        blocks.block_of(te, "supermerger")


def test_every_block_id_is_produced_by_real_sdxl_keys(sdxl_keys):
    """Each scheme's id list is exactly what its key function gives on SDXL's keys (nothing missing,
    nothing extra), so the lists in vocab.py and the placement in blocks.py cannot drift apart."""
    for scheme in vocab.BLOCK_IDS:
        seen = {blocks.block_of(k, scheme) for k in sdxl_keys} - {None}
        assert seen == set(vocab.block_ids(scheme)), scheme


def test_block_order_is_forward_order():
    shuffled = ["OUT10", "FINAL", "M00", "IN10", "IN02", "EMB", "OUT00", "ZZZ"]
    assert sorted(shuffled, key=blocks.block_order) == ["EMB", "IN02", "IN10", "M00", "OUT00", "OUT10", "FINAL", "ZZZ"]
