"""read_file's sandbox: paths are walked one component at a time with O_NOFOLLOW, so no symlink,
swapped in at any moment, leads outside the sandbox directory."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from loom.agent.builtin_tools import make_read_file
from loom.agent.errors import ToolError


def _read(tool, path: str) -> str:
    return asyncio.run(tool.call({"path": path}))


@pytest.fixture
def tree(tmp_path):
    """sandbox/{real/f.txt, sub/a.txt} inside, outside/f.txt (the secret) beside it."""
    sandbox = tmp_path / "sandbox"
    (sandbox / "real").mkdir(parents=True)
    (sandbox / "sub").mkdir()
    (sandbox / "real" / "f.txt").write_text("inside")
    (sandbox / "sub" / "a.txt").write_text("a")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f.txt").write_text("SECRET")
    return sandbox


def test_links_that_stay_inside_are_followed(tree):
    os.symlink("real", tree / "rel")  # relative, to a directory
    os.symlink(tree / "real" / "f.txt", tree / "abs.txt")  # absolute, inside
    os.symlink("../real/f.txt", tree / "sub" / "up.txt")  # climbs, but not above the sandbox
    os.symlink("rel", tree / "chain")  # a link to a link
    read = make_read_file(tree)
    for path in (
        "rel/f.txt",
        "abs.txt",
        "sub/up.txt",
        "chain/f.txt",
        "sub/../real/./f.txt",
        str(tree / "abs.txt"),
    ):
        assert _read(read, path) == "inside", path


def test_links_and_paths_that_leave_are_refused(tree):
    outside = tree.parent / "outside"
    os.symlink(outside, tree / "out")
    os.symlink("../outside/f.txt", tree / "up.txt")
    os.symlink("../../outside", tree / "sub" / "deep")
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    read = make_read_file(tree)
    for path in ("out/f.txt", "up.txt", "sub/deep/f.txt", "../outside/f.txt", str(outside / "f.txt")):
        with pytest.raises(ToolError, match="outside the sandbox"):
            _read(read, path)
    with pytest.raises(ToolError, match="symbolic links"):
        _read(read, "loop1")
    for path in ("missing.txt", "sub/a.txt/x", "real", ".", ""):
        with pytest.raises(ToolError, match="not a file"):
            _read(read, path)


def test_a_fifo_is_refused_without_blocking(tree):
    os.mkfifo(tree / "pipe")  # opening a FIFO for reading would wait for a writer forever
    with pytest.raises(ToolError, match="not a file"):
        _read(make_read_file(tree), "pipe")


def test_a_directory_swapped_for_a_link_during_reads_never_leads_outside(tree):
    """A thread keeps replacing the directory `real` by a symlink to the outside one and back while
    read_file reads real/f.txt. Resolving the path first and opening it after (the old way) opened the
    secret whenever the swap fell between the two. Each read must give the inside file or refuse."""
    outside = tree.parent / "outside"
    read = make_read_file(tree)
    real, parked = tree / "real", tree / "parked"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(real, parked)
            os.symlink(outside, real)
            os.unlink(real)
            os.rename(parked, real)

    swapper = threading.Thread(target=swap)
    swapper.start()
    seen: dict[str, int] = {}

    async def reads() -> None:
        for _ in range(3000):
            try:
                text = await read.call({"path": "real/f.txt"})
            except ToolError:
                text = "refused"
            seen[text] = seen.get(text, 0) + 1

    try:
        asyncio.run(reads())
    finally:
        stop.set()
        swapper.join()
    assert "SECRET" not in seen, seen
    assert set(seen) == {"inside", "refused"}
