"""Where a tensor lives in an SGM single-file checkpoint: component, UNet block, layer kind.

Pure functions of the key name (no tensors, no model), so they work on any file of the SGM layout
(SDXL, the toy preset, SD1-style UNets with more blocks) and on sd-mecha's key lists. Drift
grouping, `model inspect` and kohya block LRs (`train/parts.py`) use them; per-block merge ratios
tomorrow.

Components (first prefix that matches; the table and the names users see are `models/vocab.py`):

    te1    conditioner.embedders.0.   CLIP ViT-L text encoder        label "te1 (CLIP-L)"
    te2    conditioner.embedders.1.   OpenCLIP ViT-bigG text encoder label "te2 (bigG)"
    unet   model.diffusion_model.
    vae    first_stage_model.
    other  anything else (noise-schedule buffers such as `alphas_cumprod`, `v_pred` flags, ...)

(The field's weight-shift notebook calls the encoders te0 / te1; `vocab.from_notebook` converts.)

UNet blocks, in forward order (`UNET_BLOCKS`: 21 ids for SDXL's 9 input and 9 output blocks):

    EMB          time_embed.*, label_emb.*          (kohya block-LR id 0, "BASE")
    IN00..IN08   input_blocks.N.*                   (kohya 1..9)
    M00          middle_block.* (all three parts)   (kohya 10..12, MID00..MID02, split it in three)
    OUT00..OUT08 output_blocks.N.*                  (kohya 13..21)
    FINAL        out.* (final norm and conv)        (kohya 22, "OUT")

kohya's 23 block-LR ids (`kohya_block_of`) are these 21 with the middle block split into its
ResBlock, transformer and ResBlock; drift keeps the middle block whole (`M00`), as supermerger and
sd-mecha name it. `block_of(key, scheme)` gives a key's id in any of the three schemes.

`merge_block_of` gives the coarser supermerger/sd-mecha block ids (BASE, IN00.., M00, OUT00..,
VAE) that sd-mecha's `sdxl-supermerger_blocks` config uses, for per-block merge ratios.

Kinds: `self-attention` (transformer `attn1`), `cross-attention` (`attn2`, the text-conditioned
one), `other`. Only the UNet's transformer blocks use these names; text-encoder and VAE attention
counts as `other`, because the question the split answers is "did the UNet change how it reads the
prompt (attn2) or how it looks at itself (attn1)".
"""

from __future__ import annotations

import re

from tunelab.models import vocab
from tunelab.models.vocab import COMPONENTS, SDXL_INPUT_BLOCKS, SDXL_OUTPUT_BLOCKS, UNET_BLOCKS

# component id -> SGM prefix, from the one table in vocab.py
COMPONENT_PREFIXES: dict[str, str] = {c.id: c.prefix for c in vocab.COMPONENT_TABLE}

SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
OTHER = "other"
KINDS: tuple[str, ...] = (SELF_ATTENTION, CROSS_ATTENTION, OTHER)

EMB = "EMB"
MIDDLE = "M00"
FINAL = "FINAL"
# UNET_BLOCKS (vocab.py) are the SDXL block ids in forward order; files with more blocks (SD1:
# 12 + 12) get IN09.. as well, and `block_order` sorts those correctly too.

_UNET = COMPONENT_PREFIXES["unet"]
_NUMBERED_BLOCKS = frozenset(UNET_BLOCKS) - {EMB, MIDDLE, FINAL}  # IN00-08, OUT00-08: same ids in all schemes
_BLOCK_RE = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
_ATTN_RE = re.compile(r"\.attn([12])\.")


def component_of(key: str) -> str:
    """`te1` (CLIP-L) | `te2` (bigG) | `unet` | `vae` | `other` for an SGM key."""
    for name, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return name
    return vocab.OTHER_COMPONENT


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


def kohya_block_of(key: str) -> str | None:
    """The kohya block-LR id of a key (`BASE`, `IN00`.., `MID00`..`MID02`, `OUT00`.., `OUT`), placed as
    kohya's sdxl_train places parameters: `middle_block.N` -> MID0N, `out.*` -> OUT. None outside the
    UNet and for UNet keys an SDXL-layout UNet does not have (IN09, a future layer)."""
    block = unet_block_of(key)
    if block == EMB:
        return "BASE"
    if block == FINAL:
        return "OUT"
    if block == MIDDLE:
        part = key[len(_UNET) + len("middle_block."):].split(".", 1)[0]
        return f"MID{int(part):02d}" if part.isdigit() and int(part) < vocab.SDXL_MIDDLE_PARTS else None
    return block if block in _NUMBERED_BLOCKS else None


def block_of(key: str, scheme: str = "unet") -> str | None:
    """A key's block id in one of the three schemes of `vocab.BLOCK_IDS` (`kohya`, `unet`, `merge`)."""
    of = {"kohya": kohya_block_of, "unet": unet_block_of, "merge": merge_block_of}
    if scheme not in of:
        raise ValueError(f"unknown block scheme {scheme!r}; schemes: {', '.join(of)}")
    return of[scheme](key)


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


__all__ = ["COMPONENTS", "COMPONENT_PREFIXES", "KINDS", "UNET_BLOCKS", "SDXL_INPUT_BLOCKS", "SDXL_OUTPUT_BLOCKS",
           "EMB", "MIDDLE", "FINAL", "SELF_ATTENTION", "CROSS_ATTENTION", "OTHER", "component_of", "unet_block_of",
           "kohya_block_of", "merge_block_of", "block_of", "kind_of", "block_order"]
