"""Small stand-ins for the SDXL files a new user has, built in code: a `.safetensors` whose header
reads as an SDXL checkpoint (the UNet's real conv_in shape and the size/crop embedding; a few
KB, not 6.9 GB), and a tokenizer folder in the diffusers layout with SDXL's vocabulary size."""

from __future__ import annotations

from pathlib import Path


def sdxl_header_file(path: Path) -> Path:
    """A file `detect_arch` calls sdxl from its header (no tunelab metadata: the shapes decide).
    It holds two tensors only, so loading its weights fails loudly: a test that reaches it loaded
    too early."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=torch.float16),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1, 1, dtype=torch.float16)}, str(path))
    return path


def sdxl_sized_tokenizers(root: Path, vocab_size: int = 49408) -> Path:
    """root/tokenizer and root/tokenizer_2: real CLIPTokenizers whose vocabulary has SDXL's 49,408
    entries (the toy vocabulary padded with filler tokens)."""
    from transformers import CLIPTokenizer

    from tunelab.models.text import _toy_vocab

    vocab, merges = _toy_vocab()
    vocab = dict(vocab)
    for i in range(vocab_size - len(vocab)):
        vocab[f"filler{i}</w>"] = len(vocab)
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad).save_pretrained(str(root / sub))
    return root
