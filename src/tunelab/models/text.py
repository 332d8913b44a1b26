"""Text conditioning for SDXL-class models: tokenizers, 75-token chunking, and the tensors the UNet
is conditioned on.

SDXL feeds the UNet:
- context (B, 77*chunks, D1+D2): TE1's and TE2's hidden states at `clip_skip` (2 = penultimate,
  SDXL's native choice; no final layer norm), concatenated on the feature axis;
- pooled (B, P): TE2's projected pooled output of the *first* chunk;
- time ids (B, 6): original size (h, w), crop top-left (top, left), target size (h, w).

Prompts longer than 75 tokens use the "A1111" scheme: token ids (without specials) are cut into
75-token windows, each wrapped as BOS + window + EOS + PAD..., encoded separately, and the hidden
states concatenated. `max_chunks` caps the windows; anything beyond is *counted and reported*,
never silently dropped. Each tokenizer pads with its own pad token: SDXL's TE1 tokenizer pads with
EOS (<|endoftext|>), TE2's with "!" (id 0); the toy tokenizers copy that difference.

Hand-written here: the chunking (no library does it for SDXL with per-encoder padding) and the
toy tokenizers (a real `CLIPTokenizer` built from a small byte-level BPE vocabulary in code).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # tokens per window; +BOS +EOS = CLIP's 77 positions
SDXL_HUB_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

# Words the toy tokenizer knows as single tokens (everything else falls back to characters, as a
# real BPE does for rare words). The toy world's concepts and the field's sanity prompts.
TOY_WORDS = (
    "red green blue yellow purple orange white black pink gray brown "
    "circle square triangle star ring cross stripes dots heart moon "
    "car wrc man boy girl solo astolfo character background sky grass city street "
    "masterpiece best quality high low worst with and on the of in a an "
    "large small big tiny bright dark left right top bottom center photo drawing"
).split()


# --- toy tokenizers --------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP ordering):
    printable Latin-1 bytes stand for themselves, the rest map to code points from 256 upward.
    The order matters: it makes "!" id 0, as in CLIP's vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


@lru_cache(maxsize=None)
def _toy_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in TOY_WORDS:
        # Run BPE with the merges so far, then add merges (ranked after every existing one) that
        # join what is left. Earlier words are unaffected: they always have a lower-ranked merge.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], {m: r for r, m in enumerate(merges)})
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def toy_tokenizer(pad: str) -> Any:
    """A real CLIPTokenizer over the toy vocabulary. pad="<|endoftext|>" (TE1) or "!" (TE2)."""
    from transformers import CLIPTokenizer

    vocab, merges = _toy_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad)
    tok.model_max_length = CHUNK_TOKENS + 2
    return tok


def toy_text_encoder_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """CLIPTextConfig kwargs for the toy encoders, with ids taken from the toy vocabulary."""
    vocab, _ = _toy_vocab()
    ids = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "max_position_embeddings": CHUNK_TOKENS + 2,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
    }
    te1 = dict(ids, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               hidden_act="quick_gelu", projection_dim=32, pad_token_id=vocab["<|endoftext|>"])
    te2 = dict(ids, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               hidden_act="gelu", projection_dim=64, pad_token_id=vocab["!"])
    return te1, te2


# --- loading ------------------------------------------------------------------------------------------


# Where real SDXL tokenizers come from when none is at hand: the two sub-folders of the public
# diffusers repository, fetched once on a machine with internet and copied (they are small text files).
OFFLINE_ROUTE = (
    "a folder holding tokenizer/ and tokenizer_2/: any diffusers SDXL folder, or just those two sub-folders of "
    f"{SDXL_HUB_REPO} (fetch them once where there is internet: `hf download {SDXL_HUB_REPO} "
    "--include 'tokenizer/*' 'tokenizer_2/*' --local-dir sdxl-tokenizers`, then copy the folder); "
    "see docs/text-conditioning.md, 'Tokenizers'"
)


def load_tokenizers(source: str | Path, allow_download: bool = False) -> tuple[Any, Any]:
    """The (TE1, TE2) tokenizers.

    source: "toy"; or a local directory holding `tokenizer/` and `tokenizer_2/` (a diffusers
    model folder or a copy of just those two); or "hub" to fetch SDXL's from the Hugging Face hub,
    which needs allow_download=True (cached by huggingface_hub; never implicit). The run file's
    "auto" is resolved against the model first (`resolve_tokenizers`).
    """
    if str(source) == "toy":
        return toy_tokenizer("<|endoftext|>"), toy_tokenizer("!")
    if str(source) == "auto":
        raise TunelabError("tokenizers 'auto' means the model's own: resolve it against the model first "
                           "(tunelab.models.text.resolve_tokenizers), or name 'toy' or a folder")
    from transformers import CLIPTokenizer

    if str(source) == "hub":
        if not allow_download:
            raise TunelabError(
                "SDXL tokenizers are not bundled; point `model.tokenizers` at a local folder with "
                "tokenizer/ and tokenizer_2/ (any diffusers SDXL folder), or allow the one-time hub "
                "download explicitly (model.allow_download = true in the run file, or --allow-download)"
            )
        return tuple(CLIPTokenizer.from_pretrained(SDXL_HUB_REPO, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
    dirs = _tokenizer_dirs(Path(source))
    return tuple(CLIPTokenizer.from_pretrained(str(d), local_files_only=True) for d in dirs)


def _tokenizer_dirs(root: Path, option: str = "model.tokenizers") -> list[Path]:
    dirs = [root / "tokenizer", root / "tokenizer_2"]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise TunelabError(
            f"tokenizer folder(s) not found: {', '.join(missing)}; `{option}` must be a folder "
            "containing tokenizer/ and tokenizer_2/ (the layout of a diffusers SDXL model)"
        )
    return dirs


def own_tokenizers(model: str | Path, arch: str | None) -> str | None:
    """The tokenizers a model brings: the toy preset's built-in ones, or a diffusers folder's
    tokenizer/ + tokenizer_2/; None for a single-file SDXL checkpoint (SGM files carry none)."""
    if arch == "toy" or str(model) == "toy":
        return "toy"
    root = Path(model)
    if root.is_dir() and (root / "tokenizer").is_dir() and (root / "tokenizer_2").is_dir():
        return str(root)
    return None


def resolve_tokenizers(setting: str | Path, arch: str | None, model: str | Path,
                       option: str = "model.tokenizers") -> str:
    """The tokenizer source for `model` (a checkpoint of preset `arch`; None: not known before
    loading, and then `setting` comes back unchecked). `setting` is "auto" (the model's own,
    `own_tokenizers`), "toy", "hub" or a folder. Refuses, naming `option`, an sdxl single file
    with "auto", and tokenizers whose vocabulary does not fit the model's text encoders (the toy
    tokenizers with an sdxl model, SDXL's with a toy one). Reads at most two vocab.json files."""
    from tunelab.models.arch import load_arch

    setting = str(setting)
    if arch is None:
        return setting
    if setting == "auto":
        own = own_tokenizers(model, arch)
        if own is None:
            raise TunelabError(
                f"{option} = 'auto' (the default) uses the model's own tokenizers, but {model} is a single-file "
                f"{arch} checkpoint and carries none; set {option} to {OFFLINE_ROUTE}"
            )
        setting = own
    vocab, expected = _vocab_size(setting, option), load_arch(arch).text_encoder_1["vocab_size"]
    if vocab is not None and vocab != expected:
        fix = f"set {option} to {OFFLINE_ROUTE}" if arch != "toy" else f"use {option} = 'auto' (or 'toy') for a toy model"
        raise TunelabError(
            f"{option} = {setting!r}: its vocabulary has {vocab:,} tokens, but the text encoders of {model} "
            f"({arch}) have {expected:,}, so its token ids do not fit them; {fix}"
        )
    return setting


def _vocab_size(source: str, option: str) -> int | None:
    """Tokens in a tokenizer source's vocabulary, without building it: from TE1's vocab.json (the
    diffusers repository's layout) or tokenizer.json (what transformers 5 saves); None if neither."""
    import json

    from tunelab.models.arch import load_arch

    if source == "toy":
        return len(_toy_vocab()[0])
    if source == "hub":
        return load_arch("sdxl").text_encoder_1["vocab_size"]
    folder = _tokenizer_dirs(Path(source), option)[0]
    if (folder / "vocab.json").is_file():
        return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        return len(model["vocab"]) if "vocab" in model else None
    return None


# --- chunking -----------------------------------------------------------------------------------------


@dataclass
class ChunkedTokens:
    ids: torch.Tensor  # (B, chunks, 77) int64
    n_tokens: list[int]  # tokens per prompt, without BOS/EOS
    truncated: list[int]  # tokens dropped per prompt because of max_chunks

    @property
    def n_chunks(self) -> int:
        return self.ids.shape[1]

    @property
    def n_truncated_prompts(self) -> int:
        return sum(1 for t in self.truncated if t > 0)


def chunks_needed(n_tokens: int) -> int:
    """75 tokens fit one chunk, 76 need two; an empty prompt still takes one."""
    return max(1, math.ceil(n_tokens / CHUNK_TOKENS))


def wrap_chunk(window: Sequence[int], bos: int, eos: int, pad: int) -> list[int]:
    """BOS + window + EOS, padded with the tokenizer's pad id to 77 positions."""
    if len(window) > CHUNK_TOKENS:
        raise ValueError(f"a window holds at most {CHUNK_TOKENS} tokens, got {len(window)}")
    return [bos, *window, eos] + [pad] * (CHUNK_TOKENS - len(window))


def chunk_token_ids(
    token_ids: Sequence[Sequence[int]],
    bos: int,
    eos: int,
    pad: int,
    max_chunks: int = 1,
    n_chunks: int | None = None,
) -> ChunkedTokens:
    """Split each prompt's ids (no specials) into wrapped 75-token windows.

    n_chunks=None uses as many chunks as the longest prompt of the batch needs (capped at
    max_chunks); shorter prompts get empty chunks (BOS EOS PAD...), as A1111 does. A fixed
    n_chunks gives every batch the same context length.
    """
    if max_chunks < 1:
        raise TunelabError(f"max_chunks must be >= 1 (1 = the classic 77-token limit), got {max_chunks}")
    need = max((chunks_needed(len(t)) for t in token_ids), default=1)
    count = min(need, max_chunks) if n_chunks is None else n_chunks
    rows, truncated = [], []
    for ids in token_ids:
        kept = list(ids[: count * CHUNK_TOKENS])
        truncated.append(len(ids) - len(kept))
        windows = [kept[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS] for i in range(count)]
        rows.append([wrap_chunk(w, bos, eos, pad) for w in windows])
    return ChunkedTokens(torch.tensor(rows, dtype=torch.long), [len(t) for t in token_ids], truncated)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_chunks: int = 1, n_chunks: int | None = None) -> ChunkedTokens:
    """Tokenize prompts with one tokenizer and chunk them with its own BOS/EOS/PAD ids."""
    raw = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return chunk_token_ids(
        raw, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, max_chunks, n_chunks
    )


def count_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]]


def count_truncated(tokenizers: tuple[Any, Any], prompts: Sequence[str], max_chunks: int) -> int:
    """How many prompts `encode_prompts` would cut: more tokens than max_chunks x 75 for either
    tokenizer (the trainer's banner and its `prompts_truncated` metric)."""
    if not prompts:
        return 0
    limit = max_chunks * CHUNK_TOKENS
    counts = zip(count_tokens(tokenizers[0], prompts), count_tokens(tokenizers[1], prompts))
    return sum(1 for a, b in counts if max(a, b) > limit)


# --- encoding -----------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77*chunks, D1+D2)
    pooled: torch.Tensor  # (B, P) TE2's projected pooled output of chunk 0
    n_chunks: int
    truncated: list[int]  # per prompt, the larger of the two tokenizers' counts


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / compile wrapper (for its config); calls still go through the wrapper."""
    return getattr(module, "module", getattr(module, "_orig_mod", module))


def _encode_chunks(encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int) -> tuple[torch.Tensor, Any]:
    b, c, t = ids.shape  # (B, chunks, 77)
    device = next(encoder.parameters()).device
    out = encoder(ids.reshape(b * c, t).to(device), output_hidden_states=True)
    # hidden_states[-1] is the last layer's output *before* final_layer_norm; -2 the penultimate.
    hidden = out.hidden_states[-clip_skip]  # (B*chunks, 77, D)
    return hidden.reshape(b, c * t, hidden.shape[-1]), out


def encode_chunked(
    encoders: tuple[torch.nn.Module, torch.nn.Module], ids1: torch.Tensor, ids2: torch.Tensor, clip_skip: int = 2,
    clip_skip_te2: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked ids (B, chunks, 77) of each tokenizer -> (TE1 states (B, 77*chunks, D1), TE2 states
    (B, 77*chunks, D2), TE2's pooled output of chunk 0 (B, P)). TE2's layer is clip_skip_te2
    (None: clip_skip, as training does; A1111 keeps TE2 at 2 whatever its clip skip)."""
    n_layers = min(_unwrap(e).config.num_hidden_layers for e in encoders)
    te2_skip = clip_skip if clip_skip_te2 is None else clip_skip_te2
    for name, skip in (("clip_skip", clip_skip), ("clip_skip_te2", te2_skip)):
        if not 1 <= skip <= n_layers:
            raise TunelabError(f"{name} must be between 1 and {n_layers} (2 = SDXL's penultimate layer), got {skip}")
    h1, _ = _encode_chunks(encoders[0], ids1, clip_skip)
    h2, out2 = _encode_chunks(encoders[1], ids2, te2_skip)
    pooled = out2.text_embeds.reshape(ids2.shape[0], ids2.shape[1], -1)[:, 0]  # (B, P) from chunk 0
    return h1, h2, pooled


def warn_truncated(truncated: Sequence[int], max_chunks: int, level: int = logging.WARNING) -> None:
    if any(truncated):
        log.log(
            level,
            "%d of %d prompts were longer than max_chunks=%d (%d tokens) and were truncated; raise max_chunks to keep them",
            sum(1 for t in truncated if t), len(truncated), max_chunks, max_chunks * CHUNK_TOKENS,
        )


def encode_prompts(
    tokenizers: tuple[Any, Any],
    encoders: tuple[torch.nn.Module, torch.nn.Module],
    prompts: Sequence[str],
    max_chunks: int = 1,
    clip_skip: int = 2,
    n_chunks: int | None = None,
) -> Conditioning:
    """SDXL conditioning for a batch of prompts (see the module docstring for the layout).

    Truncation is returned (`Conditioning.truncated`) and logged at debug level only: this runs
    every micro-step, so the trainer counts it instead (banner, `prompts_truncated` metric)."""
    tok1 = tokenize(tokenizers[0], prompts, max_chunks, n_chunks)
    tok2 = tokenize(tokenizers[1], prompts, max_chunks, n_chunks=tok1.n_chunks)
    h1, h2, pooled = encode_chunked(encoders, tok1.ids, tok2.ids, clip_skip)
    truncated = [max(a, b) for a, b in zip(tok1.truncated, tok2.truncated)]
    warn_truncated(truncated, max_chunks, level=logging.DEBUG)
    return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled, tok1.n_chunks, truncated)


def time_ids(
    original_size: Sequence[tuple[int, int]],
    crop_top_left: Sequence[tuple[int, int]],
    target_size: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """(B, 6) micro-conditioning: original (h, w), crop (top, left), target (h, w), per sample."""
    rows = [[*o, *c, *t] for o, c, t in zip(original_size, crop_top_left, target_size, strict=True)]
    return torch.tensor(rows, dtype=torch.float32)
