"""Fixtures of the structured-output tests: the tiny tokenizer and one compiler for the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from grammar_walk import closing_tokens

from loom.engine.structured import GrammarCompiler
from loom.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_llama_dir)


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> Iterator[GrammarCompiler]:
    compiler = GrammarCompiler(tokenizer)
    yield compiler
    compiler.close()


@pytest.fixture(scope="session")
def closers(tokenizer: Tokenizer, compiler: GrammarCompiler) -> torch.Tensor:
    return closing_tokens(tokenizer, compiler.vocab_size)
