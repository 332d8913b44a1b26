"""Fixtures for sampling tests: one toy model (random weights, 64 px) shared by the module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sample_components(toy_checkpoint):
    """Our own loaded copy, so processor/FreeU changes can never leak into other packages' tests."""
    from tunelab.models.checkpoint import load_checkpoint

    return load_checkpoint(toy_checkpoint)


@pytest.fixture(scope="session")
def toy_tokenizers():
    from tunelab.models.text import load_tokenizers

    return load_tokenizers("toy")


@pytest.fixture(scope="session")
def toy_model(sample_components, toy_tokenizers):
    from tunelab.sample.pipeline import build_pipeline

    return build_pipeline(sample_components, toy_tokenizers, name="toy")
