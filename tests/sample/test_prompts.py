"""A1111 emphasis, chunking, the weighting rule, the empty negative, prompt/negative lengths, clip
skip and prompt sources, each against A1111 v1.10's behaviour (file and function cited per test)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.sample.prompts import (
    apply_weights, encode_pair, encode_weighted, gather_prompts, parse_emphasis, prompts_from_file,
    prompts_from_index, weighted_chunks,
)

R = 1.1


# Expected values: A1111 v1.10 modules/prompt_parser.py, parse_prompt_attention (its doctests first,
# then cases worked through its rules: two bracket stacks, a lone backslash yields "", BREAK split at
# word boundaries, brackets multiply the BREAK mark, runs of equal weight merged, "" included).
@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # v1.10's weight pattern allows spaces around the number
    ("(a:0), b", [("a", 0.0), (", b", 1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * R), (" b", R)]),
    ("[a (b:2)]", [("a ", 1 / R), ("b", 2 / R)]),
    ("([a)]", [("a", 1.0 * R * (1 / R))]),  # round and square brackets close independently
    ("a) b", [("a) b", 1.0)]),  # a stray closer is text
    ("(x:-1) y", [("x", -1.0), (" y", 1.0)]),  # a negative weight, not a break
    (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped
    (r"\:", [(":", 1.0)]),
    ("\\m/, a\\", [("m/, a", 1.0)]),  # the tag \m/; a backslash at the very end
    (r"a\\b", [("a\\b", 1.0)]),  # an escaped backslash is one backslash
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a-BREAK-b", [("a-", 1.0), ("BREAK", -1.0), ("-b", 1.0)]),
    ("BREAKFAST, _BREAK_", [("BREAKFAST, _BREAK_", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),  # inside brackets the mark is weighted too
    ("", [("", 1.0)]),
])
def test_parse_emphasis_matches_a1111(text, expected):
    assert parse_emphasis(text) == expected


def test_a_weight_that_is_no_number_is_refused():
    # A1111 raises ValueError from float("1.2.3") inside parse_prompt_attention; we name the fix
    with pytest.raises(TunelabError, match=r"'1\.2\.3'.*is not a number"):
        parse_emphasis("(a:1.2.3)")


def test_weighted_chunks_hand_worked(toy_tokenizers):
    tok = toy_tokenizers[0]
    red, circle, star = (tok(w, add_special_tokens=False)["input_ids"] for w in ("red", "circle", "star"))
    assert len(red) == len(circle) == len(star) == 1  # toy vocabulary words are single tokens
    wc = weighted_chunks(tok, ["red (circle:1.5) [star]"])
    assert wc.ids.shape == (1, 1, 77)
    ids, w = wc.ids[0, 0].tolist(), wc.weights[0, 0].tolist()
    assert ids[:5] == [tok.bos_token_id, red[0], circle[0], star[0], tok.eos_token_id]
    assert w[:5] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    assert w[5:] == [1.0] * 72  # padding weighs 1


def test_break_starts_a_new_chunk_and_pads_per_encoder(toy_tokenizers):
    t1, t2 = toy_tokenizers
    a = weighted_chunks(t1, ["red BREAK (blue:2)"])
    b = weighted_chunks(t2, ["red BREAK (blue:2)"])
    assert a.ids.shape == (1, 2, 77)
    blue = t1("blue", add_special_tokens=False)["input_ids"][0]
    assert a.ids[0, 1, :3].tolist() == [t1.bos_token_id, blue, t1.eos_token_id]
    assert a.weights[0, 1, 1].item() == pytest.approx(2.0)
    assert a.ids[0, 0, 3].item() == t1.pad_token_id and b.ids[0, 0, 3].item() == 0  # EOS vs "!" padding


def test_long_prompt_chunks_and_truncation(toy_tokenizers):
    tok = toy_tokenizers[0]
    long = ", ".join(["red circle"] * 60)  # ~180 tokens
    assert weighted_chunks(tok, [long], max_chunks=3).ids.shape[1] == 3
    capped = weighted_chunks(tok, [long], max_chunks=1)
    assert capped.ids.shape[1] == 1 and capped.truncated[0] > 0


def _chunk_ids(tok, prompt, **kw):
    """The prompt's chunks as lists of token ids without BOS/EOS/PAD."""
    wc = weighted_chunks(tok, [prompt], **kw)
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    return [[i for i in chunk if i not in specials] for chunk in wc.ids[0].tolist()], wc


def test_break_placement_matches_a1111(toy_tokenizers):
    # A1111 v1.10 modules/sd_hijack_clip.py, tokenize_line: every BREAK calls next_chunk() (an empty
    # chunk too); the last chunk is added only if it holds tokens or there is none yet.
    tok = toy_tokenizers[0]
    red, blue = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    assert _chunk_ids(tok, "BREAK red")[0] == [[], [red]]
    assert _chunk_ids(tok, "red BREAK BREAK blue")[0] == [[red], [], [blue]]
    assert _chunk_ids(tok, "red BREAK")[0] == [[red]]
    assert _chunk_ids(tok, "BREAK")[0] == [[]]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("red-", "-blue")]  # BREAK at word boundaries
    assert _chunk_ids(tok, "red-BREAK-blue")[0] == ids
    # inside brackets the mark is weighted (-1.1), so it is no break: the word is encoded at -1.1
    chunks, wc = _chunk_ids(tok, "(red BREAK blue)")
    word = tok("break", add_special_tokens=False)["input_ids"]
    assert chunks == [[red, *word, blue]] and wc.weights[0, 0, 2].item() == pytest.approx(-1.1)


def test_negative_weight_is_encoded_not_a_break(toy_tokenizers):
    tok = toy_tokenizers[0]
    chunks, wc = _chunk_ids(tok, "(red:-1) blue")
    assert len(chunks) == 1 and len(chunks[0]) == 2
    assert wc.weights[0, 0, 1:3].tolist() == [-1.0, 1.0]


def test_comma_backoff_as_a1111(toy_tokenizers):
    # A1111 v1.10 sd_hijack_clip.tokenize_line with opts.comma_padding_backtrack: when a chunk holds 75
    # tokens and the next one is not a comma, the tokens after its last comma move to the next chunk
    # if that comma is at most `backtrack` tokens from the end (75 - position <= backtrack).
    tok = toy_tokenizers[0]
    red, blue = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    comma = tok.convert_tokens_to_ids(",</w>")
    prompt = "red " * 70 + ", " + "(blue:1.5) " * 10  # red x70 (0..69), comma at 70, blue x10
    assert len(tok("red " * 70 + ", " + "blue " * 10, add_special_tokens=False)["input_ids"]) == 81
    cut = [[red] * 70 + [comma] + [blue] * 4, [blue] * 6]  # at exactly 75 tokens
    backed = [[red] * 70 + [comma], [blue] * 10]  # 75 - 70 = 5 tokens back
    for backtrack, expected in ((20, backed), (5, backed), (4, cut), (0, cut)):
        assert _chunk_ids(tok, prompt, comma_backtrack=backtrack)[0] == expected, backtrack
    _, wc = _chunk_ids(tok, prompt)
    assert wc.weights[0, 1, 1:11].tolist() == pytest.approx([1.5] * 10)  # weights move with their tokens
    with pytest.raises(TunelabError, match="comma_backtrack"):
        weighted_chunks(tok, [prompt], comma_backtrack=75)


def test_comma_backoff_changes_chunk_0_and_the_pooled_vector(sample_components, toy_tokenizers):
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    prompt = "red " * 70 + ", " + "blue " * 10
    a1111 = encode_weighted(toy_tokenizers, enc, [prompt])
    cut = encode_weighted(toy_tokenizers, enc, [prompt], comma_backtrack=0)
    assert not torch.allclose(a1111.pooled, cut.pooled) and not torch.allclose(a1111.context[:, :77], cut.context[:, :77])


def test_apply_weights_hand_worked():
    # one prompt, one chunk of 77 tokens, 1 feature: token 1 has value 2, all others 1.
    h = torch.ones(1, 77, 1)
    h[0, 1, 0] = 2.0
    w = torch.ones(1, 1, 77)
    w[0, 0, 1] = 3.0
    out = apply_weights(h, w)
    # before: mean = 78/77; weighted: token 1 -> 6, mean 82/77; rescale by 78/82.
    assert out[0, 1, 0].item() == pytest.approx(6 * 78 / 82)
    assert out[0, 0, 0].item() == pytest.approx(78 / 82)
    assert out.mean().item() == pytest.approx(h.mean().item())


def test_unweighted_prompt_matches_foundation_encoding(sample_components, toy_tokenizers):
    from tunelab.models.text import encode_prompts

    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    ours = encode_weighted(toy_tokenizers, enc, ["red circle on grass"], max_chunks=2)
    with torch.no_grad():
        ref = encode_prompts(toy_tokenizers, enc, ["red circle on grass"], max_chunks=2)
    assert torch.allclose(ours.context, ref.context, atol=1e-6) and torch.allclose(ours.pooled, ref.pooled)
    weighted = encode_weighted(toy_tokenizers, enc, ["(red:1.5) circle on grass"], max_chunks=2)
    assert not torch.allclose(weighted.context, ref.context)


def test_empty_negative_is_zeros_as_a1111_sdxl(sample_components, toy_tokenizers):
    # A1111 v1.10 modules/sd_models_xl.py, get_learned_conditioning: a negative batch of only "" gets
    # force_zero_embeddings=['txt']: zero context and zero pooled vector. `x == ''` exactly.
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    pos, neg = encode_pair(toy_tokenizers, enc, "red", "")
    assert neg.context.shape == (1, 77, pos.context.shape[-1]) and neg.context.abs().sum() == 0
    assert neg.pooled.abs().sum() == 0
    _, space = encode_pair(toy_tokenizers, enc, "red", " ")  # not "": encoded
    assert space.context.abs().sum() > 0
    _, neg_empty = encode_pair(toy_tokenizers, enc, "red", "", uncond="empty")  # ComfyUI: the encoded ""
    assert torch.equal(neg_empty.context, encode_weighted(toy_tokenizers, enc, [""]).context)
    _, neg_text = encode_pair(toy_tokenizers, enc, "red", "blue")  # a real negative is encoded
    assert neg_text.context.abs().sum() > 0
    with pytest.raises(TunelabError, match="uncond"):
        encode_pair(toy_tokenizers, enc, "", "", uncond="none")


def test_prompt_and_negative_keep_their_own_lengths(sample_components, toy_tokenizers):
    # A1111 v1.10: cond and uncond are encoded apart (processing.py), and CFGDenoiser.forward
    # (sd_samplers_cfg_denoiser.py) pads them only with opts.pad_cond_uncond (default False), then
    # with chunks of the encoded empty prompt (pad_cond_uncond / cond_stage_model_empty_prompt).
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    long = ", ".join(["red circle"] * 40)  # two chunks
    pos, neg = encode_pair(toy_tokenizers, enc, long, "blue")
    assert (pos.n_chunks, neg.n_chunks) == (2, 1)
    assert torch.equal(neg.context, encode_weighted(toy_tokenizers, enc, ["blue"]).context)  # not padded
    empty = encode_weighted(toy_tokenizers, enc, [""]).context
    pos_p, neg_p = encode_pair(toy_tokenizers, enc, long, "blue", pad_conds=True)
    assert torch.equal(pos_p.context, pos.context) and neg_p.n_chunks == 2
    assert torch.equal(neg_p.context[:, :77], neg.context) and torch.equal(neg_p.context[:, 77:], empty)
    _, zero_p = encode_pair(toy_tokenizers, enc, long, "", pad_conds=True)  # zeros, then empty-prompt chunks
    assert zero_p.context[:, :77].abs().sum() == 0 and torch.equal(zero_p.context[:, 77:], empty)


def test_negative_of_another_length_runs_in_its_own_unet_call(sample_components, toy_tokenizers):
    # A1111 v1.10 CFGDenoiser.forward without padding: cond and uncond in separate inner_model calls,
    # then combine_denoised: uncond + (cond - uncond) * scale.
    from tunelab.sample.guidance import BranchPlan, Guidance, GuidedUNet

    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    unet = sample_components.unet
    pos, neg = encode_pair(toy_tokenizers, enc, ", ".join(["red circle"] * 40), "blue")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, ids = torch.tensor([500.0]), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    guided = GuidedUNet(unet, Guidance(cfg=5.0), neg.context, neg.pooled, BranchPlan())
    calls = []
    hook = unet.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["encoder_hidden_states"].shape[1]),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            out = guided(x, t, pos.context, {"text_embeds": pos.pooled, "time_ids": ids})[0]
    finally:
        hook.remove()
    assert sorted(calls) == [77, 154]

    def one(ctx, pooled):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})[0]

    c, u = one(pos.context, pos.pooled), one(neg.context, neg.pooled)
    assert torch.allclose(out, u + 5.0 * (c - u), atol=1e-5)


def test_padding_changes_the_image_and_both_render(toy_model):
    from tunelab.sample.pipeline import SampleSettings, generate

    s = SampleSettings(prompt=", ".join(["red circle"] * 40), negative="blue", seed=3, steps=2, cfg=5.0)
    apart = generate(toy_model, s, output_type="latent").image
    padded = generate(toy_model, dataclasses.replace(s, pad_conds=True), output_type="latent").image
    assert torch.isfinite(apart).all() and (apart - padded).abs().max() > 1e-6


def test_clip_skip_leaves_te2_alone_as_a1111(sample_components, toy_tokenizers):
    # A1111 v1.10 sd_hijack_clip.py FrozenCLIPEmbedderForSDXLWithCustomWords: TE1 takes
    # hidden_states[-CLIP_stop_at_last_layers] (with opts.sdxl_clip_l_skip); sd_hijack_open_clip.py
    # FrozenOpenCLIPEmbedder2WithCustomWords: TE2 always its "penultimate" layer. ComfyUI's
    # SDXLClipModel.clip_layer sets both (comfy/sdxl_clip.py): clip_skip_te2.
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    d1 = sample_components.text_encoder_1.config.hidden_size
    two = encode_weighted(toy_tokenizers, enc, ["red circle"], clip_skip=2).context
    one = encode_weighted(toy_tokenizers, enc, ["red circle"], clip_skip=1).context
    both = encode_weighted(toy_tokenizers, enc, ["red circle"], clip_skip=1, clip_skip_te2=True).context
    assert torch.equal(one[..., d1:], two[..., d1:]) and not torch.allclose(one[..., :d1], two[..., :d1])
    assert torch.equal(both[..., :d1], one[..., :d1]) and not torch.allclose(both[..., d1:], two[..., d1:])


def test_encode_pair_warns_about_prompt_editing(sample_components, toy_tokenizers, caplog):
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    with caplog.at_level(logging.WARNING):
        encode_pair(toy_tokenizers, enc, "[red:blue:0.5] circle", "[green|pink]")
    assert "prompt editing '[red:blue:0.5]'" in caplog.text and "alternation '[green|pink]'" in caplog.text


def test_prompt_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.txt"
    f.write_text("# sanity\ncar, wrc\n\nman with car\n")
    assert prompts_from_file(f) == ["car, wrc", "man with car"]
    idx = tmp_path / "index.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(20)], "tags": [f"tag{i}, red" for i in range(20)],
                             "caption": [None if i % 2 else f"caption {i}" for i in range(20)],
                             "split": ["train"] * 15 + ["holdout"] * 5}), idx)
    a = prompts_from_index(idx, 4, seed=3)
    assert a == prompts_from_index(idx, 4, seed=3) and a != prompts_from_index(idx, 4, seed=4)
    assert all(p.startswith("tag") for p in a)
    caps = prompts_from_index(idx, 20, seed=0, field="caption")
    assert any(p.startswith("caption") for p in caps) and any(p.startswith("tag") for p in caps)  # fallback
    assert len(prompts_from_index(idx, 10, split="holdout")) == 5
    assert all(p for p in prompts_from_index(idx, 3, field="training"))
    assert gather_prompts(["x"], f, True, idx, 2)[:4] == ["x", "car, wrc", "man with car", ""]
