"""A1111 emphasis, weighted chunks, the weighting rule, empty-prompt options and prompt sources."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.sample.prompts import (
    apply_weights, encode_pair, encode_weighted, gather_prompts, parse_emphasis, prompts_from_file,
    prompts_from_index, weighted_chunks,
)

R = 1.1


@pytest.mark.parametrize("text, expected", [
    ("a b", [("a b", 1.0)]),
    ("(a)", [("a", R)]),
    ("[a]", [("a", 1 / R)]),
    ("((a))", [("a", R * R)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0), b", [("a", 0.0), (", b", 1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * R), (" b", R)]),
    ("[a (b:2)]", [("a ", 1 / R), ("b", 2 / R)]),
    (r"\(a\) (b)", [("(a) ", 1.0), ("b", R)]),
    ("(a", [("a", R)]),  # unbalanced opener applies to the rest
    ("a) b", [("a) b", 1.0)]),  # stray closer is text
    ("a BREAK b", [("a ", 1.0), ("BREAK", -1.0), (" b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),  # only the word BREAK
    ("", [("", 1.0)]),
])
def test_parse_emphasis(text, expected):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


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


def test_empty_prompt_uncond_options(sample_components, toy_tokenizers):
    enc = (sample_components.text_encoder_1, sample_components.text_encoder_2)
    _, neg_empty = encode_pair(toy_tokenizers, enc, "", "", uncond="empty")
    pos, neg_zero = encode_pair(toy_tokenizers, enc, "", "", uncond="zeros")
    assert torch.equal(neg_empty.context, pos.context)  # the encoded empty string
    assert neg_zero.context.abs().sum() == 0 and neg_zero.pooled.abs().sum() == 0
    _, neg_text = encode_pair(toy_tokenizers, enc, "red", "blue", uncond="zeros")  # a real negative wins
    assert neg_text.context.abs().sum() > 0
    with pytest.raises(TunelabError):
        encode_pair(toy_tokenizers, enc, "", "", uncond="none")


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
