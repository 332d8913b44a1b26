"""Weight drift: the streamed Gram-matrix figures against a direct dense computation on small
SGM-named checkpoints written to real files; precision on near-equal models; problems listed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.analyze import drift, drift_groups, drift_math, drift_read, drift_scan, drift_write
from tunelab.errors import TunelabError
from tunelab.models import blocks

# Real SDXL key names (one or two per group), with small shapes.
KEYS: dict[str, tuple[int, ...]] = {
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (40, 8),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
    "model.diffusion_model.time_embed.0.weight": (16, 4),
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.bias": (8,),
    "model.diffusion_model.output_blocks.2.0.in_layers.2.weight": (8, 8, 3, 3),
    "model.diffusion_model.out.2.bias": (4,),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    "alphas_cumprod": (10,),
}


def write_models(folder: Path, n: int, dtype: torch.dtype = torch.float16, step: float = 0.02,
                 edit=None) -> list[Path]:
    """n checkpoints: a random base plus growing noise; `edit(i, state_dict)` may break one."""
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) for k, s in KEYS.items()}
    paths = []
    for i in range(n):
        sd = {k: (v + step * i * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
        if edit:
            edit(i, sd)
        paths.append(folder / f"m{i}.safetensors")
        save_file(sd, paths[-1])
    return paths


def dense_group(paths: list[Path], member) -> dict[str, np.ndarray]:
    """The reference: every model fully in memory, figures straight from the definitions."""
    sds = [{k: v.double() for k, v in load_file(p).items()} for p in paths]
    n = len(sds)
    d2, n2, dd, dn = (np.zeros((n, n)) for _ in range(4))
    for i in range(n):
        for j in range(n):
            shared = [k for k in sds[i] if k in sds[j] and member(k) and sds[i][k].shape == sds[j][k].shape
                      and torch.isfinite(sds[i][k]).all() and torch.isfinite(sds[j][k]).all()]
            d2[i, j] = sum(float(((sds[i][k] - sds[j][k]) ** 2).sum()) for k in shared)
            n2[i, j] = sum(float((sds[i][k] ** 2).sum()) for k in shared)
            tri = [k for k in shared if k in sds[0] and sds[0][k].shape == sds[i][k].shape
                   and torch.isfinite(sds[0][k]).all()]
            dd[i, j] = sum(float(((sds[i][k] - sds[0][k]) * (sds[j][k] - sds[0][k])).sum()) for k in tri)
            dn[i, j] = sum(float(((sds[i][k] - sds[0][k]) ** 2).sum()) for k in tri)
            if not shared and i != j:
                d2[i, j] = np.nan  # nothing to compare: null, not zero
    first = np.where(np.triu(np.ones((n, n), bool)), n2, n2.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "distance": np.sqrt(d2),
            "relative": np.sqrt(d2) / np.sqrt(first),
            "cosine_models": (n2 + n2.T - d2) / (2 * np.sqrt(n2 * n2.T)),
            "cosine_deltas": dd / np.sqrt(dn * dn.T),
        }


def _m(x) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in x], dtype=float)


# Distances are summed in float32 within a chunk, float64 across (1e-6 measured, no cancellation);
# cosines come from the distances, so they are good to about the same, absolutely.
RTOL, ATOL = 1e-5, 1e-6


# --- the math of one key -----------------------------------------------------------------------------


def _dense(ts) -> tuple[np.ndarray, np.ndarray]:
    x = torch.stack([t.reshape(-1).double() for t in ts])
    return (torch.cdist(x, x) ** 2).numpy(), (x * x).sum(1).numpy()


def test_pair_sums_give_exact_pair_distances_and_norms():
    gen = torch.Generator().manual_seed(1)
    ts = [torch.randn(1000, generator=gen, dtype=torch.float64) for _ in range(5)]
    sq, norm2 = drift_math.pair_sums(ts, chunk=64)
    ref_sq, ref_norm2 = _dense(ts)
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(norm2, ref_norm2, rtol=1e-12)
    assert (np.diag(sq) == 0).all() and (sq == sq.T).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_sum_in_float32_within_1e5(dtype):
    """Differences of 16-bit values are exact in float32; only the sums round (~1e-6 measured)."""
    gen = torch.Generator().manual_seed(2)
    ts = [(torch.randn(300_001, generator=gen) * 0.05).to(dtype) for _ in range(4)]
    sq, norm2 = drift_math.pair_sums(ts)
    ref_sq, ref_norm2 = _dense(ts)
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-5)
    np.testing.assert_allclose(norm2, ref_norm2, rtol=1e-5)


def test_chunking_does_not_change_the_result():
    gen = torch.Generator().manual_seed(2)
    ts = [torch.randn(37, 11, generator=gen).half() for _ in range(3)]
    whole = drift_math.pair_sums(ts, chunk=1 << 20)
    for a, b in zip(drift_math.pair_sums(ts, chunk=5), whole):  # 5 does not divide 407: a short last chunk
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_two_threads_give_the_same_sums():
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 100_003, generator=gen).half()  # odd length: uneven halves, short last chunk
    with ThreadPoolExecutor(2) as pool:
        split = drift_math.pair_sums(x, chunk=4096, workers=pool)
    for a, b, ref in zip(split, drift_math.pair_sums(x, chunk=4096), _dense(list(x))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(a, ref, rtol=1e-5)


def _dense_signs(ts) -> tuple[np.ndarray, np.ndarray]:
    """(agree, both) counts over the moves from ts[0], straight from the definition."""
    moves = [torch.sign(t.reshape(-1).double() - ts[0].reshape(-1).double()) for t in ts]
    n = len(ts)
    agree = np.array([[float(((moves[i] == moves[j]) & (moves[i] != 0)).sum()) for j in range(n)] for i in range(n)])
    both = np.array([[float(((moves[i] != 0) & (moves[j] != 0)).sum()) for j in range(n)] for i in range(n)])
    return agree, both


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sign_counts_are_exact(dtype):
    """Moves from the first model, with ~30 % of the weights left where they were in each model,
    summed over chunks with a short last one and over two threads."""
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(6)
    base = torch.randn(70_001, generator=gen)
    ts = [base.to(dtype)]
    for _ in range(3):
        moved = (base + 0.01 * torch.randn(70_001, generator=gen)).to(dtype)
        keep = torch.rand(70_001, generator=gen) < 0.3
        moved[keep] = ts[0][keep]
        ts.append(moved)
    ref_agree, ref_both = _dense_signs(ts)
    assert 0 < ref_agree[1, 2] < ref_both[1, 2]
    with ThreadPoolExecutor(2) as pool:
        for kwargs in ({"chunk": 4096}, {"chunk": 4096, "workers": pool}, {}):
            sq, norm2, agree, both = drift_math.pair_sums(ts, signs=True, **kwargs)
            np.testing.assert_array_equal(agree, ref_agree)
            np.testing.assert_array_equal(both, ref_both)
            for got, plain in zip((sq, norm2), drift_math.pair_sums(ts, **kwargs)):  # signs change nothing else
                np.testing.assert_array_equal(got, plain)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_near_equal_models_far_from_the_first_keep_their_digits(dtype, rel):
    """Two checkpoints 1e-3 apart, both ~1 away from θ_0, weights of norm ~3000 (a long run's
    neighbouring steps). Each distance is summed from its own differences, so no figure comes from
    subtracting large ones: a Gram matrix of the raw weights would lose the distance to cancellation
    (error ~eps·(‖θ‖/‖Δ‖)²), and even a Gram of the deltas against θ_0 would in float32
    (error ~1e-7·(‖θ − θ_0‖/‖Δ‖)², tens of percent here: 45-100 % depending on the BLAS's summation order)."""
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(100_000, generator=gen, dtype=torch.float64) * 10).to(dtype)
    one = (base + torch.randn(100_000, generator=gen, dtype=torch.float64) * 3e-3).to(dtype)
    two = (one + torch.randn(100_000, generator=gen, dtype=torch.float64) * 3e-6).to(dtype)
    ts = [base, one, two]
    ref, _ = _dense(ts)
    sq, _ = drift_math.pair_sums(ts)
    assert math.sqrt(sq[1, 2]) == pytest.approx(math.sqrt(ref[1, 2]), rel=rel)
    assert math.sqrt(sq[0, 2]) == pytest.approx(math.sqrt(ref[0, 2]), rel=rel)
    raw = torch.stack(ts).double() @ torch.stack(ts).double().T  # what the naive method would use
    naive = math.sqrt(max(float(raw[1, 1] + raw[2, 2] - 2 * raw[1, 2]), 0.0))
    assert abs(naive - math.sqrt(ref[1, 2])) / math.sqrt(ref[1, 2]) > 1e-6  # the test would catch it
    if dtype == torch.float32:  # and a float32 Gram of the deltas from θ_0 is off by tens of percent
        d = torch.stack([one - base, two - base])
        g = d @ d.T
        gram = math.sqrt(max(float(g[0, 0] + g[1, 1] - 2 * g[0, 1]), 0.0))
        assert abs(gram - math.sqrt(ref[1, 2])) / math.sqrt(ref[1, 2]) > 0.1


# --- whole files against the dense reference ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scan_matches_dense_computation_for_every_group(tmp_path, dtype):
    paths = write_models(tmp_path, 4, dtype)
    doc = drift_write.report(drift_scan.scan(paths, progress=False))
    assert doc["ml"] == [p.name for p in paths]
    assert list(doc["dm"]) == ["te1", "te2", "unet", "vae", "other", "all"]
    for name in doc["dm"]:
        member = (lambda k: True) if name == "all" else (lambda k, c=name: blocks.component_of(k) == c)
        ref = dense_group(paths, member)
        np.testing.assert_allclose(_m(doc["dm"][name]), ref["distance"], rtol=RTOL)
        for metric in ("relative", "cosine_models", "cosine_deltas"):
            np.testing.assert_allclose(_m(doc[metric]["components"][name]), ref[metric], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{metric} of {name}")
    for name, m in doc["blocks"].items():
        ref = dense_group(paths, lambda k: blocks.unet_block_of(k) == name)
        np.testing.assert_allclose(_m(m), ref["distance"], rtol=RTOL)
    for name, m in doc["kinds"].items():
        ref = dense_group(paths, lambda k: blocks.component_of(k) == "unet" and blocks.kind_of(k) == name)
        np.testing.assert_allclose(_m(m), ref["distance"], rtol=RTOL)


def test_files_of_different_dtypes_compare_exactly(tmp_path):
    fp16 = write_models(tmp_path, 2, torch.float16)
    wide = tmp_path / "m1-fp32.safetensors"
    save_file({k: v.float() for k, v in load_file(fp16[1]).items()}, wide)  # same values, wider dtype
    a = drift_write.report(drift_scan.scan(fp16, progress=False))
    b = drift_write.report(drift_scan.scan([fp16[0], wide], progress=False))
    assert a["dm"] == b["dm"]


def test_reused_read_buffers_never_leak_values_between_keys(tmp_path, monkeypatch):
    """Many keys of equal and nearly equal sizes and no read-ahead beyond the next key, so the
    reader recycles its buffers all the time."""
    monkeypatch.setattr(drift_read, "READ_AHEAD_BYTES", 0)
    taken = {"new": 0, "reused": 0}
    rows = drift_read.Reader._rows

    def counting_rows(self, n, nbytes):
        spares = len(self.spare)
        out = rows(self, n, nbytes)
        taken["reused" if len(self.spare) < spares else "new"] += 1
        return out

    monkeypatch.setattr(drift_read.Reader, "_rows", counting_rows)
    gen = torch.Generator().manual_seed(5)
    shapes = {f"model.diffusion_model.input_blocks.{i}.0.w{j}": (64, 32 + (i + j) % 3) for i in range(9) for j in range(4)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    paths = []
    for m in range(3):
        paths.append(tmp_path / f"r{m}.safetensors")
        save_file({k: (v + 0.1 * m * torch.randn(v.shape, generator=gen)).half() for k, v in base.items()}, paths[-1])
    doc = drift_write.report(drift_scan.scan(paths, progress=False))
    assert taken["reused"] > taken["new"], taken
    for name, m in doc["blocks"].items():
        ref = dense_group(paths, lambda k: blocks.unet_block_of(k) == name)
        np.testing.assert_allclose(_m(m), ref["distance"], rtol=RTOL)


def test_groups_present_in_the_files_only(tmp_path):
    paths = write_models(tmp_path, 2)
    doc = drift_write.report(drift_scan.scan(paths, progress=False))
    assert list(doc["blocks"]) == ["EMB", "IN00", "IN04", "M00", "OUT02", "FINAL"]
    assert list(doc["kinds"]) == ["self-attention", "cross-attention", "other"]
    assert doc["tensors"]["components"]["all"] == len(KEYS)
    assert doc["tensors"]["kinds"] == {"self-attention": 1, "cross-attention": 2, "other": 4}


def test_identical_files_are_at_distance_zero(tmp_path):
    (p,) = write_models(tmp_path, 1)
    doc = drift_write.report(drift_scan.scan([p, p], progress=False))
    assert doc["dm"]["all"] == [[0.0, 0.0], [0.0, 0.0]]
    assert doc["ml"] == [str(p), str(p)]  # same name twice: the paths tell them apart
    assert doc["cosine_models"]["components"]["all"][0][1] == pytest.approx(1.0)


# --- problems are listed, never fatal --------------------------------------------------------------


def _break(i: int, sd: dict) -> None:
    if i == 1:
        del sd["model.diffusion_model.out.2.bias"]  # missing in m1
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 1, 1, dtype=sd["alphas_cumprod"].dtype)
        sd["extra.only.in.m1"] = torch.ones(3, dtype=torch.float16)
    if i == 2:
        sd["first_stage_model.decoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
        sd["model.diffusion_model.time_embed.0.weight"][1, :2] = float("inf")


def test_missing_mismatched_and_non_finite_tensors_are_listed(tmp_path):
    paths = write_models(tmp_path, 3, edit=_break)
    doc = drift_write.report(drift_scan.scan(paths, progress=False))
    p = doc["problems"]
    assert {(e["key"], tuple(e["missing_in"])) for e in p["missing"]} == {
        ("model.diffusion_model.out.2.bias", ("m1.safetensors",)),
        ("extra.only.in.m1", ("m0.safetensors", "m2.safetensors")),
    }
    assert p["shape_mismatch"] == [{"key": "model.diffusion_model.input_blocks.0.0.weight",
                                    "shapes": {"m0.safetensors": [8, 4, 3, 3], "m1.safetensors": [8, 4, 1, 1],
                                               "m2.safetensors": [8, 4, 3, 3]}}]
    assert {(e["key"], e["model"], e["count"]) for e in p["non_finite"]} == {
        ("first_stage_model.decoder.conv_in.weight", "m2.safetensors", 1),
        ("model.diffusion_model.time_embed.0.weight", "m2.safetensors", 2),
    }
    # Each pair is measured over the tensors both of its models hold intact.
    for name in ("unet", "vae", "other", "all"):
        member = (lambda k: True) if name == "all" else (lambda k, c=name: blocks.component_of(k) == c)
        ref = dense_group(paths, member)
        np.testing.assert_allclose(_m(doc["dm"][name]), ref["distance"], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(_m(doc["cosine_deltas"]["components"][name]), ref["cosine_deltas"],
                                   rtol=RTOL, atol=ATOL, err_msg=name)


def test_per_tensor_figures_equal_one_tensor_groups(tmp_path):
    """tensors.csv's vectorised figures against `group` over each tensor alone, with missing,
    mismatched and non-finite tensors among them."""
    result = drift_scan.scan(write_models(tmp_path, 3, edit=_break), progress=False, signs=True)
    figures = drift_groups.tensor_figures(result)
    for k, t in enumerate(result.tensors):
        g = drift_groups.group(t.key, [t], 3)
        compared = g.compared.astype(bool)
        for name, ref in (("l2", g.distance()), ("relative", g.relative()),
                          ("cosine_models", g.cosine_models()), ("cosine_deltas", g.cosine_deltas()),
                          ("sign_agreement", g.sign_agreement())):
            np.testing.assert_allclose(np.where(compared, figures[name][k], np.nan), np.where(compared, ref, np.nan),
                                       rtol=1e-12, err_msg=f"{name} of {t.key}")


def test_sign_agreement_per_group_against_dense(tmp_path):
    """Counted over the tensors that models 0, i and j all hold intact, with the same shape."""
    paths = write_models(tmp_path, 4, edit=_break)
    doc = drift_write.report(drift_scan.scan(paths, progress=False, signs=True))
    sds = [load_file(p) for p in paths]
    for name, m in doc["sign_agreement"]["components"].items():
        agree, both = np.zeros((4, 4)), np.zeros((4, 4))
        for key in sds[0]:
            if name != "all" and blocks.component_of(key) != name:
                continue
            for i in range(1, 4):
                for j in range(1, 4):
                    ts = [sds[0].get(key), sds[i].get(key), sds[j].get(key)]
                    if any(t is None or t.shape != ts[0].shape or not torch.isfinite(t).all() for t in ts):
                        continue
                    a, b = _dense_signs(ts)
                    agree[i, j] += a[1, 2]
                    both[i, j] += b[1, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = np.where(both > 0, agree / both, np.nan)
        ref[0, :] = ref[:, 0] = np.nan
        np.testing.assert_allclose(_m(m), ref, rtol=1e-12, err_msg=name)
    assert "sign_agreement" not in drift_write.report(drift_scan.scan(paths, progress=False))  # only when asked


def test_a_group_no_pair_shares_is_null_not_zero(tmp_path):
    def split(i, sd):
        if i == 1:
            del sd["first_stage_model.decoder.conv_in.weight"]

    paths = write_models(tmp_path, 2, edit=split)
    doc = drift_write.report(drift_scan.scan(paths, progress=False))
    assert doc["dm"]["vae"] == [[0.0, None], [None, 0.0]]


# --- input checks --------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors(tmp_path):
    (p,) = write_models(tmp_path, 1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 definitely a zip, not safetensors")
    cases = {
        "at least 2": [p],
        "no such file": [p, tmp_path / "nope.safetensors"],
        "is a folder": [p, tmp_path],
        "not a valid .safetensors": [p, junk],
    }
    for expected, args in cases.items():
        with pytest.raises(TunelabError, match=expected):
            drift_scan.scan(args, progress=False)


@pytest.mark.parametrize(("pair", "n", "expected"), [(None, 4, (0, 3)), ((1, -1), 4, (1, 3)), ((2, 0), 3, (2, 0))])
def test_resolve_pair(pair, n, expected):
    assert drift.resolve_pair(pair, n) == expected


@pytest.mark.parametrize("pair", [(0, 4), (-5, 1), (2, 2), (1, -3)])
def test_resolve_pair_rejects(pair):
    with pytest.raises(TunelabError, match="--pair"):
        drift.resolve_pair(pair, 4)
