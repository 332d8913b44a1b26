"""What trains: text-encoder mode, partial-UNet presets, name patterns, kohya block LRs.

Everything here works on SGM key names (`model.diffusion_model.input_blocks.8.1...`), mapped from
each module parameter through `tunelab.models.keys.build_rules`, so the same rules hold for the
`sdxl` and the `toy` preset (same topology, same names). `select_trainable` sets `requires_grad`
on every parameter and returns a `TrainablePlan`: what trains (module name, SGM key), exact counts,
and the parameter groups the optimizer gets -- trainable parameters only (the field's original
tool handed frozen ones to the optimizer and printed a misleading count).

Hand-written because no library knows the field's partial-UNet presets or SGM block names.

Order of the rules (each later step wins):
    1. text-encoder mode: off = UNet only; on = UNet + both encoders; only = encoders, UNet frozen.
       An encoder whose learning rate is 0 (when `optim` is passed) stays frozen.
    2. te1's (CLIP-L) last encoder layer and final layer norm are always frozen and uncounted: SDXL
       conditions on te1's penultimate hidden state, so they get no gradient. te2's (bigG) last
       layer, final norm and projection do train (the pooled, projected output uses them).
    3. UNet preset (`full`, `unet63`, `unet68`, `unet71`, below).
    4. `unet_include` patterns: matching UNet keys train as well.
    5. `unet_exclude` patterns: matching UNet keys are frozen.
    6. `block_lrs` (23 kohya multipliers of `lr_unet`): 0 freezes the block, any other value puts
       the block's trainable parameters in their own optimizer group `unet/<BLOCK>`.
   The VAE is always frozen.

Patterns are fnmatch patterns (`*` also crosses dots) on the SGM name relative to
`model.diffusion_model.` (`output_blocks.*.1.*`) or on the full SGM name. A pattern also matches
everything below it, so `output_blocks.0.1` selects that whole transformer. A pattern that matches
no UNet key is an error (a typo must not silently train the wrong thing).

Partial-UNet presets (DOMAIN.md "Partial UNet"; SGM names relative to `model.diffusion_model.`).
Input levels: level 0 = input_blocks.1-2, level 1 = .4-5, level 2 = .7-8 (slot .0 = ResBlock, .1 =
Transformer); Downsamples = input_blocks.3, .6. Middle: .0 and .2 ResBlocks, .1 Transformer. Output
level 2 = output_blocks.0-2, level 1 = .3-5, level 0 = .6-8; Upsamples = output_blocks.2.2, .5.2.
"#1 / #2" count from 1 within a level, so input level 2 ResBlock/Transformer #2 = input_blocks.8,
output level 2 ResBlock/Transformer #1 = output_blocks.0. Frozen sets:

    unet63  input_blocks.1.0 .2.0 .4.0 .5.0 (ResBlocks, input levels 0-1), input_blocks.3 .6
            (Downsamples), input_blocks.8.0 .8.1, middle_block.0 .2, output_blocks.0.0 .0.1,
            output_blocks.2.2 .5.2 (Upsamples), output_blocks.3.0-.8.0 (ResBlocks, output levels 1-0)
    unet68  unet63 minus input_blocks.4.0 .5.0 .8.0, output_blocks.0.0 .3.0 .4.0 .5.0
    unet71  unet68 minus middle_block.0 .2

Measured on the full `sdxl` preset (meta device), trainable / 2,567,463,684 UNet parameters:
full 2,567,463,684 (100 %), unet63 1,629,562,564 (63.47 %), unet68 1,764,781,124 (68.74 %),
unet71 1,827,058,244 (71.16 %) -- exactly the field's numbers. (output_blocks.1 has the same size
as output_blocks.0, so the counts alone cannot tell "#1" = .0 from .1; .0 follows the 1-based
numbering that "#2" = input_blocks.8 needs.)

kohya block LRs: 23 values, indices (as kohya's sdxl_train `--block_lr`)
    0 BASE = time_embed.*, label_emb.*; 1-9 IN00-IN08 = input_blocks.0-8 (conv_in is
    input_blocks.0.0 -> IN00); 10-12 MID00-MID02 = middle_block.0/.1/.2; 13-21 OUT00-OUT08 =
    output_blocks.0-8; 22 OUT = out.* (final norm + conv).
The ids and the parsing of typed ones are `tunelab.models.vocab` (`KOHYA_BLOCKS`, `kohya_index`,
`parse_block(..., "kohya")`); which key is in which block is `tunelab.models.blocks.kohya_block_of`.

Components are keyed by module name (`text_encoder_1`, as the optimizer groups and `lr/<group>`
tags); the banner shows them as `vocab.label` does: `te1 (CLIP-L)`, `te2 (bigG)`.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch

from tunelab.config import OptimSection, PartsSection
from tunelab.errors import TunelabError
from tunelab.models import vocab
from tunelab.models.arch import Components, load_arch
from tunelab.models.blocks import kohya_block_of
from tunelab.models.keys import TE1, UNET, build_rules

log = logging.getLogger(__name__)

TRAINABLE_COMPONENTS = ("unet", "text_encoder_1", "text_encoder_2")
ALL_COMPONENTS = ("unet", "text_encoder_1", "text_encoder_2", "vae")

_UNET63_FROZEN = (
    "input_blocks.1.0", "input_blocks.2.0", "input_blocks.4.0", "input_blocks.5.0",
    "input_blocks.3", "input_blocks.6",
    "input_blocks.8.0", "input_blocks.8.1",
    "middle_block.0", "middle_block.2",
    "output_blocks.0.0", "output_blocks.0.1",
    "output_blocks.2.2", "output_blocks.5.2",
    "output_blocks.3.0", "output_blocks.4.0", "output_blocks.5.0",
    "output_blocks.6.0", "output_blocks.7.0", "output_blocks.8.0",
)
_UNET68_TRAINED_TOO = ("input_blocks.4.0", "input_blocks.5.0", "input_blocks.8.0", "output_blocks.0.0",
                       "output_blocks.3.0", "output_blocks.4.0", "output_blocks.5.0")
_UNET68_FROZEN = tuple(b for b in _UNET63_FROZEN if b not in _UNET68_TRAINED_TOO)
_UNET71_FROZEN = tuple(b for b in _UNET68_FROZEN if b not in ("middle_block.0", "middle_block.2"))
# preset -> frozen SGM sub-blocks (relative to model.diffusion_model.); a prefix freezes all below it
UNET_PRESETS: dict[str, tuple[str, ...]] = {
    "full": (),
    "unet63": _UNET63_FROZEN,
    "unet68": _UNET68_FROZEN,
    "unet71": _UNET71_FROZEN,
}

# kohya's 23 block-LR ids in `--block_lr` order (BASE, IN00-08, MID00-02, OUT00-08, OUT)
BLOCK_LR_NAMES: tuple[str, ...] = vocab.KOHYA_BLOCKS


@dataclass
class ComponentPlan:
    """What trains in one component; counts are module parameter elements."""

    trained: list[tuple[str, str]] = field(default_factory=list)  # (module param name, SGM key)
    n_trained: int = 0
    n_total: int = 0

    @property
    def fraction(self) -> float:
        return self.n_trained / self.n_total if self.n_total else 0.0


@dataclass
class TrainablePlan:
    components: dict[str, ComponentPlan]
    # component -> trainable parameters only (empty list = component frozen)
    param_groups: dict[str, list[torch.nn.Parameter]]
    # block LRs: "BASE", "IN04", ... -> trainable UNet parameters of that block, and its multiplier
    # of lr_unet; empty when block LRs are off (then the UNet is one group).
    unet_blocks: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    block_multipliers: dict[str, float] = field(default_factory=dict)

    @property
    def n_trained(self) -> int:
        return sum(c.n_trained for c in self.components.values())

    def trained_keys(self) -> set[str]:
        """Every SGM key with at least one trained parameter."""
        return {sgm for c in self.components.values() for _, sgm in c.trained}


def block_lr_name(rel_key: str) -> str:
    """kohya block-LR id of a UNet SGM key relative to `model.diffusion_model.` (see module doc)."""
    block = kohya_block_of(UNET + rel_key)
    if block is None:
        raise TunelabError(f"UNet key {rel_key!r} has no kohya block-LR id; train.parts.block_lrs needs an "
                           "SDXL-layout UNet")
    return block


def _matches(rel_key: str, pattern: str) -> bool:
    """fnmatch on the relative or full SGM name; a pattern also selects everything below it."""
    pattern = pattern.removeprefix(UNET)
    return fnmatch.fnmatchcase(rel_key, pattern) or fnmatch.fnmatchcase(rel_key, pattern + ".*")


def _param_keys(components: Components) -> dict[str, dict[str, str]]:
    """component -> {module parameter name: SGM key} (te2's q/k/v all map to the fused in_proj key)."""
    spec = load_arch(components.arch)
    out: dict[str, dict[str, str]] = {c: {} for c in ALL_COMPONENTS}
    for rule in build_rules(components.modules(), spec.unet, spec.vae):
        for name in rule.names:
            out[rule.component][name] = rule.sgm
    return out


def _unet_trainable(rel_keys: list[str], parts: PartsSection) -> dict[str, bool]:
    """Steps 3-6 for the UNet: rel SGM key -> trains."""
    frozen = UNET_PRESETS[parts.unet]
    train = {k: not any(_matches(k, f) for f in frozen) for k in rel_keys}
    for field_name, value in (("unet_include", True), ("unet_exclude", False)):
        for pattern in getattr(parts, field_name):
            hits = [k for k in rel_keys if _matches(k, pattern)]
            if not hits:
                raise TunelabError(f"train.parts.{field_name}: pattern {pattern!r} matches no UNet key; "
                                   "patterns are SGM names like 'output_blocks.*.1.*' (see `tunelab model inspect`)")
            train.update(dict.fromkeys(hits, value))
    if parts.block_lrs:
        for k in rel_keys:
            if parts.block_lrs[vocab.kohya_index(block_lr_name(k))] == 0:
                train[k] = False
    return train


def _te1_unused(sgm: str, n_layers: int, clip_skip: int = 2) -> bool:
    """te1 (CLIP-L) layers after the one the UNet reads (hidden state -clip_skip; 2 = penultimate, SDXL's
    choice, leaving only the last layer unused) and its final norm get no gradient."""
    if sgm.startswith(f"{TE1}text_model.final_layer_norm."):
        return True
    unused = range(n_layers - clip_skip + 1, n_layers)
    return any(sgm.startswith(f"{TE1}text_model.encoder.layers.{i}.") for i in unused)


def _component_on(component: str, parts: PartsSection, optim: OptimSection | None) -> bool:
    if component == "vae":
        return False
    if component == "unet":
        return parts.text_encoder != "only"
    if parts.text_encoder == "off":
        return False
    lr = None if optim is None else getattr(optim, f"lr_{component}")
    if lr == 0:
        log.info("%s stays frozen: optim.lr_%s is 0", vocab.label(component), component)
        return False
    return True


def _decide(components: Components, parts: PartsSection, optim: OptimSection | None,
            keys: dict[str, dict[str, str]], clip_skip: int = 2) -> dict[str, dict[str, bool]]:
    """component -> {module param name: trains}, steps 1-6 of the module docstring."""
    unet_rel = sorted({sgm[len(UNET):] for sgm in keys["unet"].values()})
    unet_train = _unet_trainable(unet_rel, parts)
    te1_layers = components.text_encoder_1.config.num_hidden_layers
    decided: dict[str, dict[str, bool]] = {}
    for comp in ALL_COMPONENTS:
        on = _component_on(comp, parts, optim)
        names = keys[comp]
        if comp == "unet":
            decided[comp] = {n: on and unet_train[s[len(UNET):]] for n, s in names.items()}
        elif comp == "text_encoder_1":
            decided[comp] = {n: on and not _te1_unused(s, te1_layers, clip_skip) for n, s in names.items()}
        else:
            decided[comp] = dict.fromkeys(names, on)
    return decided


def select_trainable(components: Components, parts: PartsSection, optim: OptimSection | None = None,
                     clip_skip: int = 2) -> TrainablePlan:
    """Set `requires_grad` on every parameter of the four modules and return what trains.

    Call it before wrapping the modules for distribution (DDP buckets only the parameters that
    require grad) and before building the optimizer (`tunelab.train.optim.build_optimizer`).
    Pass `optim` to keep an encoder whose learning rate is 0 frozen.
    """
    keys = _param_keys(components)
    decided = _decide(components, parts, optim, keys, clip_skip)
    plan = TrainablePlan(components={}, param_groups={c: [] for c in TRAINABLE_COMPONENTS})
    modules = components.modules()
    for comp in ALL_COMPONENTS:  # banner order: unet, text_encoder_1, text_encoder_2, vae
        module = modules[comp]
        cp = plan.components[comp] = ComponentPlan()
        for name, p in module.named_parameters():
            if name not in keys[comp]:
                raise TunelabError(f"{comp} parameter {name!r} has no SGM key; the key map is out of date")
            trains = decided[comp][name]
            p.requires_grad_(trains)
            cp.n_total += p.numel()
            if trains:
                cp.trained.append((name, keys[comp][name]))
                cp.n_trained += p.numel()
                plan.param_groups[comp].append(p)
    if parts.block_lrs and plan.param_groups["unet"]:
        _split_unet_blocks(plan, components, parts)
    for row in banner_rows(plan):
        log.debug("trainable %s", row)
    return plan


def _split_unet_blocks(plan: TrainablePlan, components: Components, parts: PartsSection) -> None:
    """Fill `plan.unet_blocks` / `block_multipliers` from the trainable UNet parameters."""
    by_name = dict(components.unet.named_parameters())
    for name, sgm in plan.components["unet"].trained:
        block = block_lr_name(sgm[len(UNET):])
        plan.unet_blocks.setdefault(block, []).append(by_name[name])
        plan.block_multipliers[block] = parts.block_lrs[vocab.kohya_index(block)]
    # forward order, so group names and logs read IN00.. OUT
    order = {b: i for i, b in enumerate(vocab.KOHYA_BLOCKS)}
    plan.unet_blocks = dict(sorted(plan.unet_blocks.items(), key=lambda kv: order[kv[0]]))


def banner_rows(plan: TrainablePlan) -> list[str]:
    """Start-up banner lines, one per component under its display label, then the sum:
    `unet            1,629,562,564 / 2,567,463,684 (63.47 %)`, `te1 (CLIP-L)    115,971,072 / ...`."""
    rows = []
    for comp, cp in plan.components.items():
        rows.append(f"{vocab.label(comp):<15} {cp.n_trained:>13,} / {cp.n_total:>13,} ({100 * cp.fraction:.2f} %)")
    trained = sum(cp.n_trained for cp in plan.components.values())
    total = sum(cp.n_total for cp in plan.components.values())
    rows.append(f"{'all':<15} {trained:>13,} / {total:>13,} ({100 * trained / max(total, 1):.2f} %)")
    return rows
