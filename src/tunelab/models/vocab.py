"""The names tunelab shows and accepts for model components and UNet blocks: one table each.

Components. The text encoders are counted from 1, as kohya (`--learning_rate_te1/te2`), the run
file (`optim.lr_text_encoder_1/2`) and the module names (`text_encoder_1/2`) count them:

    id     module          SGM prefix                 label          sd-mecha   notebook (0-based)
    te1    text_encoder_1  conditioner.embedders.0.   te1 (CLIP-L)   clip_l     te0
    te2    text_encoder_2  conditioner.embedders.1.   te2 (bigG)     clip_g     te1
    unet   unet            model.diffusion_model.     unet           diffuser   unet
    vae    vae             first_stage_model.         vae            vae        vae
    other  -               anything else              other          -          other

`module_prefix` is where the module's own weights start (`conditioner.embedders.0.transformer.`,
`conditioner.embedders.1.model.`); `tunelab.models.keys` builds its key map on it. The field's
weight-shift notebook numbers the encoders from 0 (its `te0` is CLIP-L, its `te1` is bigG), so its
`te1` is our `te2`. `parse_component` refuses `te0` with that explanation instead of guessing;
`parse_component(name, zero_based=True)` (or `from_notebook`) reads the notebook's names.

UNet blocks come in three schemes (`BLOCK_IDS`), each the ids of one tool:

    kohya  23 block-LR ids of kohya's `--block_lr`, index 0..22: BASE (time/label embeddings),
           IN00-IN08, MID00-MID02 (middle ResBlock, transformer, ResBlock), OUT00-OUT08, OUT
           (final norm + conv)
    unet   21 blocks of drift and `model inspect`: EMB, IN00-IN08, M00 (whole middle), OUT00-OUT08,
           FINAL
    merge  21 blocks of supermerger / sd-mecha's `sdxl-supermerger_blocks`: BASE (text encoders and
           embeddings), IN00-IN08, M00, OUT00-OUT08 (OUT08 includes the final layers), VAE

`parse_block` reads what a user types: any case, `IN4` / `IN04` / `in_04`, `MID` / `M0` for `M00`,
spellings that name the same tensors in another tool (`EMB` for kohya's `BASE`, `FINAL` for
kohya's `OUT`), and kohya's index 0..22. Spellings whose meaning differs between tools are refused
with the reason (`M00` in the kohya scheme: kohya splits the middle block in three; `BASE` in the
unet scheme: supermerger's BASE also holds the text encoders). Every error lists the allowed ids.
Which key belongs to which block is `tunelab.models.blocks` (pure functions of the key name).

Hand-written: the names are the field's conventions, which no library collects in one place.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Component:
    id: str  # what tunelab shows and accepts: "te1"
    module: str  # attribute of tunelab.models.arch.Components: "text_encoder_1"
    prefix: str  # SGM prefix that groups the component's keys: "conditioner.embedders.0."
    module_prefix: str  # where the module's own weights start: "conditioner.embedders.0.transformer."
    model: str  # the network, short: "CLIP-L"
    mecha: str  # sd-mecha's component name in its `sdxl-sgm` config: "clip_l"
    notebook: str  # the weight-shift notebook's 0-based name: "te0"

    @property
    def label(self) -> str:
        """Display label: `te1 (CLIP-L)`; `unet` and `vae` need no explanation."""
        return f"{self.id} ({self.model})" if self.model != self.id else self.id


COMPONENT_TABLE: tuple[Component, ...] = (
    Component("te1", "text_encoder_1", "conditioner.embedders.0.", "conditioner.embedders.0.transformer.",
              "CLIP-L", "clip_l", "te0"),
    Component("te2", "text_encoder_2", "conditioner.embedders.1.", "conditioner.embedders.1.model.",
              "bigG", "clip_g", "te1"),
    Component("unet", "unet", "model.diffusion_model.", "model.diffusion_model.", "unet", "diffuser", "unet"),
    Component("vae", "vae", "first_stage_model.", "first_stage_model.", "vae", "vae", "vae"),
)
OTHER_COMPONENT = "other"  # keys no component prefix matches (noise-schedule buffers, v_pred, ...)
COMPONENTS: tuple[str, ...] = (*(c.id for c in COMPONENT_TABLE), OTHER_COMPONENT)
_BY_ID = {c.id: c for c in COMPONENT_TABLE}
_BY_MODULE = {c.module: c for c in COMPONENT_TABLE}


def _norm(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


# every accepted spelling (normalised) -> id; "te0" is deliberately absent (see parse_component)
_COMPONENT_ALIASES: dict[str, str] = {OTHER_COMPONENT: OTHER_COMPONENT} | {
    _norm(alias): c.id for c in COMPONENT_TABLE for alias in (c.id, c.module, c.mecha, c.model)}
_NOTEBOOK = {c.notebook: c.id for c in COMPONENT_TABLE} | {OTHER_COMPONENT: OTHER_COMPONENT}


def component(name: str) -> Component:
    """The table row of a component id (`te1`) or module name (`text_encoder_1`)."""
    row = _BY_ID.get(name) or _BY_MODULE.get(name)
    if row is None:
        raise KeyError(f"no component {name!r}; components: {', '.join(c.id for c in COMPONENT_TABLE)}")
    return row


def label(name: str) -> str:
    """Display label of a component id or module name: `label("te1") == label("text_encoder_1") ==
    "te1 (CLIP-L)"`. Any other name (`other`, drift's `all`) is shown as it is."""
    row = _BY_ID.get(name) or _BY_MODULE.get(name)
    return row.label if row else name


def from_notebook(name: str) -> str:
    """The weight-shift notebook's 0-based component name -> ours: te0 -> te1, te1 -> te2."""
    try:
        return _NOTEBOOK[name.strip().lower()]
    except KeyError:
        raise TunelabError(f"{name!r} is not a component name of the weight-shift notebook; "
                           f"it uses {', '.join(_NOTEBOOK)}") from None


def parse_component(text: str, zero_based: bool = False) -> str:
    """What a user typed -> component id. Accepts the id, the module name, sd-mecha's name and the
    network's name in any case (`TE1`, `text_encoder_1`, `clip_l`, `CLIP-L`; `te2`, `clip_g`, `bigG`).

    `te0` is refused: it is the notebook's 0-based name for CLIP-L, and the same habit would read
    `te1` as bigG, so guessing would silently pick the wrong encoder for half of the inputs. With
    `zero_based=True` the input is read the notebook's way (te0 = CLIP-L, te1 = bigG).
    """
    if zero_based:
        return from_notebook(text)
    key = _norm(text)
    if key in _COMPONENT_ALIASES:
        return _COMPONENT_ALIASES[key]
    allowed = ", ".join(COMPONENTS)
    if key == "te0":
        raise TunelabError(f"{text!r}: tunelab counts the text encoders from 1 like kohya and the run file "
                           "(optim.lr_text_encoder_1/2): te1 = CLIP-L (the weight-shift notebook's te0), "
                           "te2 = bigG (the notebook's te1); components: " + allowed)
    raise TunelabError(f"unknown component {text!r}{_hint(key, _COMPONENT_ALIASES)}; components: {allowed} "
                       "(also the module names text_encoder_1/2 and sd-mecha's clip_l/clip_g/diffuser)")


# --- UNet blocks -----------------------------------------------------------------------------------

SDXL_INPUT_BLOCKS = 9
SDXL_MIDDLE_PARTS = 3  # ResBlock, transformer, ResBlock: kohya gives each its own LR
SDXL_OUTPUT_BLOCKS = 9
_IN = tuple(f"IN{i:02d}" for i in range(SDXL_INPUT_BLOCKS))
_OUT = tuple(f"OUT{i:02d}" for i in range(SDXL_OUTPUT_BLOCKS))

KOHYA_BLOCKS: tuple[str, ...] = ("BASE", *_IN, *(f"MID{i:02d}" for i in range(SDXL_MIDDLE_PARTS)), *_OUT, "OUT")
UNET_BLOCKS: tuple[str, ...] = ("EMB", *_IN, "M00", *_OUT, "FINAL")
MERGE_BLOCKS: tuple[str, ...] = ("BASE", *_IN, "M00", *_OUT, "VAE")
BLOCK_IDS: dict[str, tuple[str, ...]] = {"kohya": KOHYA_BLOCKS, "unet": UNET_BLOCKS, "merge": MERGE_BLOCKS}
_SCHEME_NAMES = {"kohya": "kohya block-LR id", "unet": "UNet block", "merge": "merge block"}

_NUMBERED = re.compile(r"(IN|OUT|MID|M)[\s_\-]*(\d{1,2})")
_MIDDLE_WORDS = ("MID", "MIDDLE", "M")
_EMB_WORDS = ("EMB", "EMBEDDING", "EMBEDDINGS")
# spellings that name the same tensors as an id of the scheme
_WORDS: dict[str, dict[str, str]] = {
    "kohya": {**dict.fromkeys(("BASE", *_EMB_WORDS), "BASE"), "OUT": "OUT", "FINAL": "OUT"},
    "unet": {**dict.fromkeys(_EMB_WORDS, "EMB"), **dict.fromkeys(_MIDDLE_WORDS, "M00"), "FINAL": "FINAL"},
    "merge": {"BASE": "BASE", **dict.fromkeys(_MIDDLE_WORDS, "M00"), "VAE": "VAE"},
}
_KOHYA_SPLIT = ("kohya's block LRs split the middle block in three: "
                "MID00 (ResBlock), MID01 (transformer), MID02 (ResBlock)")
# spellings whose meaning differs between the tools: refused, with the reason
_REFUSED: dict[str, dict[str, str]] = {
    "kohya": {**dict.fromkeys(_MIDDLE_WORDS, _KOHYA_SPLIT), "VAE": "the VAE never trains"},
    "unet": {"BASE": "BASE is kohya's name for EMB and supermerger's for EMB plus the text encoders; here it is EMB",
             "OUT": "OUT alone is kohya's id for the final out.* layers; here they are FINAL",
             "VAE": "the VAE is a component, not a UNet block"},
    "merge": {**dict.fromkeys(_EMB_WORDS, "the time/label embeddings belong to BASE in merge blocks"),
              "FINAL": "the final out.* layers belong to OUT08 in merge blocks",
              "OUT": "the final out.* layers belong to OUT08 in merge blocks"},
}


def block_ids(scheme: str) -> tuple[str, ...]:
    """The ids of one scheme (`kohya`, `unet`, `merge`) in forward order."""
    try:
        return BLOCK_IDS[scheme]
    except KeyError:
        raise ValueError(f"unknown block scheme {scheme!r}; schemes: {', '.join(BLOCK_IDS)}") from None


def parse_block(text: str | int, scheme: str = "unet") -> str:
    """What a user typed -> the block id of `scheme`; a TunelabError that lists the allowed ids otherwise.

    `parse_block("in4") == "IN04"`, `parse_block("mid") == "M00"`, `parse_block(10, "kohya") ==
    "MID00"`, `parse_block("emb", "kohya") == "BASE"`; every id parses to itself.
    """
    ids = block_ids(scheme)
    what = _SCHEME_NAMES[scheme]
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise TunelabError(f"{what} {text!r} must be a name like IN04; allowed: {_allowed(scheme)}")
    raw = str(text).strip()
    if raw.isdigit():
        return _by_index(int(raw), scheme)
    word = raw.upper()
    if m := _NUMBERED.fullmatch(word):
        block = _numbered(m[1], int(m[2]), scheme, raw)
    else:
        block = _WORDS[scheme].get(word)
    if block is None and word in _REFUSED[scheme]:
        raise TunelabError(f"{what} {raw!r}: {_REFUSED[scheme][word]}; allowed: {_allowed(scheme)}")
    if block is None:
        raise TunelabError(f"unknown {what} {raw!r}{_hint(word, ids)}; allowed: {_allowed(scheme)}")
    return block


def parse_blocks(items: str | Iterable[str | int], scheme: str = "unet") -> list[str]:
    """A comma-separated string or a list of blocks -> their ids (in the given order)."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    return [parse_block(item, scheme) for item in items]


def kohya_index(block: str | int) -> int:
    """Position 0..22 of a kohya block-LR id in `--block_lr` (any spelling `parse_block` accepts)."""
    return KOHYA_BLOCKS.index(parse_block(block, "kohya"))


def _by_index(n: int, scheme: str) -> str:
    if scheme != "kohya":
        raise TunelabError(f"{n} is a kohya block-LR index; {scheme} blocks go by name; "
                           f"allowed: {_allowed(scheme)}")
    if not 0 <= n < len(KOHYA_BLOCKS):
        raise TunelabError(f"kohya block-LR index {n} is out of range 0..{len(KOHYA_BLOCKS) - 1}; "
                           f"allowed: {_allowed('kohya')}")
    return KOHYA_BLOCKS[n]


def _numbered(side: str, n: int, scheme: str, raw: str) -> str:
    what = _SCHEME_NAMES[scheme]
    if side in ("IN", "OUT"):
        count = SDXL_INPUT_BLOCKS if side == "IN" else SDXL_OUTPUT_BLOCKS
        if n >= count:
            raise TunelabError(f"{what} {raw!r}: SDXL has {side}00-{side}{count - 1:02d}; allowed: {_allowed(scheme)}")
        return f"{side}{n:02d}"
    if scheme == "kohya":
        if side == "M":
            raise TunelabError(f"{what} {raw!r}: M00 is the whole middle block in unet and merge blocks; "
                               f"{_KOHYA_SPLIT}; allowed: {_allowed(scheme)}")
        if n >= SDXL_MIDDLE_PARTS:
            raise TunelabError(f"{what} {raw!r}: {_KOHYA_SPLIT}; allowed: {_allowed(scheme)}")
        return f"MID{n:02d}"
    if side == "MID":
        raise TunelabError(f"{what} {raw!r}: MID00-MID02 are kohya's thirds of the middle block; "
                           f"{scheme} blocks keep it whole: M00; allowed: {_allowed(scheme)}")
    if n != 0:
        raise TunelabError(f"{what} {raw!r}: the middle block is one block, M00; allowed: {_allowed(scheme)}")
    return "M00"


def _allowed(scheme: str) -> str:
    ids = BLOCK_IDS[scheme]
    if scheme == "kohya":
        return ", ".join(f"{i} {b}" for i, b in enumerate(ids))
    return ", ".join(ids)


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
