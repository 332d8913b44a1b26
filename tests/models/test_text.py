"""Text conditioning: 75-token chunking on hand-worked sequences, per-encoder padding, truncation
reporting, clip_skip, pooled output, time ids, tokenizer loading."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models.text import (
    CHUNK_TOKENS, chunk_token_ids, chunks_needed, count_tokens, encode_prompts, load_tokenizers, time_ids, tokenize,
)

BOS, EOS, PAD = 900, 901, 0


@pytest.mark.parametrize("n, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunks_needed(n, chunks):
    assert chunks_needed(n) == chunks


def test_exactly_75_tokens_fill_one_chunk():
    ids = list(range(1, 76))
    out = chunk_token_ids([ids], BOS, EOS, PAD, max_chunks=3)
    assert out.ids.shape == (1, 1, 77)
    assert out.ids[0, 0].tolist() == [BOS, *ids, EOS]
    assert out.truncated == [0]


def test_76_tokens_spill_into_a_second_chunk():
    ids = list(range(1, 77))
    out = chunk_token_ids([ids], BOS, EOS, PAD, max_chunks=3)
    assert out.ids.shape == (1, 2, 77)
    assert out.ids[0, 0].tolist() == [BOS, *ids[:75], EOS]
    assert out.ids[0, 1].tolist() == [BOS, 76, EOS] + [PAD] * 74


def test_150_and_151_tokens():
    two = chunk_token_ids([list(range(1, 151))], BOS, EOS, PAD, max_chunks=3)
    assert two.n_chunks == 2 and two.ids[0, 1].tolist() == [BOS, *range(76, 151), EOS]
    three = chunk_token_ids([list(range(1, 152))], BOS, EOS, PAD, max_chunks=3)
    assert three.n_chunks == 3 and three.ids[0, 2].tolist() == [BOS, 151, EOS] + [PAD] * 74


def test_empty_prompt_is_one_chunk_of_padding():
    out = chunk_token_ids([[]], BOS, EOS, PAD, max_chunks=3)
    assert out.ids.tolist() == [[[BOS, EOS] + [PAD] * 75]]
    assert out.n_tokens == [0] and out.truncated == [0]


def test_truncation_is_counted_not_silent():
    out = chunk_token_ids([list(range(1, 152)), [5]], BOS, EOS, PAD, max_chunks=2)
    assert out.n_chunks == 2
    assert out.truncated == [1, 0] and out.n_truncated_prompts == 1
    classic = chunk_token_ids([list(range(1, 100))], BOS, EOS, PAD, max_chunks=1)
    assert classic.ids.shape == (1, 1, 77) and classic.truncated == [24]


def test_short_prompts_in_a_long_batch_get_empty_chunks():
    out = chunk_token_ids([list(range(1, 80)), [7, 8]], BOS, EOS, PAD, max_chunks=3)
    assert out.ids.shape == (2, 2, 77)
    assert out.ids[1, 1].tolist() == [BOS, EOS] + [PAD] * 75


def test_fixed_chunk_count_and_bad_max_chunks():
    assert chunk_token_ids([[1]], BOS, EOS, PAD, max_chunks=3, n_chunks=3).ids.shape == (1, 3, 77)
    with pytest.raises(TunelabError, match="max_chunks"):
        chunk_token_ids([[1]], BOS, EOS, PAD, max_chunks=0)


def test_each_tokenizer_pads_its_own_way():
    tok1, tok2 = load_tokenizers("toy")
    assert tok1.pad_token_id == tok1.eos_token_id  # TE1: <|endoftext|>
    assert tok2.pad_token == "!" and tok2.pad_token_id == 0  # TE2: "!" (id 0), as SDXL's tokenizer_2
    a, b = tokenize(tok1, ["red circle"]), tokenize(tok2, ["red circle"])
    assert a.ids[0, 0, :2].tolist() == b.ids[0, 0, :2].tolist() == [tok1.bos_token_id, a.ids[0, 0, 1].item()]
    n = a.n_tokens[0]
    assert a.ids[0, 0, n + 1].item() == b.ids[0, 0, n + 1].item() == tok1.eos_token_id
    assert set(a.ids[0, 0, n + 2:].tolist()) == {tok1.eos_token_id}
    assert set(b.ids[0, 0, n + 2:].tolist()) == {0}


def test_toy_words_are_single_tokens_and_rare_words_fall_back_to_characters():
    from tunelab.models.text import TOY_WORDS

    tok1, _ = load_tokenizers("toy")
    assert count_tokens(tok1, list(TOY_WORDS)) == [1] * len(TOY_WORDS)
    assert count_tokens(tok1, ["red circle astolfo"]) == [3]
    assert count_tokens(tok1, ["zq"]) == [2]


def test_conditioning_shapes_and_pooled_from_first_chunk(toy_components):
    c = toy_components
    toks = load_tokenizers("toy")
    long = "red circle, " * 40  # 80 tokens: two chunks
    cond = encode_prompts(toks, (c.text_encoder_1, c.text_encoder_2), ["blue star", long], max_chunks=3)
    assert cond.context.shape == (2, 2 * 77, 32 + 64) and cond.pooled.shape == (2, 64) and cond.n_chunks == 2
    # pooled of the long prompt = TE2's projected output of its first chunk alone
    ids = tokenize(toks[1], [long], max_chunks=3).ids[:, 0]
    with torch.no_grad():
        direct = c.text_encoder_2(ids).text_embeds
    assert torch.allclose(cond.pooled[1], direct[0], atol=1e-6)


def test_clip_skip_picks_the_hidden_state_from_the_end(toy_components):
    c = toy_components
    toks = load_tokenizers("toy")
    ids = tokenize(toks[0], ["green ring"]).ids[:, 0]
    with torch.no_grad():
        hidden = c.text_encoder_1(ids, output_hidden_states=True).hidden_states
        for skip in (1, 2, 3):
            cond = encode_prompts(toks, (c.text_encoder_1, c.text_encoder_2), ["green ring"], clip_skip=skip)
            assert torch.equal(cond.context[0, :, :32], hidden[-skip][0])
    with pytest.raises(TunelabError, match="clip_skip"):
        encode_prompts(toks, (c.text_encoder_1, c.text_encoder_2), ["x"], clip_skip=9)
    # TE2's layer on its own (A1111 keeps TE2 penultimate whatever its clip skip: sampling's default)
    from tunelab.models.text import encode_chunked

    ids2 = tokenize(toks[1], ["green ring"]).ids
    with torch.no_grad():
        hidden2 = c.text_encoder_2(ids2[:, 0], output_hidden_states=True).hidden_states
        _, h2, _ = encode_chunked((c.text_encoder_1, c.text_encoder_2), ids[:, None], ids2, clip_skip=1, clip_skip_te2=2)
    assert torch.equal(h2[0], hidden2[-2][0])
    with pytest.raises(TunelabError, match="clip_skip_te2"):
        encode_chunked((c.text_encoder_1, c.text_encoder_2), ids[:, None], ids2, clip_skip=1, clip_skip_te2=0)


def test_truncation_reported_in_conditioning(toy_components, caplog):
    import logging

    c = toy_components
    with caplog.at_level(logging.DEBUG, logger="tunelab.models.text"):
        cond = encode_prompts(load_tokenizers("toy"), (c.text_encoder_1, c.text_encoder_2), ["red " * 100], max_chunks=1)
    assert cond.truncated == [25] and cond.context.shape[1] == 77
    # returned and logged at debug level: this runs every micro-step, and the trainer counts instead
    assert [r.levelno for r in caplog.records if "truncated" in r.getMessage()] == [logging.DEBUG]


def test_time_ids_order():
    t = time_ids([(1024, 768)], [(0, 32)], [(1024, 1024)])
    assert t.tolist() == [[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0]]


def test_tokenizers_from_a_local_folder(tmp_path):
    tok1, tok2 = load_tokenizers("toy")
    tok1.save_pretrained(tmp_path / "tokenizer")
    tok2.save_pretrained(tmp_path / "tokenizer_2")
    a, b = load_tokenizers(tmp_path)
    assert a("red circle")["input_ids"] == tok1("red circle")["input_ids"]
    assert b.pad_token_id == 0 and a.pad_token_id == tok1.eos_token_id
    with pytest.raises(TunelabError, match="tokenizer_2"):
        load_tokenizers(tmp_path / "tokenizer")


def test_hub_download_needs_explicit_permission():
    with pytest.raises(TunelabError, match="--allow-download"):
        load_tokenizers("hub")


def test_chunk_size_constant():
    assert CHUNK_TOKENS == 75
