"""Single-file checkpoints: exact round trips, optional and extra keys, dtypes, metadata, atomic
writes, malformed files, pickle refusal, diffusers folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.models import keys as K
from tunelab.models.checkpoint import (
    export_diffusers, import_diffusers, inspect_file, inspect_preset, load_checkpoint, new_checkpoint, save_checkpoint,
)
from tunelab.models.safetensors_io import TensorSpec, read_header, write_streaming


def _assert_same_file_tensors(a: Path, b: Path) -> None:
    A, B = load_file(a), load_file(b)
    assert A.keys() == B.keys(), sorted(set(A) ^ set(B))[:5]
    for k in A:
        assert A[k].dtype == B[k].dtype and torch.equal(A[k], B[k]), k


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_toy_round_trip_is_exact(tmp_path, dtype):
    src = new_checkpoint("toy", tmp_path / "a.safetensors", seed=1, dtype=dtype)
    comps = load_checkpoint(src)
    assert next(comps.unet.parameters()).dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    save_checkpoint(comps, tmp_path / "b.safetensors", dtype=dtype)
    _assert_same_file_tensors(src, tmp_path / "b.safetensors")
    comps2 = load_checkpoint(tmp_path / "b.safetensors")  # load -> save -> load: identical modules
    for name, module in comps.modules().items():
        other = comps2.modules()[name].state_dict()
        assert all(torch.equal(t, other[k]) for k, t in module.state_dict().items())


def test_loaded_weights_land_in_the_right_modules(toy_checkpoint, toy_components):
    raw = load_file(toy_checkpoint)
    unet, te2 = toy_components.unet, toy_components.text_encoder_2
    assert torch.equal(unet.conv_in.weight, raw[K.UNET + "input_blocks.0.0.weight"])
    fused = raw[K.TE2 + "transformer.resblocks.1.attn.in_proj_weight"]
    layer = te2.text_model.encoder.layers[1] if hasattr(te2, "text_model") else te2.encoder.layers[1]
    assert torch.equal(layer.self_attn.k_proj.weight, fused.chunk(3)[1])
    assert torch.equal(te2.text_projection.weight, raw[K.TE2 + "text_projection"].t())
    vae_q = toy_components.vae.encoder.mid_block.attentions[0].to_q.weight
    assert torch.equal(vae_q, raw[K.VAE + "encoder.mid.attn_1.q.weight"][:, :, 0, 0])


def test_save_dtype_conversion(tmp_path, toy_components):
    save_checkpoint(toy_components, tmp_path / "h.safetensors", dtype="fp16")
    tensors = load_file(tmp_path / "h.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    w = toy_components.unet.conv_in.weight
    assert torch.equal(tensors[K.UNET + "input_blocks.0.0.weight"], w.to(torch.float16))


def test_files_in_the_wild_with_optional_keys_missing_and_extras(tmp_path, toy_checkpoint):
    """TE1's last layer and TE2's projection absent, v_pred / logit_scale / scheduler buffers present:
    load works and saving reproduces exactly that key set."""
    tensors = load_file(toy_checkpoint)
    optional = K.optional_keys("toy")
    for k in list(tensors):
        if k in optional and (k.startswith(K.TE1) or "text_projection" in k):
            del tensors[k]
    tensors["v_pred"] = torch.zeros(0, dtype=torch.int64)
    tensors[K.TE2 + "logit_scale"] = torch.tensor(4.6052)
    tensors["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    save_file(tensors, tmp_path / "wild.safetensors")
    comps = load_checkpoint(tmp_path / "wild.safetensors")
    assert comps.absent and all(k.startswith((K.TE1, K.TE2 + "text_projection")) for k in comps.absent)
    assert set(comps.extras) == {"v_pred", K.TE2 + "logit_scale", "alphas_cumprod"}
    assert not any(p.is_meta for m in comps.modules().values() for p in m.parameters())
    out = save_checkpoint(comps, tmp_path / "again.safetensors", dtype="fp32")
    _assert_same_file_tensors(tmp_path / "wild.safetensors", out)
    assert read_header(out).metadata["modelspec.prediction_type"] == "v"


def test_missing_required_key_and_wrong_shape_are_named(tmp_path, toy_checkpoint):
    tensors = load_file(toy_checkpoint)
    key = K.UNET + "middle_block.1.proj_in.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "missing.safetensors")
    with pytest.raises(TunelabError, match="missing.*middle_block.1.proj_in.weight"):
        load_checkpoint(tmp_path / "missing.safetensors")
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "shape.safetensors")
    with pytest.raises(TunelabError, match=r"proj_in.weight has shape \(3, 3\)"):
        load_checkpoint(tmp_path / "shape.safetensors")


def test_not_an_sdxl_checkpoint(tmp_path, toy_checkpoint):
    tensors = load_file(toy_checkpoint)
    save_file({k: v for k, v in tensors.items() if "label_emb" not in k}, tmp_path / "sd15.safetensors")
    with pytest.raises(TunelabError, match="SD 1.x/2.x"):
        load_checkpoint(tmp_path / "sd15.safetensors")
    save_file({"lora_unet_down.weight": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(TunelabError, match="no UNet keys"):
        load_checkpoint(tmp_path / "lora.safetensors")


def test_metadata_modelspec_and_training_info(tmp_path, toy_components):
    path = save_checkpoint(toy_components, tmp_path / "m.safetensors", dtype="fp16", title="my run",
                           training={"steps": 120, "learning_rate": 1.5e-6})
    meta = read_header(path).metadata
    assert meta["modelspec.architecture"] == "tunelab-toy-sdxl"
    assert meta["modelspec.title"] == "my run" and meta["modelspec.resolution"] == "64x64"
    assert meta["tunelab.dtype"] == "fp16" and meta["tunelab.arch"] == "toy" and meta["tunelab.version"]
    assert meta["ss_steps"] == "120" and meta["ss_learning_rate"] == "1.5e-06"


def test_write_is_atomic_when_interrupted(tmp_path):
    specs = [TensorSpec(f"t{i}", (4,), torch.float32) for i in range(3)]

    def produce(spec):
        if spec.name == "t2":
            raise RuntimeError("power cut")
        return torch.zeros(4)

    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        write_streaming(target, specs, produce)
    assert list(tmp_path.iterdir()) == []  # no final file, no partial file left behind
    write_streaming(target, specs, lambda s: torch.full((4,), float(s.name[1])), {"a": "b"})
    assert torch.equal(load_file(target)["t2"], torch.full((4,), 2.0))


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (b"{not json", b"", None, "not valid JSON"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None, "do not hold shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, None, "overlap or gap"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unknown dtype"),
        ({}, b"", 10**15, "header length .* is absurd"),
    ],
)
def test_malformed_files_fail_with_one_line(tmp_path, header, data, length, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(TunelabError, match=message) as err:
        inspect_file(path)
    assert "\n" not in str(err.value)
    with pytest.raises(TunelabError):
        load_checkpoint(path)


def test_truncated_real_checkpoint(tmp_path, toy_checkpoint):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(toy_checkpoint.read_bytes()[:-1000])
    with pytest.raises(TunelabError, match="truncated"):
        load_checkpoint(cut)


def test_pickle_refused_unless_allowed(tmp_path, toy_checkpoint):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(toy_checkpoint)}, ckpt)
    with pytest.raises(TunelabError, match="refusing a pickle file"):
        load_checkpoint(ckpt)
    comps = load_checkpoint(ckpt, allow_pickle=True)
    out = save_checkpoint(comps, tmp_path / "from_pickle.safetensors", dtype="fp32")
    _assert_same_file_tensors(toy_checkpoint, out)


def test_diffusers_folder_round_trip(tmp_path, toy_checkpoint, toy_components):
    folder = export_diffusers(load_checkpoint(toy_checkpoint), tmp_path / "diffusers", dtype="fp32")
    assert (folder / "unet" / "config.json").exists() and (folder / "text_encoder_2").is_dir()
    comps = import_diffusers(folder)
    assert comps.arch == "toy"
    out = save_checkpoint(comps, tmp_path / "back.safetensors", dtype="fp32")
    _assert_same_file_tensors(toy_checkpoint, out)
    with pytest.raises(TunelabError, match="missing sub-folders: vae"):
        (folder / "vae" / "config.json").unlink()
        (folder / "vae").rename(tmp_path / "elsewhere")
        import_diffusers(folder)


def test_inspect_file_and_preset(toy_checkpoint):
    report = inspect_file(toy_checkpoint)
    assert report["arch"] == "toy" and report["dtype"] == "fp32"
    assert report["per_component"]["unet"] == sum(p.numel() for p in load_checkpoint(toy_checkpoint).unet.parameters())
    assert list(report["per_unet_block"])[:3] == ["EMB", "IN00", "IN01"]
    assert report["missing_required"] == [] and report["extra_keys"] == []
    sdxl = inspect_preset("sdxl")
    assert sdxl["per_component"]["unet"] == 2_567_463_684
    assert sdxl["tensors"] == len(K.rules_for_arch("sdxl"))
    assert sum(sdxl["per_unet_block"].values()) == 2_567_463_684


def test_new_sdxl_tensor_generator_is_reproducible_and_sane():
    from tunelab.models.checkpoint import _random_tensor

    spec = TensorSpec(K.UNET + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3), torch.float32)
    a, b = _random_tensor(spec, 3), _random_tensor(spec, 3)
    assert torch.equal(a, b) and not torch.equal(a, _random_tensor(spec, 4))
    assert abs(a.std().item() - (1 / (320 * 9)) ** 0.5) < 1e-3
    norm = TensorSpec(K.UNET + "out.0.weight", (320,), torch.float32)
    assert torch.equal(_random_tensor(norm, 0), torch.ones(320))


@pytest.mark.slow
def test_full_size_sdxl_new_and_inspect(tmp_path):
    """Writes a real 6.9 GB fp16 SDXL checkpoint and inspects it (slow: minutes, disk)."""
    path = new_checkpoint("sdxl", tmp_path / "sdxl.safetensors", seed=0, dtype="fp16")
    report = inspect_file(path)
    assert report["arch"] == "sdxl" and report["per_component"]["unet"] == 2_567_463_684
    assert report["missing_required"] == [] and report["extra_keys"] == []


def test_pickle_refusal_names_the_command_that_converts_it(tmp_path):
    """Every command but `model convert` lacks --allow-pickle: the advice is the convert command."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02}q\x00.")  # never unpickled
    fix = f"`tunelab model convert {ckpt} --allow-pickle --out {tmp_path / 'model.safetensors'}`"
    for call in (load_checkpoint, inspect_file):
        with pytest.raises(TunelabError, match="refusing a pickle file") as err:
            call(ckpt)
        assert fix in str(err.value) and "or pass --allow-pickle" not in str(err.value), call.__name__


def test_inspect_reads_the_header_and_builds_no_module(toy_checkpoint, monkeypatch):
    """`model inspect` took 6-10 s on a full SDXL file: not reading it (the header is 0.4 MB), but
    building SDXL's modules on the meta device for the expected key list. It uses the key table
    shipped with the preset now, and reads no tensor."""
    import safetensors

    from tunelab.models import arch, checkpoint

    def forbidden(*args, **kwargs):
        raise AssertionError("inspect built modules or read tensors")

    for where, name in ((arch, "build_components"), (checkpoint, "build_components"), (K, "rules_for_arch"),
                        (safetensors, "safe_open"), (torch, "load")):
        monkeypatch.setattr(where, name, forbidden)
    report = inspect_file(toy_checkpoint)
    assert report["arch"] == "toy" and report["missing_required"] == [] and report["extra_keys"] == []
    assert report["absent_optional"] == [] and report["tensors"] == len(K.sgm_key_shapes("toy"))
    sdxl = inspect_preset("sdxl")
    assert sdxl["per_component"]["unet"] == 2_567_463_684 and sdxl["tensors"] == len(K.sgm_key_shapes("sdxl"))
