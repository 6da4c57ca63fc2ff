"""One cache root: XDG_CACHE_HOME moves everything loom makes on disk, read at each call."""

from __future__ import annotations

from pathlib import Path

from loom.jobs.service import default_state_dir
from loom.kernels import build
from loom.paths import cache_dir


def test_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir("gguf") == tmp_path / "loom" / "gguf"
    assert build.kernel_dir() == tmp_path / "loom" / "kernels"
    assert default_state_dir("127.0.0.1", 8000) == tmp_path / "loom" / "state" / "127.0.0.1_8000"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir("tiny-llama-tiny") == Path.home() / ".cache" / "loom" / "tiny-llama-tiny"
