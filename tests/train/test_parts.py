"""What trains: exact trainable counts of the partial-UNet presets on full-size SDXL (meta device),
text-encoder modes, include/exclude patterns, kohya block LRs, and the banner."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import OptimSection, PartsSection
from tunelab.errors import TunelabError
from tunelab.models import vocab
from tunelab.train import parts as P

SDXL_UNET = 2_567_463_684
# DOMAIN.md "Partial UNet": the field's numbers, to the parameter
SDXL_COUNTS = {"full": SDXL_UNET, "unet63": 1_629_562_564, "unet68": 1_764_781_124, "unet71": 1_827_058_244}


def _trains(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("preset", list(SDXL_COUNTS))
def test_sdxl_preset_counts_are_exact(sdxl_meta, preset):
    plan = P.select_trainable(sdxl_meta, PartsSection(unet=preset))
    unet = plan.components["unet"]
    assert (unet.n_trained, unet.n_total) == (SDXL_COUNTS[preset], SDXL_UNET)
    # the count is what requires grad, and the optimizer group is exactly those parameters
    assert sum(p.numel() for p in sdxl_meta.unet.parameters() if p.requires_grad) == SDXL_COUNTS[preset]
    assert sum(p.numel() for p in plan.param_groups["unet"]) == SDXL_COUNTS[preset]
    assert all(p.requires_grad for p in plan.param_groups["unet"])
    # text_encoder = off: nothing else trains, VAE never
    for comp in ("text_encoder_1", "text_encoder_2", "vae"):
        assert plan.components[comp].n_trained == 0
        assert not any(_trains(getattr(sdxl_meta, comp)).values())


def test_sdxl_preset_sub_blocks(sdxl_meta):
    """The frozen sets on names: 63 % freezes in8 (level-2 #2) and out0 (level-2 #1), not in7/out1."""
    plan = P.select_trainable(sdxl_meta, PartsSection(unet="unet63"))
    rel = {k.removeprefix("model.diffusion_model.") for k in plan.trained_keys()}
    heads = {".".join(k.split(".")[:3]) for k in rel if k.startswith(("input_blocks", "output_blocks"))}
    assert {"input_blocks.7.1", "input_blocks.7.0", "output_blocks.1.1", "output_blocks.2.1",
            "input_blocks.4.1", "output_blocks.3.1"} <= heads
    assert not heads & {"input_blocks.8.1", "input_blocks.8.0", "output_blocks.0.1", "output_blocks.2.2",
                        "input_blocks.3.0", "input_blocks.1.0", "output_blocks.8.0"}
    assert {k.split(".")[0] for k in rel} >= {"time_embed", "label_emb", "out", "middle_block"}
    assert "input_blocks.0.0.weight" in rel  # conv_in


def test_toy_presets_shrink_in_order(toy):
    counts = {}
    for preset in SDXL_COUNTS:
        counts[preset] = P.select_trainable(toy, PartsSection(unet=preset)).components["unet"].n_trained
    total = sum(p.numel() for p in toy.unet.parameters())
    assert counts["full"] == total
    assert counts["unet63"] < counts["unet68"] < counts["unet71"] < total


def test_te_modes_on_sdxl(sdxl_meta):
    te1_total = 123_060_480
    # te1's (CLIP-L) layer 11 (7,087,872) and final norm (1,536) never train and are not counted
    te1_trained = te1_total - 7_087_872 - 1_536
    on = P.select_trainable(sdxl_meta, PartsSection(text_encoder="on"))
    assert on.components["text_encoder_1"].n_trained == te1_trained
    assert on.components["text_encoder_1"].n_total == te1_total
    assert on.components["text_encoder_2"].n_trained == on.components["text_encoder_2"].n_total == 694_659_840
    assert on.components["unet"].n_trained == SDXL_UNET
    only = P.select_trainable(sdxl_meta, PartsSection(text_encoder="only", unet="unet63"))
    assert only.components["unet"].n_trained == 0 and only.param_groups["unet"] == []
    assert only.components["text_encoder_1"].n_trained == te1_trained


def test_te_modes_flags_and_gradients(toy):
    plan = P.select_trainable(toy, PartsSection(text_encoder="on"))
    te1 = _trains(toy.text_encoder_1)
    frozen1 = {n for n, t in te1.items() if not t}
    last = toy.text_encoder_1.config.num_hidden_layers - 1
    assert frozen1 == {n for n in te1 if n.startswith((f"encoder.layers.{last}.", "final_layer_norm."))
                       or n.startswith((f"text_model.encoder.layers.{last}.", "text_model.final_layer_norm."))}
    assert frozen1 and all(_trains(toy.text_encoder_2).values())  # te2's last layer / norm / projection train
    assert not any(_trains(toy.vae).values())
    trained_names = {n for n, _ in plan.components["text_encoder_1"].trained}
    assert trained_names.isdisjoint(frozen1)
    # te2's (bigG) fused attention: q, k and v all map to the one SGM in_proj key
    sgm = dict(plan.components["text_encoder_2"].trained)
    assert sgm["text_model.encoder.layers.0.self_attn.k_proj.weight"].endswith("resblocks.0.attn.in_proj_weight")
    # gradients flow where expected (SDXL's conditioning: penultimate states + te2's pooled projection)
    ids = torch.tensor([[1, 5, 7, 2]])
    out1 = toy.text_encoder_1(ids, output_hidden_states=True)
    out2 = toy.text_encoder_2(ids, output_hidden_states=True)
    (out1.hidden_states[-2].sum() + out2.hidden_states[-2].sum() + out2.text_embeds.sum()).backward()
    for name, p in toy.text_encoder_1.named_parameters():
        assert (p.grad is not None) == (name not in frozen1), name
    assert all(p.grad is not None for p in toy.text_encoder_2.parameters())
    toy.text_encoder_1.zero_grad(set_to_none=True)
    toy.text_encoder_2.zero_grad(set_to_none=True)

    P.select_trainable(toy, PartsSection(text_encoder="off"))
    assert not any(_trains(toy.text_encoder_1).values()) and not any(_trains(toy.text_encoder_2).values())
    assert all(_trains(toy.unet).values())


def test_encoder_with_zero_lr_stays_frozen(toy, caplog):
    with caplog.at_level("INFO", logger="tunelab.train.parts"):
        plan = P.select_trainable(toy, PartsSection(text_encoder="on"),
                                  OptimSection(lr_text_encoder_1=0, lr_text_encoder_2=1e-5))
    assert plan.components["text_encoder_1"].n_trained == 0 and plan.param_groups["text_encoder_1"] == []
    assert plan.components["text_encoder_2"].n_trained > 0
    assert "te1 (CLIP-L) stays frozen: optim.lr_text_encoder_1 is 0" in caplog.text


def test_include_and_exclude_patterns(toy):
    plan = P.select_trainable(toy, PartsSection(unet="unet63", unet_include=["output_blocks.0.1"],
                                                unet_exclude=["model.diffusion_model.output_blocks.*.1.*attn2*"]))
    rel = {s.removeprefix("model.diffusion_model.") for _, s in plan.components["unet"].trained}
    assert any(k.startswith("output_blocks.0.1.") and "attn1" in k for k in rel)  # included back
    assert not any("attn2" in k and k.startswith("output_blocks.") for k in rel)  # excluded after include
    assert any("attn2" in k and k.startswith("input_blocks.") for k in rel)
    assert not any(k.startswith("input_blocks.8.") for k in rel)  # preset still applies
    assert sum(p.numel() for p in plan.param_groups["unet"]) == plan.components["unet"].n_trained


def test_pattern_matching_nothing_is_an_error(toy):
    with pytest.raises(TunelabError, match="unet_exclude.*outputblocks"):
        P.select_trainable(toy, PartsSection(unet_exclude=["outputblocks.*"]))


def test_block_lr_names():
    assert len(P.BLOCK_LR_NAMES) == 23
    cases = {"time_embed.0.weight": "BASE", "label_emb.0.2.bias": "BASE", "input_blocks.0.0.weight": "IN00",
             "input_blocks.8.1.proj_in.weight": "IN08", "middle_block.0.in_layers.0.weight": "MID00",
             "middle_block.1.norm.weight": "MID01", "middle_block.2.skip.weight": "MID02",
             "output_blocks.2.2.conv.weight": "OUT02", "output_blocks.8.0.out_layers.3.bias": "OUT08",
             "out.2.weight": "OUT"}
    assert {k: P.block_lr_name(k) for k in cases} == cases
    assert P.BLOCK_LR_NAMES is vocab.KOHYA_BLOCKS


def _old_block_lr_name(rel_key: str) -> str | None:
    """parts.py's hand-written placement before the ids moved to models/vocab.py (kohya's sdxl_train:
    0 embeddings, 1 + input index, 10 + middle index, 13 + output index, 22 out)."""
    head, _, rest = rel_key.partition(".")
    if head in ("time_embed", "label_emb"):
        return "BASE"
    if head == "out":
        return "OUT"
    index = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else -1
    if head == "input_blocks" and 0 <= index <= 8:
        return f"IN{index:02d}"
    if head == "middle_block" and 0 <= index <= 2:
        return f"MID{index:02d}"
    if head == "output_blocks" and 0 <= index <= 8:
        return f"OUT{index:02d}"
    return None


def test_block_lr_names_unchanged_on_every_sdxl_key():
    from sd_mecha.extensions import model_configs

    unet = [k.removeprefix("model.diffusion_model.") for k in model_configs.resolve("sdxl-sgm").keys()
            if k.startswith("model.diffusion_model.")]
    placed = {k: P.block_lr_name(k) for k in unet}
    assert placed == {k: _old_block_lr_name(k) for k in unet}
    assert set(placed.values()) == set(vocab.KOHYA_BLOCKS)  # all 23 groups exist on SDXL


@pytest.mark.parametrize("rel", ["input_blocks.9.0.op.weight", "middle_block.3.weight", "some_future_layer.weight"])
def test_block_lr_name_refuses_non_sdxl_keys(rel):
    assert _old_block_lr_name(rel) is None
    with pytest.raises(TunelabError, match="has no kohya block-LR id; train.parts.block_lrs needs an SDXL-layout UNet"):
        P.block_lr_name(rel)


def test_block_lrs_make_groups_and_freeze(toy):
    lrs = [1.0] * 23
    lrs[vocab.kohya_index("in4")] = 0.0  # freezes input_blocks.4
    lrs[vocab.kohya_index(22)] = 2.0  # OUT
    lrs[vocab.kohya_index("MID01")] = 0.5
    plan = P.select_trainable(toy, PartsSection(block_lrs=lrs))
    assert "IN04" not in plan.unet_blocks
    assert not any(s.startswith("model.diffusion_model.input_blocks.4.") for _, s in plan.components["unet"].trained)
    assert list(plan.unet_blocks)[0] == "BASE" and list(plan.unet_blocks)[-1] == "OUT"
    assert len(plan.unet_blocks) == 22
    assert plan.block_multipliers["OUT"] == 2.0 and plan.block_multipliers["MID01"] == 0.5
    assert plan.unet_blocks["OUT"] == [toy.unet.conv_norm_out.weight, toy.unet.conv_norm_out.bias,
                                       toy.unet.conv_out.weight, toy.unet.conv_out.bias]
    in_blocks = sum(len(v) for v in plan.unet_blocks.values())
    assert in_blocks == len(plan.param_groups["unet"])


def test_banner_rows(sdxl_meta):
    rows = P.banner_rows(P.select_trainable(sdxl_meta, PartsSection(unet="unet63")))
    assert rows[0].split() == ["unet", "1,629,562,564", "/", "2,567,463,684", "(63.47", "%)"]
    assert [r[:15].rstrip() for r in rows] == ["unet", "te1 (CLIP-L)", "te2 (bigG)", "vae", "all"]
    assert rows[1] == "te1 (CLIP-L)                0 /   123,060,480 (0.00 %)"  # text_encoder = off
