"""Opening a file beneath a sandbox directory so that nothing done to the tree meanwhile leads outside.

Resolving a path and then opening it leaves a window: a symlink swapped in between is followed by the
open. Here the kernel never follows a link: the path is walked one component at a time, each opened
with O_NOFOLLOW relative to the descriptor of the directory before it, and a symlink met on the way is
read and its target walked the same way (`..` never climbs above the sandbox; an absolute target must
lie inside it). On Linux the opened file's real path is checked once more, which also catches a
directory renamed out of the sandbox during the walk. This is what openat2(RESOLVE_BENEATH) does,
written for any POSIX system.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from pathlib import Path, PurePosixPath

from loom.agent.errors import ToolError

MAX_SYMLINKS = 40
"""Links followed in one lookup before giving up (Linux's own limit): a link loop ends here."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not hang the tool; reads of regular files ignore it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _outside(path: str) -> ToolError:
    return ToolError(f"{path!r} is outside the sandbox directory; only files inside it can be read")


def _parts_below(root: Path, path: str, shown: str) -> list[str]:
    """The components of `path` relative to `root` (an absolute path must name something inside it)."""
    p = PurePosixPath(path)
    if p.is_absolute():
        if not p.is_relative_to(root):
            raise _outside(shown)
        p = p.relative_to(root)
    return list(p.parts)


def _link_target(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None  # not a symlink (or gone): the open's own error stands


def open_beneath(root: Path, path: str) -> int:
    """A descriptor open for reading on the regular file `path` names inside `root` (an absolute,
    symlink-free directory); raises ToolError when it is outside, missing or not a regular file."""
    if "\x00" in path:
        raise ToolError("the path contains a NUL character")
    todo = deque(_parts_below(root, path, path))
    stack = [os.open(root, _DIR_FLAGS)]  # descriptors of the directories from root down
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) == 1:
                    raise _outside(path)
                os.close(stack.pop())
                continue
            last = not any(n not in ("", ".") for n in todo)
            try:
                fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=stack[-1])
            except OSError as e:
                target = _link_target(name, stack[-1])
                if target is None:
                    raise _open_error(path, e) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise ToolError(f"{path!r}: too many symbolic links") from None
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extendleft(reversed(_parts_below(root, target, path)))
                continue
            if not last:
                stack.append(fd)
                continue
            try:
                _check_file(fd, root, path)
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise ToolError(f"{path!r} is not a file in the sandbox")
    finally:
        for fd in stack:
            os.close(fd)


def _open_error(path: str, e: OSError) -> ToolError:
    if e.errno == errno.ENOENT:
        return ToolError(f"{path!r} is not a file in the sandbox (it does not exist)")
    if e.errno == errno.ENOTDIR:
        return ToolError(f"{path!r} is not a file in the sandbox (a part of it is not a directory)")
    return ToolError(f"{path!r} cannot be opened: {e.strerror}")


def _check_file(fd: int, root: Path, path: str) -> None:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise ToolError(f"{path!r} is not a file in the sandbox")
    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc) and not PurePosixPath(os.readlink(proc)).is_relative_to(root):
        raise _outside(path)
