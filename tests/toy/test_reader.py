"""The toy world's concept reader: reads world images back to their `Look`, clean and degraded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tunelab.toy.reader import ATTRIBUTES, Reading, Scores, concept_rate, read, score, score_folder
from tunelab.toy.world import Look, make_world, read_looks

SPLITS = {"base": 120, "concept": 100, "style": 100, "preserve": 100}  # 420 images
SEEDS = {"base": 7101, "concept": 7202, "style": 7303, "preserve": 7404}  # not the seeds it was tuned on


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, tuple[Path, list[Image.Image], list[Look]]]:
    """Each split: its folder, its images (in memory) and their looks."""
    root = tmp_path_factory.mktemp("toy_reader")
    out = {}
    for split, n in SPLITS.items():
        folder = root / split
        make_world(folder, n=n, seed=SEEDS[split], split=split)
        looks = read_looks(folder)
        names = sorted(looks)
        images = [Image.open(folder / f"{name}.png").convert("RGB") for name in names]
        out[split] = (folder, images, [looks[name] for name in names])
    return out


def _all(world) -> tuple[list[Image.Image], list[Look]]:
    images = [im for _, ims, _ in world.values() for im in ims]
    looks = [look for _, _, ls in world.values() for look in ls]
    return images, looks


def _blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(1.0))


def _down_up(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    small = im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR)
    return small.resize(im.size, Image.Resampling.BILINEAR)


def _noise(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    noisy = np.asarray(im, float) + rng.normal(0.0, 8.0, (im.height, im.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def _check(scores: Scores, each: float, every: float | None = None) -> None:
    low = {a: getattr(scores, a) for a in ATTRIBUTES if getattr(scores, a) < each}
    assert not low, scores.text()
    if every is not None:
        assert scores.all >= every, scores.text()


def test_clean_world_reads_back(world):
    images, looks = _all(world)
    scores = score(images, looks)
    assert scores.n == sum(SPLITS.values()) >= 400
    _check(scores, 0.98, 0.97)


@pytest.mark.parametrize("degrade", [_blur, _down_up, _noise], ids=["blur1", "down_up", "noise8"])
def test_degraded_world_reads_back(world, degrade):
    images, looks = _all(world)
    rng = np.random.default_rng(3)
    images, looks = images[::2], looks[::2]  # every other image of every split: keeps the test short
    scores = score((degrade(im, rng) for im in images), looks)
    assert scores.n >= 200
    _check(scores, 0.95)


def test_concept_rate(world):
    assert concept_rate(world["concept"][1]) >= 0.97
    assert concept_rate(world["base"][1]) <= 0.03


def test_score_folder_matches_score(world):
    folder, images, looks = world["style"]
    assert score_folder(folder) == score(images, looks)


def test_inputs_arrays_and_larger_images(world):
    _, images, looks = world["concept"]
    for im in images[:4]:
        want = read(im).look()
        assert read(np.asarray(im)).look() == want
        assert read(im.resize((im.width * 2, im.height * 2), Image.Resampling.BILINEAR)).look() == want


@pytest.mark.parametrize("kind", ["uniform", "noise", "tiny"])
def test_odd_images_do_not_raise(kind):
    rng = np.random.default_rng(0)
    image = {"uniform": np.full((64, 64, 3), 245, np.uint8),
             "noise": rng.integers(0, 256, (64, 96, 3)).astype(np.uint8),
             "tiny": rng.integers(0, 256, (3, 5, 3)).astype(np.uint8)}[kind]
    reading = read(image)
    assert isinstance(reading, Reading)
    assert isinstance(reading.look(), Look)
    assert set(reading.margins) == set(ATTRIBUTES)


def test_scores_text():
    scores = Scores(shape=0.992, color=1.0, background=1.0, stripes=1.0, style=0.9958, all=0.9875, n=480)
    assert scores.text() == ("shape 99.2 %, colour 100 %, background 100 %, stripes 100 %, "
                             "style 99.6 %, all 98.8 % (n = 480)")
    assert scores.attributes() == {"shape": 0.992, "color": 1.0, "background": 1.0, "stripes": 1.0, "style": 0.9958}


def test_score_needs_matching_lengths():
    with pytest.raises(ValueError):
        score([np.zeros((64, 64, 3), np.uint8)], [])
