"""The one vocabulary: component table and labels, the notebook's 0-based names, and the block-id
parser of all three schemes (hand-written tables, every id round trip, errors that teach)."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.models import blocks, keys, vocab
from tunelab.models.vocab import parse_block, parse_component

# --- components -------------------------------------------------------------------------------------


def test_component_table_by_hand():
    rows = {c.id: (c.module, c.prefix, c.module_prefix, c.label, c.mecha, c.notebook) for c in vocab.COMPONENT_TABLE}
    assert rows == {
        "te1": ("text_encoder_1", "conditioner.embedders.0.", "conditioner.embedders.0.transformer.", "te1 (CLIP-L)",
                "clip_l", "te0"),
        "te2": ("text_encoder_2", "conditioner.embedders.1.", "conditioner.embedders.1.model.", "te2 (bigG)",
                "clip_g", "te1"),
        "unet": ("unet", "model.diffusion_model.", "model.diffusion_model.", "unet", "diffuser", "unet"),
        "vae": ("vae", "first_stage_model.", "first_stage_model.", "vae", "vae", "vae"),
    }
    assert vocab.COMPONENTS == blocks.COMPONENTS == ("te1", "te2", "unet", "vae", "other")


def test_keys_prefixes_derive_from_the_table():
    assert keys.PREFIXES == {"text_encoder_1": "conditioner.embedders.0.transformer.",
                             "text_encoder_2": "conditioner.embedders.1.model.",
                             "unet": "model.diffusion_model.", "vae": "first_stage_model."}
    for module, prefix in keys.PREFIXES.items():  # a module's weights group under its own component
        assert blocks.component_of(prefix + "x.weight") == vocab.component(module).id
    assert (keys.TE1, keys.TE2) == (keys.PREFIXES["text_encoder_1"], keys.PREFIXES["text_encoder_2"])


def test_every_key_rule_lands_in_its_component():
    """The key map's module name and blocks.component_of agree on every key of the toy preset."""
    for rule in keys.rules_for_arch("toy"):
        assert blocks.component_of(rule.sgm) == vocab.component(rule.component).id, rule.sgm


@pytest.mark.parametrize(
    ("name", "shown"),
    [("te1", "te1 (CLIP-L)"), ("text_encoder_1", "te1 (CLIP-L)"), ("te2", "te2 (bigG)"),
     ("text_encoder_2", "te2 (bigG)"), ("unet", "unet"), ("vae", "vae"), ("other", "other"), ("all", "all")],
)
def test_label(name, shown):
    assert vocab.label(name) == shown


@pytest.mark.parametrize(
    ("typed", "cid"),
    [("te1", "te1"), ("TE1", "te1"), (" text_encoder_1 ", "te1"), ("clip_l", "te1"), ("CLIP-L", "te1"),
     ("te2", "te2"), ("Text-Encoder-2", "te2"), ("clip_g", "te2"), ("bigG", "te2"), ("UNet", "unet"),
     ("diffuser", "unet"), ("VAE", "vae"), ("other", "other")],
)
def test_parse_component(typed, cid):
    assert parse_component(typed) == cid


def test_every_component_round_trips():
    for c in vocab.COMPONENT_TABLE:
        assert parse_component(c.id) == parse_component(c.module) == parse_component(c.mecha) == c.id
        assert parse_component(c.notebook, zero_based=True) == vocab.from_notebook(c.notebook) == c.id


def test_zero_based_te0_is_refused_with_the_mapping():
    with pytest.raises(TunelabError) as err:
        parse_component("te0")
    msg = str(err.value)
    assert "te1 = CLIP-L (the weight-shift notebook's te0)" in msg and "te2 = bigG (the notebook's te1)" in msg
    assert "lr_text_encoder_1/2" in msg and "components: te1, te2, unet, vae, other" in msg


def test_notebook_names():
    assert {n: vocab.from_notebook(n) for n in ("te0", "te1", "unet", "vae", "other", "TE0")} == {
        "te0": "te1", "te1": "te2", "unet": "unet", "vae": "vae", "other": "other", "TE0": "te1"}
    with pytest.raises(TunelabError, match="uses te0, te1, unet, vae, other"):
        vocab.from_notebook("te2")  # the notebook has no te2


def test_unknown_component_names_the_allowed_ones():
    with pytest.raises(TunelabError, match=r"unknown component 'tee1' \(did you mean te1\?\); components: te1, te2"):
        parse_component("tee1")
    with pytest.raises(KeyError, match="components: te1, te2, unet, vae"):
        vocab.component("te0")


# --- blocks -------------------------------------------------------------------------------------------

_IN = [f"IN{i:02d}" for i in range(9)]
_OUT = [f"OUT{i:02d}" for i in range(9)]


def test_block_lists_by_hand():
    assert list(vocab.KOHYA_BLOCKS) == ["BASE", *_IN, "MID00", "MID01", "MID02", *_OUT, "OUT"]
    assert list(vocab.UNET_BLOCKS) == ["EMB", *_IN, "M00", *_OUT, "FINAL"]
    assert list(vocab.MERGE_BLOCKS) == ["BASE", *_IN, "M00", *_OUT, "VAE"]
    assert len(vocab.KOHYA_BLOCKS) == 23 and blocks.UNET_BLOCKS == vocab.UNET_BLOCKS


def test_merge_blocks_are_sd_mechas():
    from sd_mecha.extensions import model_configs

    assert list(model_configs.resolve("sdxl-supermerger_blocks").keys()) == list(vocab.MERGE_BLOCKS)


@pytest.mark.parametrize("scheme", list(vocab.BLOCK_IDS))
def test_every_block_id_round_trips(scheme):
    for block in vocab.block_ids(scheme):
        assert parse_block(block, scheme) == block
        assert parse_block(block.lower(), scheme) == block
    if scheme == "kohya":
        for i, block in enumerate(vocab.KOHYA_BLOCKS):
            assert parse_block(i, "kohya") == parse_block(str(i), "kohya") == block
            assert vocab.kohya_index(block) == vocab.kohya_index(i) == i


@pytest.mark.parametrize(
    ("typed", "scheme", "block"),
    [
        ("IN0", "unet", "IN00"), ("in00", "unet", "IN00"), ("In_4", "unet", "IN04"), ("in-8", "merge", "IN08"),
        ("out 3", "unet", "OUT03"), ("OUT8", "kohya", "OUT08"), (" emb ", "unet", "EMB"),
        ("embeddings", "unet", "EMB"), ("M00", "unet", "M00"), ("m0", "unet", "M00"), ("MID", "unet", "M00"),
        ("middle", "merge", "M00"), ("final", "unet", "FINAL"), ("base", "merge", "BASE"), ("vae", "merge", "VAE"),
        ("mid0", "kohya", "MID00"), ("MID_2", "kohya", "MID02"), ("emb", "kohya", "BASE"),
        ("FINAL", "kohya", "OUT"), ("out", "kohya", "OUT"), (0, "kohya", "BASE"), ("1", "kohya", "IN00"),
        (10, "kohya", "MID00"), (12, "kohya", "MID02"), (13, "kohya", "OUT00"), ("22", "kohya", "OUT"),
    ],
)
def test_parse_block_spellings(typed, scheme, block):
    assert parse_block(typed, scheme) == block


def test_parse_blocks_lists_and_strings():
    assert vocab.parse_blocks("in4, IN05,mid ,", "unet") == ["IN04", "IN05", "M00"]
    assert vocab.parse_blocks([0, "in4", "MID01", 22], "kohya") == ["BASE", "IN04", "MID01", "OUT"]


@pytest.mark.parametrize(
    ("typed", "scheme", "says"),
    [
        ("M00", "kohya", "split the middle block in three: MID00 (ResBlock), MID01 (transformer), MID02"),
        ("mid", "kohya", "split the middle block in three"),
        ("MID03", "kohya", "split the middle block in three"),
        ("MID01", "unet", "MID00-MID02 are kohya's thirds of the middle block; unet blocks keep it whole: M00"),
        ("M01", "merge", "the middle block is one block, M00"),
        ("BASE", "unet", "here it is EMB"),
        ("OUT", "unet", "kohya's id for the final out.* layers; here they are FINAL"),
        ("FINAL", "merge", "belong to OUT08"),
        ("emb", "merge", "embeddings belong to BASE"),
        ("VAE", "unet", "not a UNet block"),
        ("VAE", "kohya", "never trains"),
        ("IN09", "unet", "SDXL has IN00-IN08"),
        ("out12", "merge", "SDXL has OUT00-OUT08"),
        (23, "kohya", "index 23 is out of range 0..22"),
        (4, "unet", "4 is a kohya block-LR index; unet blocks go by name"),
        ("IMN04", "unet", "unknown UNet block 'IMN04'"),
        ("", "unet", "unknown UNet block ''"),
        (True, "kohya", "must be a name like IN04"),
        (1.5, "kohya", "must be a name like IN04"),
    ],
)
def test_bad_blocks_are_errors_that_teach(typed, scheme, says):
    with pytest.raises(TunelabError) as err:
        parse_block(typed, scheme)
    msg = str(err.value)
    assert says in msg
    allowed = "0 BASE, 1 IN00" if scheme == "kohya" else ", ".join(vocab.block_ids(scheme))
    assert "allowed: " + allowed in msg


def test_unknown_block_gets_a_nearest_match():
    with pytest.raises(TunelabError, match=r"did you mean FINAL\?"):
        parse_block("FINALE", "unet")


def test_unknown_scheme():
    with pytest.raises(ValueError, match="schemes: kohya, unet, merge"):
        parse_block("IN00", "supermerger")
