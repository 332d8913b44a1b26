"""Load and save single-file SGM `.safetensors` checkpoints; import and export diffusers folders.

Loading builds the modules with empty (meta) parameters and assigns the file's tensors to them,
so a full SDXL model costs one copy in memory, in the file's dtype. Saving streams: tensors are
converted and written one at a time into a temporary file that is renamed into place when
complete. Load -> save reproduces every tensor of the file exactly, including tensors no module
owns (`v_pred`, scheduler buffers, `logit_scale`) and leaving out optional keys the file lacked.
The header metadata is the source file's, updated (`build_metadata`), with `modelspec.hash_sha256`
computed while the tensors are written.

A diffusers folder is written as `StableDiffusionXLPipeline.from_pretrained` reads it:
model_index.json, scheduler/ (the prediction record), tokenizer/ and tokenizer_2/, and the four
models' configs and weights streamed through the same writer (text_encoder/ under transformers'
nested `text_model.*` names, which diffusers' `convert_diffusers_to_original_sdxl.py` and every
transformers version read).

Pickle files (.ckpt/.pt/.pth/.bin) can run arbitrary code when unpickled; they are refused unless
the caller passes allow_pickle=True, and even then are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib

import json
import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tunelab import __version__
from tunelab.errors import TunelabError
from tunelab.models import keys as K
from tunelab.models.arch import ARCHES, MODELSPEC_ARCH, Components, build_components, load_arch
from tunelab.models.prediction import PredictionRecord
from tunelab.models.safetensors_io import (
    DTYPES, HASH_KEY, Header, TensorSpec, data_sha256, read_header, rewrite_metadata, write_streaming,
)

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# Keys some SGM files carry that no module owns but that must not be mistaken for a wrong layout.
_KNOWN_EXTRAS = ("v_pred", "ztsnr", "logit_scale", "position_ids", "alphas_cumprod", "betas", "edm_vpred")


def refuse_pickle(path: str | Path, what: str | None = None) -> None:
    """Refuse a pickle checkpoint (.ckpt/.pt/.pth/.bin) with the one command that makes it usable:
    only `tunelab model convert --allow-pickle` opens them, so the advice is the same whichever
    command got the file. `what` names the setting that gave it (e.g. "model.base")."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return
    where = f"{what} = {str(path)!r}" if what else str(path)
    raise TunelabError(
        f"{where}: refusing a pickle file ({path.suffix}): unpickling can execute arbitrary code. If you trust its "
        f"source, convert it once with `tunelab model convert {path} --allow-pickle --out "
        f"{path.with_suffix('.safetensors')}` and use the .safetensors file"
    )


def parse_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise TunelabError(f"unknown dtype {name!r}; choose one of: {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[name]


# --- reading tensors from a file ---------------------------------------------------------------------


class _Source:
    """Names, shapes and tensors of a checkpoint file (safetensors memory-mapped, or a pickle dict)."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path, self.metadata, self._dict, self._st = path, {}, None, None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            self._open_pickle(allow_pickle)
        else:
            from safetensors import safe_open

            header = read_header(path)  # one-line errors for malformed files
            self.metadata = header.metadata
            self.shapes = {k: v.shape for k, v in header.tensors.items()}
            self._st = safe_open(str(path), framework="pt", device="cpu")

    def _open_pickle(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            refuse_pickle(self.path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for bad pickles
            raise TunelabError(f"{self.path}: cannot read as a weights-only pickle: {err}") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise TunelabError(f"{self.path}: the pickle holds no state dict")
        self._dict = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._dict[name] if self._dict is not None else self._st.get_tensor(name)


def detect_arch(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], where: str = "file") -> str:
    """Which preset a checkpoint belongs to: tunelab's own metadata, else the UNet's width."""
    if metadata.get("tunelab.arch") in ARCHES:
        return metadata["tunelab.arch"]
    conv_in = shapes.get(K.UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise TunelabError(
            f"{where}: no UNet keys (model.diffusion_model.*): not a full SGM checkpoint "
            "(a LoRA, a lone VAE or text encoder, or a diffusers file?)"
        )
    if K.UNET + "label_emb.0.0.weight" not in shapes:
        raise TunelabError(f"{where}: no SDXL size/crop embedding (label_emb): an SD 1.x/2.x model? tunelab trains SDXL-class models")
    for arch in ARCHES:
        if load_arch(arch).unet["block_out_channels"][0] == conv_in[0]:
            return arch
    raise TunelabError(f"{where}: UNet width {conv_in[0]} matches no preset ({', '.join(ARCHES)})")


def base_arch(source: str | Path) -> str | None:
    """The preset of a model without loading a weight: 'toy' (built in code), a `.safetensors`
    file's header, or a diffusers folder's `unet/config.json`; None when only loading can tell
    (no such file yet, a pickle file, a folder without a UNet config)."""
    if str(source) == "toy":
        return "toy"
    path = Path(source)
    if path.is_dir():
        config = path / "unet" / "config.json"
        if not config.is_file():
            return None
        width = json.loads(config.read_text())["block_out_channels"][0]
        return detect_arch({K.UNET + "input_blocks.0.0.weight": (width,), K.UNET + "label_emb.0.0.weight": (0,)},
                           {}, str(path))
    if not path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        return None
    header = read_header(path)
    return detect_arch({k: v.shape for k, v in header.tensors.items()}, header.metadata, str(path))


# --- load --------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path,
    arch: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Read an SGM single-file checkpoint into diffusers / transformers modules (on the CPU).

    dtype=None keeps the file's dtype; otherwise the modules are cast after loading.
    """
    path = Path(path)
    if path.is_dir():
        return import_diffusers(path, dtype=dtype)
    if not path.exists():
        raise TunelabError(f"{path}: no such file")
    src = _Source(path, allow_pickle)
    arch = arch or detect_arch(src.shapes, src.metadata, str(path))
    comps = build_components(arch, device="empty")
    rules = K.rules_for_arch(arch)
    state, absent = _read_rules(src, path, rules, comps, K.optional_keys(arch))
    for name, module in comps.modules().items():
        module.load_state_dict(state[name], strict=False, assign=True)
        _materialize_absent(module)
        if dtype is not None and next(module.parameters()).dtype != dtype:
            with _quiet_diffusers():  # it warns on every cast of a module built without from_pretrained
                module.to(dtype=dtype)
    mapped = {r.sgm for r in rules}
    comps.extras = {k: src.get(k) for k in src.shapes if k not in mapped}
    _warn_unexpected(path, comps.extras)
    comps.absent, comps.metadata, comps.source = absent, dict(src.metadata), str(path)
    if absent:
        log.info("%s lacks %d optional keys (e.g. %s); they keep default values and are not saved back",
                 path.name, len(absent), sorted(absent)[0])
    return comps


@contextlib.contextmanager
def _quiet_diffusers():
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_rules(src: _Source, path: Path, rules, comps: Components, optional: frozenset[str]):
    expected = {n: {k: tuple(v.shape) for k, v in m.state_dict().items()} for n, m in comps.modules().items()}
    state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in expected}
    absent, missing = set(), []
    for rule in rules:
        if rule.sgm not in src.shapes:
            (absent.add if rule.sgm in optional else missing.append)(rule.sgm)
            continue
        want = K.sgm_shape(rule, [expected[rule.component][n] for n in rule.names])
        if tuple(src.shapes[rule.sgm]) != want:
            raise TunelabError(
                f"{path}: {rule.sgm} has shape {tuple(src.shapes[rule.sgm])}, the {comps.arch} preset expects {want}"
            )
        for name, t in zip(rule.names, K.from_sgm_tensor(rule, src.get(rule.sgm))):
            # q, k, v are views of one fused tensor: give each its own storage.
            state[rule.component][name] = t.clone() if rule.op == "qkv" else t
    if missing:
        raise TunelabError(
            f"{path}: {len(missing)} required {comps.arch} keys are missing (first: {missing[0]}); "
            "the file is incomplete or of another architecture"
        )
    return state, absent


def _materialize_absent(module: torch.nn.Module) -> None:
    """Parameters the file lacked (optional keys) are still on the meta device: give them real
    storage and the layer's own initialisation (LayerNorm -> ones/zeros)."""
    for sub in module.modules():
        if any(p.is_meta for p in sub.parameters(recurse=False)):
            sub.to_empty(device="cpu", recurse=False)
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            else:
                for p in sub.parameters(recurse=False):
                    torch.nn.init.zeros_(p.data)


def _warn_unexpected(path: Path, extras: Mapping[str, torch.Tensor]) -> None:
    odd = [k for k in extras if k.startswith(tuple(K.PREFIXES.values())) and not any(e in k for e in _KNOWN_EXTRAS)]
    if odd:
        log.warning("%s: %d keys under model prefixes are not part of the architecture and are kept as-is (first: %s)",
                    path.name, len(odd), odd[0])


# --- save --------------------------------------------------------------------------------------------------


# What a saved header says, key by key (docs/checkpoints.md, "Metadata"). The SAI model spec asks
# trainers to copy the source's keys where relevant and to generate the hash, date and the like:
#   written fresh    FRESH_KEYS (the spec's technical keys, the record, tunelab's own) and the hash;
#   kept             everything else the source had: modelspec.author / license / description /
#                    usage_hint / trigger_phrase / tags / thumbnail ..., kohya's ss_*, other tools'
#                    keys; title, date and resolution too, unless a trained checkpoint is saved;
#   dropped          STALE_KEYS: hashes of other bytes (kohya's additional-networks hashes) and
#                    descriptions of the tensors' dtypes, wrong once tunelab re-writes the tensors;
#   history          HISTORY_KEYS and ss_*: how the *source* was made. A trained checkpoint is a new
#                    model: its base's history would be presented as its own (kohya's model browsers
#                    show ss_* as "this model's training"), so it is dropped and the lineage keys
#                    name the base instead (its title and hash lead to the base's own header).
#                    `training` replaces any source ss_* keys in every case (never a mix of two trainings).
FRESH_KEYS = ("modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
              "modelspec.prediction_type", HASH_KEY, "tunelab.version", "tunelab.arch", "tunelab.dtype",
              "tunelab.ztsnr", "tunelab.flow_shift")
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.unet_dtype", "modelspec.vae_dtype")
# modelspec has `merged_from` for merges but no field for "trained from": tunelab's own keys.
LINEAGE_KEYS = ("tunelab.base", "tunelab.base_title", "tunelab.base_hash", "tunelab.run", "tunelab.step")
HISTORY_KEYS = ("modelspec.merged_from", "modelspec.implementation_version", "mecha_recipe", *LINEAGE_KEYS)


@dataclass(frozen=True)
class Lineage:
    """Where a trained checkpoint comes from: the base as the run names it, the run and its step.
    Saved as `tunelab.base`, `tunelab.run`, `tunelab.step`, plus the base file's title
    (`tunelab.base_title`) and modelspec hash (`tunelab.base_hash`), which identify it whatever it
    is called on another disk."""

    base: str
    run: str | None = None
    step: int | None = None

    @classmethod
    def of(cls, comps: Components, run: str | None, step: int | None, base: str = "toy") -> "Lineage":
        """A checkpoint trained from `comps`: named after their source file, else `base` (the
        run file's setting, e.g. the toy preset built in code)."""
        return cls(Path(comps.source).name if comps.source else str(base), run, step)


def build_metadata(
    arch: str,
    dtype: str,
    title: str,
    prediction: str = "epsilon",
    training: Mapping[str, Any] | None = None,
    source: Mapping[str, str] | None = None,
    lineage: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The header of a saved checkpoint: `source` (the file it came from) carried over as the
    comment above says, then modelspec keys (what A1111 / ComfyUI / CivitAI display), tunelab's,
    `lineage` (a trained checkpoint's LINEAGE_KEYS) and `training` as kohya's `ss_*` keys.
    The hash is added by the writer."""
    new_model = lineage is not None
    meta = {}
    for key, value in (source or {}).items():
        history = key.startswith("ss_") or key in HISTORY_KEYS
        if key in FRESH_KEYS or key in STALE_KEYS or (history and new_model) or (key.startswith("ss_") and training):
            continue
        meta[key] = value
    res = load_arch(arch).resolution
    kept = {} if new_model else meta
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[arch],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": kept.get("modelspec.resolution", f"{res}x{res}"),
        "modelspec.prediction_type": prediction,
        "modelspec.date": kept.get("modelspec.date", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")),
        "tunelab.version": __version__,
        "tunelab.arch": arch,
        "tunelab.dtype": dtype,
    })
    meta.update(lineage or {})
    for key, value in (training or {}).items():
        meta[f"ss_{key}"] = str(value)  # kohya's `ss_*` training keys, which model browsers show
    return meta


def lineage_metadata(comps: Components, lineage: Lineage) -> dict[str, str]:
    """LINEAGE_KEYS of a checkpoint trained from `comps` (the loaded base). The base's hash is
    computed from its file (once per file: the sha256 of its tensor data, as modelspec defines it);
    without a file, the hash its header states, if any."""
    meta = {"tunelab.base": lineage.base}
    if comps.metadata.get("modelspec.title"):
        meta["tunelab.base_title"] = comps.metadata["modelspec.title"]
    base_hash = _file_hash(comps.source) or comps.metadata.get(HASH_KEY)
    if base_hash:
        meta["tunelab.base_hash"] = base_hash
    if lineage.run is not None:
        meta["tunelab.run"] = lineage.run
    if lineage.step is not None:
        meta["tunelab.step"] = str(lineage.step)
    return meta


def stamp_merge(merged: str | Path, out: str | Path, models: list[str | Path], dtype: str) -> Path:
    """Write sd-mecha's merged file `merged` as `out` with a model header: fresh modelspec keys,
    the hash, `modelspec.merged_from` = the models' titles (their `modelspec.title`, else the file
    name, as kohya's `sai_model_spec.build_merged_from` does), the record its markers carry and
    sd-mecha's `mecha_recipe`. Nothing else of the inputs' headers: a merge has several authors,
    licences and trainings, which `merged_from` leads to."""
    header = read_header(merged)
    shapes = {k: v.shape for k, v in header.tensors.items()}
    arch = detect_arch(shapes, {}, str(merged))
    titles = []
    for model in models:
        path = Path(model)
        meta = read_header(path).metadata if path.suffix.lower() == ".safetensors" and path.is_file() else {}
        titles.append(meta.get("modelspec.title") or path.stem)
    record = PredictionRecord.of_file(merged, header)
    source = {k: v for k, v in header.metadata.items() if k == "mecha_recipe"}
    meta = build_metadata(arch, dtype, Path(out).stem, record.type, source=source, lineage={})
    meta["modelspec.merged_from"] = ", ".join(titles)
    record.stamp({}, meta)
    rewrite_metadata(merged, out, meta | source, hash_key=HASH_KEY)
    return Path(out)


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(source: str | None) -> str | None:
    path = Path(source) if source else None
    if path is None or path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = data_sha256(path)
    return _HASHES[key]


def save_checkpoint(
    comps: Components,
    path: str | Path,
    dtype: str = "fp16",
    title: str | None = None,
    training: Mapping[str, Any] | None = None,
    progress: Callable[[TensorSpec], None] | None = None,
    prediction: PredictionRecord | None = None,
    lineage: Lineage | None = None,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `comps` as an SGM single-file checkpoint (atomically; floating tensors cast to dtype).

    `state_dicts` gives a component's whole weights where its module holds only a shard of them
    (FSDP, ZeRO-3: gathered by the trainer) or not the master copy (DeepSpeed's fp32 weights).

    `prediction` stamps a prediction record (markers + metadata) into the file; by default the
    components' own record (what the file they came from said) is kept. The source's metadata is
    kept and updated (`build_metadata`); `lineage` says the file is a new model trained from
    `comps`' source (its history is replaced by the lineage keys). The title defaults to the
    source's (a re-save) or the file name (a trained checkpoint)."""
    path = Path(path)
    record = prediction or PredictionRecord.of(comps)
    extras, record_meta = dict(comps.extras), {}
    record.stamp(extras, record_meta)
    target = parse_dtype(dtype)
    modules = comps.modules()
    rules = [r for r in K.build_rules(modules, comps.unet.config, comps.vae.config) if r.sgm not in comps.absent]
    given = state_dicts or {}
    state = {n: given[n] if n in given else m.state_dict() for n, m in modules.items()}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(target) if t.is_floating_point() else t

    tensors: dict[str, Callable[[], torch.Tensor]] = {
        r.sgm: (lambda r=r: cast(K.to_sgm_tensor(r, [state[r.component][n] for n in r.names]))) for r in rules
    }
    shapes = {r.sgm: K.sgm_shape(r, [tuple(state[r.component][n].shape) for n in r.names]) for r in rules}
    specs = [TensorSpec(r.sgm, shapes[r.sgm], target if state[r.component][r.names[0]].is_floating_point()
                        else state[r.component][r.names[0]].dtype) for r in rules]
    for name, t in extras.items():  # kept exactly as the source file had them (markers: the record's)
        tensors[name] = lambda t=t: t
        specs.append(TensorSpec(name, tuple(t.shape), t.dtype))
    kept_title = None if lineage else comps.metadata.get("modelspec.title")
    meta = build_metadata(comps.arch, dtype, title or kept_title or path.stem, record.type, training, comps.metadata,
                          lineage_metadata(comps, lineage) if lineage else None) | record_meta
    write_streaming(path, specs, lambda s: tensors[s.name](), meta, progress, hash_key=HASH_KEY)
    return path


# --- random checkpoints --------------------------------------------------------------------------------------


def new_checkpoint(arch: str, out: str | Path, seed: int = 0, dtype: str = "fp16",
                   progress: Callable[[TensorSpec], None] | None = None) -> Path:
    """A randomly initialised checkpoint of a preset.

    toy: the real modules' own initialisation (seeded). sdxl: tensors are generated one at a time
    while writing (a full fp32 model would need 14 GB of RAM): norms ones/zeros, biases zeros,
    embeddings N(0, 0.02), other weights N(0, 1/fan_in); each tensor seeded by (seed, key), so the
    file is reproducible.
    """
    if arch == "toy":
        return save_checkpoint(build_components("toy", seed=seed), out, dtype=dtype, progress=progress)
    target = parse_dtype(dtype)
    comps = build_components(arch, device="meta")
    state = {n: m.state_dict() for n, m in comps.modules().items()}
    rules = {r.sgm: r for r in K.rules_for_arch(arch)}
    specs = [TensorSpec(k, K.sgm_shape(r, [tuple(state[r.component][n].shape) for n in r.names]), target)
             for k, r in rules.items()]
    meta = build_metadata(arch, dtype, Path(out).stem)
    write_streaming(out, specs, lambda s: _random_tensor(s, seed).to(target), meta, progress, hash_key=HASH_KEY)
    return Path(out)


def _random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
    if len(spec.shape) == 1 or spec.name.endswith("bias"):
        is_norm_weight = spec.name.endswith("weight") and len(spec.shape) == 1
        return torch.ones(spec.shape) if is_norm_weight else torch.zeros(spec.shape)
    if "embedding" in spec.name:
        return torch.randn(spec.shape, generator=gen) * 0.02
    fan_in = max(1, int(torch.tensor(spec.shape[1:]).prod())) if len(spec.shape) > 1 else 1
    return torch.randn(spec.shape, generator=gen) / fan_in**0.5


# --- diffusers folders ----------------------------------------------------------------------------------------

DIFFUSERS_PARTS = {"unet": "unet", "vae": "vae", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder_1": "model.safetensors", "text_encoder_2": "model.safetensors"}
_FORMAT = {"format": "pt"}  # what transformers' and diffusers' own safetensors writers put in the header


def import_diffusers(folder: str | Path, dtype: torch.dtype | None = None) -> Components:
    """Load a diffusers-format SDXL folder (unet/, vae/, text_encoder/, text_encoder_2/). The
    prediction record comes from scheduler/, the SGM metadata tunelab's export keeps in unet/'s
    weights file back into `metadata`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    missing = [sub for sub in DIFFUSERS_PARTS.values() if not (folder / sub).is_dir()]
    if missing:
        raise TunelabError(f"{folder}: not a diffusers SDXL folder; missing sub-folders: {', '.join(missing)}")
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw)
    shapes = {K.UNET + "input_blocks.0.0.weight": tuple(unet.conv_in.weight.shape), K.UNET + "label_emb.0.0.weight": (0,)}
    comps = Components(detect_arch(shapes, {}, str(folder)), unet, vae, te1, te2, source=str(folder))
    weights = folder / "unet" / _WEIGHTS["unet"]
    if weights.is_file():
        comps.metadata = {k: v for k, v in read_header(weights).metadata.items() if k not in _FORMAT}
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():  # the folder's prediction record lives in its scheduler config
        PredictionRecord.of_diffusers_scheduler(json.loads(sched.read_text())).stamp(comps.extras, comps.metadata)
    for m in comps.modules().values():
        m.eval()
        if dtype is not None:
            m.to(dtype=dtype)
    return comps


def export_diffusers(comps: Components, folder: str | Path, dtype: str = "fp16",
                     tokenizers: str | Path | tuple[Any, Any] | None = None) -> Path:
    """Write `comps` as a diffusers SDXL folder that `StableDiffusionXLPipeline.from_pretrained`
    loads as it is: model_index.json, scheduler/ (the prediction record), tokenizer/ and
    tokenizer_2/, unet/, vae/, text_encoder/, text_encoder_2/ (configs + safetensors weights).

    `tokenizers`: a folder with tokenizer/ and tokenizer_2/ (a diffusers SDXL folder or a copy of
    those two), "toy", or loaded (TE1, TE2) tokenizers; None is the toy preset's own and an error
    for sdxl (SGM files carry none). Weights are cast while streamed (the modules are not changed).
    The SGM metadata (modelspec, ss_*, lineage) rides in unet/'s weights header for the way back."""
    folder = Path(folder)
    target = parse_dtype(dtype)
    record = PredictionRecord.of(comps)
    scheduler = _diffusers_scheduler(record, comps.arch)  # refuses what diffusers cannot sample, first
    toks = _export_tokenizers(comps, tokenizers)
    meta = build_metadata(comps.arch, dtype, comps.metadata.get("modelspec.title") or folder.name, record.type,
                          source=comps.metadata)
    record.stamp({}, meta)
    for name, sub in DIFFUSERS_PARTS.items():
        _write_part(comps.modules()[name], name, folder / sub, target, meta if name == "unet" else {})
    scheduler.save_pretrained(folder / "scheduler")
    toks[0].save_pretrained(folder / "tokenizer")
    toks[1].save_pretrained(folder / "tokenizer_2")
    from diffusers import StableDiffusionXLPipeline

    parts = {DIFFUSERS_PARTS[n]: m for n, m in comps.modules().items()}
    pipe = StableDiffusionXLPipeline(**parts, tokenizer=toks[0], tokenizer_2=toks[1], scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_config(folder)  # model_index.json: each component's (library, class)
    return folder


def diffusers_file_keys(name: str, module: torch.nn.Module) -> dict[str, str]:
    """{state-dict key: key in the part's weights file}. Identity except TE1 under transformers 5,
    whose CLIPTextModel dropped the `text_model.` level: the file keeps the nested names that
    diffusers' scripts and every transformers version read (the SGM name without its prefix)."""
    keys = module.state_dict().keys()
    if name == "text_encoder_1":
        return {k: K.with_text_model(k) for k in keys}
    return {k: k for k in keys}


def _write_part(module: torch.nn.Module, name: str, sub: Path, target: torch.dtype, meta: Mapping[str, str]) -> None:
    import copy

    sub.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    names = diffusers_file_keys(name, module)
    by_file = {names[k]: t for k, t in state.items()}
    specs = [TensorSpec(names[k], tuple(t.shape), target if t.is_floating_point() else t.dtype) for k, t in state.items()]
    write_streaming(sub / _WEIGHTS[name], specs,
                    lambda s: by_file[s.name].to(s.dtype) if by_file[s.name].is_floating_point() else by_file[s.name],
                    {**meta, **_FORMAT})
    if name.startswith("text_encoder"):
        config = copy.deepcopy(module.config)
        config.dtype = target  # what transformers' own save_pretrained records
        config.architectures = [type(module).__name__]
        config.save_pretrained(sub)
    else:
        module.save_config(sub)


def _diffusers_scheduler(record: PredictionRecord, arch: str):
    import diffusers

    config = record.scheduler_config(load_arch(arch).scheduler)
    return getattr(diffusers, config.pop("_class_name"))(**config)


def _export_tokenizers(comps: Components, tokenizers: str | Path | tuple[Any, Any] | None) -> tuple[Any, Any]:
    from tunelab.models.text import OFFLINE_ROUTE, load_tokenizers, resolve_tokenizers

    if isinstance(tokenizers, tuple):
        return tokenizers
    if tokenizers is None and comps.arch != "toy":
        raise TunelabError(f"a diffusers folder holds the model's tokenizers, and {comps.source or 'this model'} "
                           f"carries none: pass --tokenizers with {OFFLINE_ROUTE}")
    setting = resolve_tokenizers(str(tokenizers or "toy"), comps.arch, comps.source or comps.arch, option="--tokenizers")
    return load_tokenizers(setting)


# --- inspect ---------------------------------------------------------------------------------------------------


def _file_dtype(header: Header) -> str:
    counts = Counter(info.dtype for info in header.tensors.values() if info.dtype.startswith(("F", "BF")))
    names = {v: k for k, v in {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}.items()}
    return names.get(counts.most_common(1)[0][0], counts.most_common(1)[0][0]) if counts else "none"


def inspect_file(path: str | Path) -> dict[str, Any]:
    """Everything tunelab can tell about a checkpoint from its header alone (no tensor is read)."""
    path = Path(path)
    refuse_pickle(path)  # no header to read, and unpickling can run code
    header = read_header(path)
    shapes = {k: v.shape for k, v in header.tensors.items()}
    try:
        arch = detect_arch(shapes, header.metadata, str(path))
    except TunelabError as err:
        arch, why = None, str(err)
    report = _report(arch, shapes, {k: v.dtype for k, v in header.tensors.items()})
    from tunelab.kohya.metadata import training_summary

    report.update(file=str(path), bytes=path.stat().st_size, dtype=_file_dtype(header), metadata=header.metadata,
                  prediction=PredictionRecord.of_file(path, header).describe(),
                  training=training_summary(header.metadata))
    if arch is None:
        report["problem"] = why
    return report


def inspect_preset(arch: str) -> dict[str, Any]:
    """The key table of a preset (its shipped snapshot: no module is built, nothing allocated)."""
    shapes = K.sgm_key_shapes(arch)
    report = _report(arch, shapes, {k: "F32" for k in shapes})
    report.update(preset=arch, dtype="fp32")
    return report


def _report(arch: str | None, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> dict[str, Any]:
    from tunelab.models.blocks import block_order, component_of, unet_block_of

    numel = {k: math.prod(s) for k, s in shapes.items()}
    per_component: Counter[str] = Counter()
    per_block: Counter[str] = Counter()
    for k, n in numel.items():
        per_component[component_of(k)] += n
        if k.startswith(K.UNET):
            per_block[unet_block_of(k)] += n
    report: dict[str, Any] = {"arch": arch, "tensors": len(shapes), "parameters": sum(numel.values()),
                              "per_component": dict(per_component),
                              "per_unet_block": {b: per_block[b] for b in sorted(per_block, key=block_order)}}
    if arch is not None:
        expected = set(K.sgm_key_shapes(arch))  # the snapshot: building the modules would take seconds
        optional = K.optional_keys(arch)
        report["missing_required"] = sorted(expected - set(shapes) - optional)
        report["absent_optional"] = sorted((expected & optional) - set(shapes))
        report["extra_keys"] = sorted(set(shapes) - expected)
    report["keys"] = [{"key": k, "shape": list(s), "dtype": dtypes[k]} for k, s in shapes.items()]
    return report


__all__ = ["load_checkpoint", "save_checkpoint", "new_checkpoint", "import_diffusers", "export_diffusers",
           "inspect_file", "inspect_preset", "detect_arch", "refuse_pickle", "Lineage", "DTYPES"]
