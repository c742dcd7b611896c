"""The `read_file` built-in: read a UTF-8 text file that lies under an allowed root directory.

`make_read_file(root)` builds a tool confined to `root`; the default `read_file` tool is
confined to the root of its context (`files_root(path)`: a daemon's worker gives each run
its tenant's own directory, or none at all), else to `$TREADLE_FILES_ROOT` if set, else to
the process's working directory, all looked up at call time. A path is resolved (symlinks
included) before anything is opened, and refused unless the result is inside the root:
absolute paths elsewhere, `..` escapes and symlinks that point out of the root all get a
clear `ToolError`. The file is then opened without following a final symlink and must be a
regular file, so a FIFO or device under the root cannot block the call. Files larger than
`max_bytes` are cut, with `truncated` set.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from pydantic import BaseModel

from treadle.tools.base import Tool, ToolError

#: environment variable naming the default `read_file` root
ROOT_ENV = "TREADLE_FILES_ROOT"
#: default cap on the bytes returned by one read
DEFAULT_MAX_BYTES = 256 * 1024


class FileContent(BaseModel):
    """What `read_file` returns."""

    path: str
    """the file's path relative to the root, with `/` separators"""
    size_bytes: int
    """the file's full size on disk"""
    text: str
    """the file's text (its first `max_bytes` bytes when `truncated`)"""
    truncated: bool


#: the root set by `files_root` for the calls in its context (None: no root at all)
_SCOPED_ROOT: ContextVar[Path | None] = ContextVar("treadle_files_root")
_UNSET = object()


@contextmanager
def files_root(root: Path | None) -> Iterator[None]:
    """Within the block (and the tasks and threads started in it), the default `read_file`
    reads under `root`; with None it reads nothing, whatever the environment says."""
    token = _SCOPED_ROOT.set(root)
    try:
        yield
    finally:
        _SCOPED_ROOT.reset(token)


def default_root() -> Path:
    """The default tool's root: the one `files_root` set for this context, else
    `$TREADLE_FILES_ROOT`, else the current working directory."""
    scoped = _SCOPED_ROOT.get(_UNSET)
    if scoped is None:
        raise ToolError(
            "read_file",
            "no files are readable here: the daemon gives each tenant a directory of its own "
            "only when the operator starts it with --files-root",
        )
    if isinstance(scoped, Path):
        return scoped
    return Path(os.environ.get(ROOT_ENV) or os.getcwd())


def make_read_file(
    root: Path | str | Callable[[], Path],
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    name: str = "read_file",
) -> Tool:
    """A `read_file` tool confined to `root` (a path, or a callable giving it per call)."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    root_of: Callable[[], Path] = root if callable(root) else (lambda: Path(root))

    def read_file(path: str) -> FileContent:
        """Read a UTF-8 text file under the allowed root directory.

        Args:
            path: The file's path, relative to the allowed root (e.g. "docs/notes.md").
        """
        return _read(name, root_of(), path, max_bytes)

    return Tool(
        read_file,
        name=name,
        description=(
            "Read a UTF-8 text file under the allowed root directory. At most "
            f"{max_bytes} bytes are returned; `truncated` says when the file was cut."
        ),
        timeout_s=10.0,
        expected_duration_s=0.005,
        idempotent=True,
        max_concurrency=16,
    )


def resolve_under(tool_name: str, root: Path, path: str) -> tuple[Path, Path]:
    """(resolved root, resolved path) or a ToolError if `path` leaves `root`."""
    try:
        base = root.resolve(strict=True)
    except OSError as exc:
        raise ToolError(tool_name, f"the allowed root {str(root)!r} is not usable: {exc}") from None
    if not base.is_dir():
        raise ToolError(tool_name, f"the allowed root {str(root)!r} is not a directory")
    if not path or not path.strip():
        raise ToolError(tool_name, "path is empty")
    if "\x00" in path:
        raise ToolError(tool_name, "path contains a NUL character")
    # `base / path` keeps an absolute `path` as is; resolving follows every symlink and
    # `..`, so the containment test below sees where the path really leads.
    try:
        target = (base / path).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        raise ToolError(tool_name, f"cannot resolve {path!r}: {exc}") from None
    if not target.is_relative_to(base):
        raise ToolError(
            tool_name,
            f"{path!r} is outside the allowed root (only files under the root may be read; "
            "use a path relative to it, without '..' escapes or symlinks out of it)",
        )
    return base, target


def _read(tool_name: str, root: Path, path: str, max_bytes: int) -> FileContent:
    base, target = resolve_under(tool_name, root, path)
    shown = target.relative_to(base).as_posix() or "."
    try:
        # O_NOFOLLOW: the final component must not have become a symlink since resolve();
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ToolError(tool_name, f"no such file: {shown!r}") from None
    except IsADirectoryError:
        raise ToolError(tool_name, f"{shown!r} is a directory, not a file") from None
    except PermissionError:
        raise ToolError(tool_name, f"permission denied: {shown!r}") from None
    except OSError as exc:
        raise ToolError(tool_name, f"cannot open {shown!r}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ToolError(tool_name, f"{shown!r} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(tool_name, f"{shown!r} is not a regular file")
        data = _read_at_most(fd, max_bytes + 1)
    finally:
        os.close(fd)
    truncated = len(data) > max_bytes
    data = data[:max_bytes]
    if b"\x00" in data:
        raise ToolError(tool_name, f"{shown!r} looks binary (contains NUL bytes); not text")
    # An incremental decoder lets a cut fall inside a multi-byte character without error:
    # the incomplete tail is simply dropped (final=False), while real garbage still fails.
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    try:
        text = decoder.decode(data, final=not truncated)
    except UnicodeDecodeError as exc:
        raise ToolError(
            tool_name, f"{shown!r} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return FileContent(path=shown, size_bytes=info.st_size, text=text, truncated=truncated)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


#: the default tool: confined to $TREADLE_FILES_ROOT or the working directory, per call
read_file = make_read_file(default_root)

__all__ = [
    "ROOT_ENV",
    "FileContent",
    "default_root",
    "files_root",
    "make_read_file",
    "read_file",
    "resolve_under",
]
