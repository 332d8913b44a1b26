"""Where a tensor lives in an SGM single-file checkpoint: component, UNet block, layer kind.

Pure functions of the key name (no tensors, no model), so they work on any file of the SGM layout
(SDXL, the toy preset, SD1-style UNets with more blocks) and on sd-mecha's key lists. Drift
grouping uses them today; partial-UNet presets and per-block merge ratios use them tomorrow.

Components (first prefix that matches):

    te0    conditioner.embedders.0.   CLIP ViT-L text encoder
    te1    conditioner.embedders.1.   OpenCLIP ViT-bigG text encoder
    unet   model.diffusion_model.
    vae    first_stage_model.
    other  anything else (noise-schedule buffers such as `alphas_cumprod`, `v_pred` flags, ...)

UNet blocks, in forward order (`UNET_BLOCKS`: 21 ids for SDXL's 9 input and 9 output blocks):

    EMB          time_embed.*, label_emb.*          (kohya block-LR id 0, "embeddings")
    IN00..IN08   input_blocks.N.*                   (kohya 1..9)
    M00          middle_block.* (all three parts)   (kohya 10..12 split it in three)
    OUT00..OUT08 output_blocks.N.*                  (kohya 13..21)
    FINAL        out.* (final norm and conv)        (kohya 22, "out")

kohya's 23 block-LR ids are these 21 with the middle block split into its ResBlock, transformer and
ResBlock; drift keeps the middle block whole (`M00`), as supermerger and sd-mecha name it.

`merge_block_of` gives the coarser supermerger/sd-mecha block ids (BASE, IN00.., M00, OUT00..,
VAE) that sd-mecha's `sdxl-supermerger_blocks` config uses, for per-block merge ratios.

Kinds: `self-attention` (transformer `attn1`), `cross-attention` (`attn2`, the text-conditioned
one), `other`. Only the UNet's transformer blocks use these names; text-encoder and VAE attention
counts as `other`, because the question the split answers is "did the UNet change how it reads the
prompt (attn2) or how it looks at itself (attn1)".
"""

from __future__ import annotations

import re

COMPONENT_PREFIXES: dict[str, str] = {
    "te0": "conditioner.embedders.0.",
    "te1": "conditioner.embedders.1.",
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
}
COMPONENTS: tuple[str, ...] = ("te0", "te1", "unet", "vae", "other")

SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
OTHER = "other"
KINDS: tuple[str, ...] = (SELF_ATTENTION, CROSS_ATTENTION, OTHER)

EMB = "EMB"
MIDDLE = "M00"
FINAL = "FINAL"
SDXL_INPUT_BLOCKS = 9
SDXL_OUTPUT_BLOCKS = 9
# The SDXL block ids in forward order; files with more blocks (SD1: 12 + 12) get IN09.. as well,
# and `block_order` sorts those correctly too.
UNET_BLOCKS: tuple[str, ...] = (
    EMB,
    *(f"IN{i:02d}" for i in range(SDXL_INPUT_BLOCKS)),
    MIDDLE,
    *(f"OUT{i:02d}" for i in range(SDXL_OUTPUT_BLOCKS)),
    FINAL,
)

_UNET = COMPONENT_PREFIXES["unet"]
_BLOCK_RE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
_ATTN_RE = re.compile(r"\.attn([12])\.")


def component_of(key: str) -> str:
    """`te0` | `te1` | `unet` | `vae` | `other` for an SGM key."""
    for name, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return name
    return "other"


def unet_block_of(key: str) -> str | None:
    """The UNet block id of a key (`EMB`, `IN00`.., `M00`, `OUT00`.., `FINAL`); None outside the UNet.

    A UNet key that fits none of the known places (a future layer) is reported under its first
    name segment upper-cased, so nothing is silently merged into a neighbouring block.
    """
    if not key.startswith(_UNET):
        return None
    rest = key[len(_UNET):]
    if m := _BLOCK_RE.match(rest):
        side = "IN" if m[1] == "input_blocks" else "OUT"
        return f"{side}{int(m[2]):02d}"
    head = rest.split(".", 1)[0]
    if head == "middle_block":
        return MIDDLE
    if head in ("time_embed", "label_emb"):
        return EMB
    if head == "out":
        return FINAL
    return head.upper()


def kind_of(key: str) -> str:
    """`self-attention` (UNet `attn1`), `cross-attention` (UNet `attn2`) or `other`."""
    if not key.startswith(_UNET):
        return OTHER
    m = _ATTN_RE.search(key)
    if m is None:
        return OTHER
    return SELF_ATTENTION if m[1] == "1" else CROSS_ATTENTION


def merge_block_of(key: str) -> str:
    """The supermerger / sd-mecha `sdxl-supermerger_blocks` id of a key.

    Same placement as sd-mecha's `convert_sdxl_blocks_to_sgm`: text encoders and the UNet's
    embeddings are `BASE`, the final `out.*` layers belong to `OUT08`, the VAE is `VAE`.
    """
    comp = component_of(key)
    if comp == "vae":
        return "VAE"
    if comp != "unet":
        return "BASE"
    block = unet_block_of(key)
    if block == EMB:
        return "BASE"
    if block == FINAL:
        return f"OUT{SDXL_OUTPUT_BLOCKS - 1:02d}"
    return block or "BASE"


def block_order(block: str) -> tuple[int, int]:
    """Sort key putting block ids in forward order (EMB, IN.., M00, OUT.., FINAL, unknown)."""
    if block == EMB:
        return (0, 0)
    if block.startswith("IN") and block[2:].isdigit():
        return (1, int(block[2:]))
    if block == MIDDLE:
        return (2, 0)
    if block.startswith("OUT") and block[3:].isdigit():
        return (3, int(block[3:]))
    if block == FINAL:
        return (4, 0)
    return (5, 0)
