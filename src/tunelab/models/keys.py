"""The key map between SGM single-file checkpoints and diffusers / transformers modules.

SGM names (what A1111, ComfyUI, sd-mecha and CivitAI files use) have four prefixes:
`model.diffusion_model.` (UNet), `first_stage_model.` (VAE), `conditioner.embedders.0.transformer.`
(te1 = CLIP ViT-L, already in transformers' layout) and `conditioner.embedders.1.model.` (te2 =
OpenCLIP ViT-bigG layout); they are the `module_prefix` column of the component table in
`tunelab.models.vocab`. The map is generated from the modules' own state-dict names (so it
works for the full and the toy preset alike, and on the meta device) and is a bijection, with
four tensor operations besides renaming:

- copy:      same tensor;
- qkv:       OpenCLIP's fused `attn.in_proj_{weight,bias}` = concat(q, k, v) on dim 0;
- transpose: OpenCLIP's `text_projection` (hidden, proj) = transformers' Linear weight (proj, hidden).T;
- conv1x1:   the SGM VAE's mid-block attention uses 1x1 convs (C, C, 1, 1) where diffusers uses
             Linear (C, C).

Hand-written: diffusers ships one-way converters for loading only; saving back to SGM exactly
needs the inverse, so both directions live here in one table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

import torch

from tunelab.models.vocab import COMPONENT_TABLE

# module name in tunelab.models.arch.Components -> SGM prefix of its weights (vocab's table)
PREFIXES: dict[str, str] = {c.module: c.module_prefix for c in COMPONENT_TABLE}
UNET = PREFIXES["unet"]  # "model.diffusion_model."
VAE = PREFIXES["vae"]  # "first_stage_model."
TE1 = PREFIXES["text_encoder_1"]  # "conditioner.embedders.0.transformer." (te1, CLIP-L)
TE2 = PREFIXES["text_encoder_2"]  # "conditioner.embedders.1.model." (te2, bigG, OpenCLIP layout)


@dataclass(frozen=True)
class KeyRule:
    sgm: str  # full SGM key
    component: str  # "unet" | "vae" | "text_encoder_1" | "text_encoder_2"
    names: tuple[str, ...]  # the module's state-dict key(s); three for "qkv"
    op: str = "copy"  # "copy" | "qkv" | "transpose" | "conv1x1"


# --- UNet ---------------------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_name(key: str, layers_per_block: int, up_has_attention: tuple[bool, ...]) -> str:
    """diffusers UNet2DConditionModel key -> SGM key (without the `model.diffusion_model.` prefix)."""
    for old, new in _UNET_FIXED.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    per = layers_per_block + 1  # input/output slots per level: ResBlocks, plus a Down/Upsample slot
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = i * per + j + 1
        return f"input_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = i * per + j
        return f"output_blocks.{slot}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + layers_per_block}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no SGM name for UNet key {key!r}")


# --- VAE ----------------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_name(key: str, n_levels: int) -> str:
    """diffusers AutoencoderKL key -> SGM key (without `first_stage_model.`). Decoder levels are
    numbered bottom-up in SGM (up.0 is the last, full-resolution level) and top-down in diffusers."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


# --- te2 (bigG, OpenCLIP layout) ---------------------------------------------------------------------

_TE2_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def te2_name(key: str) -> str:
    """transformers CLIPTextModelWithProjection key -> OpenCLIP key (without `...embedders.1.model.`)."""
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key]
    if key.startswith("text_model.final_layer_norm."):
        return "ln_final." + key.rsplit(".", 1)[1]
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
    if m and m[2] in _TE2_LAYER:
        return f"transformer.resblocks.{m[1]}.{_TE2_LAYER[m[2]]}.{m[3]}"
    raise KeyError(f"no OpenCLIP name for TE2 key {key!r}")


def with_text_model(key: str) -> str:
    """transformers 4.x nests CLIPTextModel's weights under `text_model.`, 5.x does not (it maps the
    old names on load). SGM files always use the nested names; accept both module layouts."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


def _te2_rules(keys: Iterable[str]) -> list[KeyRule]:
    rules = []
    for key in keys:
        if m := re.match(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key):
            names = tuple(key.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj"))
            rules.append(KeyRule(f"{TE2}transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}", "text_encoder_2", names, "qkv"))
        elif re.search(r"self_attn\.(k|v)_proj\.", key):
            continue  # folded into the q_proj rule above
        else:
            op = "transpose" if key == "text_projection.weight" else "copy"
            rules.append(KeyRule(TE2 + te2_name(with_text_model(key)), "text_encoder_2", (key,), op))
    return rules


# --- the whole table ---------------------------------------------------------------------------------------


def build_rules(modules: Mapping[str, torch.nn.Module], unet_config: Mapping, vae_config: Mapping) -> list[KeyRule]:
    """Every SGM key of a model, in a stable order, from its modules' state-dict names."""
    lpb = unet_config["layers_per_block"]
    up_attn = tuple(t.startswith("CrossAttn") for t in unet_config["up_block_types"])
    n_vae = len(vae_config["block_out_channels"])
    rules: list[KeyRule] = []
    for key in modules["unet"].state_dict():
        rules.append(KeyRule(UNET + unet_name(key, lpb, up_attn), "unet", (key,)))
    for key in modules["vae"].state_dict():
        sgm = VAE + vae_name(key, n_vae)
        conv = re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", sgm) is not None
        rules.append(KeyRule(sgm, "vae", (key,), "conv1x1" if conv else "copy"))
    for key in modules["text_encoder_1"].state_dict():
        rules.append(KeyRule(TE1 + with_text_model(key), "text_encoder_1", (key,)))
    rules += _te2_rules(modules["text_encoder_2"].state_dict())
    return rules


@lru_cache(maxsize=None)
def rules_for_arch(arch: str) -> tuple[KeyRule, ...]:
    """The key table of a preset (built once on the meta device, so it costs no memory)."""
    from tunelab.models.arch import build_components, load_arch

    spec = load_arch(arch)
    comps = build_components(spec, device="meta")
    return tuple(build_rules(comps.modules(), spec.unet, spec.vae))


# --- the key list of a preset, without its modules ------------------------------------------------------------
# Header-only tools (`tunelab model inspect`) need a preset's SGM keys and shapes, not its modules:
# building SDXL's modules, even on the meta device, imports diffusers and transformers and takes
# ~8 s. `configs/<arch>/sgm_keys.json` is a snapshot of what `rules_for_arch` generates;
# tests/models/test_keys.py fails when the two differ (regenerate with `write_key_table`).

KEY_TABLE = "sgm_keys.json"


def generated_key_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """{SGM key: shape} of a preset, generated from its modules (slow: builds them on meta)."""
    from tunelab.models.arch import build_components

    state = {n: m.state_dict() for n, m in build_components(arch, device="meta").modules().items()}
    return {r.sgm: sgm_shape(r, [tuple(state[r.component][n].shape) for n in r.names]) for r in rules_for_arch(arch)}


@lru_cache(maxsize=None)
def sgm_key_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """{SGM key: shape} of a preset, read from its shipped snapshot (fast; no module is built)."""
    import json
    from importlib import resources

    from tunelab.models.arch import load_arch

    load_arch(arch)  # an unknown name fails with the list of presets
    text = resources.files("tunelab").joinpath("configs", arch, KEY_TABLE).read_text()
    return {k: tuple(v) for k, v in json.loads(text)["keys"].items()}


def write_key_table(arch: str) -> str:
    """Regenerate `configs/<arch>/sgm_keys.json` from the modules; returns the path written."""
    import json
    from importlib import resources

    path = resources.files("tunelab").joinpath("configs", arch, KEY_TABLE)
    doc = {"_about": f"SGM keys and shapes of the {arch} preset, generated by tunelab.models.keys.write_key_table",
           "keys": {k: list(s) for k, s in generated_key_shapes(arch).items()}}
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, separators=(",", ":")).replace('],"', '],\n"') + "\n")
    return str(path)


def optional_keys(arch: str) -> frozenset[str]:
    """SGM keys a file in the wild may lack: te1's (CLIP-L) last layer and final norm (SDXL conditions on
    the penultimate state), te2's (bigG) last block, final norm and projection (only the pooled output uses
    them). Loading tolerates their absence; everything else is required."""
    from tunelab.models.arch import load_arch

    spec = load_arch(arch)
    last1 = spec.text_encoder_1["num_hidden_layers"] - 1
    last2 = spec.text_encoder_2["num_hidden_layers"] - 1
    pats = (f"{TE1}text_model.encoder.layers.{last1}.", f"{TE1}text_model.final_layer_norm.",
            f"{TE2}transformer.resblocks.{last2}.", f"{TE2}ln_final.", f"{TE2}text_projection")
    return frozenset(k for k in sgm_key_shapes(arch) if k.startswith(pats))


# --- tensor operations ---------------------------------------------------------------------------------------


def to_sgm_tensor(rule: KeyRule, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Module tensor(s) -> the SGM tensor of one rule."""
    if rule.op == "qkv":
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    if rule.op == "transpose":
        return t.t().contiguous()
    if rule.op == "conv1x1":
        return t.reshape(*t.shape, 1, 1)
    return t


def from_sgm_tensor(rule: KeyRule, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The SGM tensor of one rule -> the module tensor(s)."""
    if rule.op == "qkv":
        return list(tensor.chunk(3, dim=0))
    if rule.op == "transpose":
        return [tensor.t().contiguous()]
    if rule.op == "conv1x1":
        return [tensor.reshape(tensor.shape[0], tensor.shape[1])]
    return [tensor]


def sgm_shape(rule: KeyRule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The SGM shape of one rule, from the module shapes (no tensors needed)."""
    if rule.op == "qkv":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    (s,) = shapes
    if rule.op == "transpose":
        return tuple(reversed(s))
    if rule.op == "conv1x1":
        return (*s, 1, 1)
    return tuple(s)
