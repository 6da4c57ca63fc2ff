"""Shared fixtures: built-in tiny random-weight models, made once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from loom.models.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns make(arch="llama") -> directory of that arch's tiny model, made on first request."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, size="tiny", seed=0)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    """The tiny llama model directory (tied embeddings)."""
    return tiny_model_dir("llama")
