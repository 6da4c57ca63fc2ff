"""Where loom keeps what it makes on disk: one cache root for tiny models, built kernels, server state,
llama.cpp builds and GGUFs, so that XDG_CACHE_HOME moves all of it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$XDG_CACHE_HOME/loom/<parts>, else ~/.cache/loom/<parts> (read at each call, not at import)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root, "loom", *parts)
