"""The `read_file` built-in: reads text under its root, refuses every way out of it."""

import os
from pathlib import Path

import pytest

from treadle.tools import BUILTINS, FileContent, ToolError, make_read_file, read_file
from treadle.tools.files import ROOT_ENV


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "docs" / "deep").mkdir(parents=True)
    (base / "hello.txt").write_text("héllo wörld\n", encoding="utf-8")
    (base / "docs" / "notes.md").write_text("# notes\n", encoding="utf-8")
    (base / "docs" / "deep" / "x.txt").write_text("deep", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("top secret", encoding="utf-8")
    return base


async def read(root: Path, path: str, max_bytes: int = 1000) -> FileContent:
    result = await make_read_file(root, max_bytes=max_bytes).invoke({"path": path})
    assert isinstance(result, FileContent)
    return result


@pytest.mark.anyio
async def test_reads_files_under_the_root(root: Path) -> None:
    got = await read(root, "hello.txt")
    assert got == FileContent(
        path="hello.txt",
        size_bytes=len("héllo wörld\n".encode()),
        text="héllo wörld\n",
        truncated=False,
    )
    assert (await read(root, "docs/deep/x.txt")).text == "deep"
    assert (await read(root, "./docs/../docs/notes.md")).path == "docs/notes.md"
    # an absolute path is fine as long as it lies under the root
    assert (await read(root, str(root / "docs" / "notes.md"))).text == "# notes\n"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "../secret.txt",
        "docs/../../secret.txt",
        "docs/deep/../../../secret.txt",
        "..",
        "/etc/passwd",
    ],
)
async def test_refuses_paths_outside_the_root(root: Path, path: str) -> None:
    with pytest.raises(ToolError, match="outside the allowed root") as info:
        await read(root, path)
    assert info.value.tool == "read_file"
    assert "top secret" not in str(info.value)


@pytest.mark.anyio
async def test_refuses_an_absolute_path_to_a_sibling_of_the_root(root: Path) -> None:
    with pytest.raises(ToolError, match="outside the allowed root"):
        await read(root, str(root.parent / "secret.txt"))
    # a sibling whose name merely starts with the root's name is outside, too
    (root.parent / "root2").mkdir()
    (root.parent / "root2" / "f.txt").write_text("no")
    with pytest.raises(ToolError, match="outside the allowed root"):
        await read(root, str(root.parent / "root2" / "f.txt"))


@pytest.mark.anyio
async def test_refuses_symlinks_that_escape_the_root(root: Path) -> None:
    (root / "link.txt").symlink_to(root.parent / "secret.txt")
    (root / "linkdir").symlink_to(root.parent, target_is_directory=True)
    (root / "docs" / "up").symlink_to("../..")  # relative link climbing out
    for path in ["link.txt", "linkdir/secret.txt", "docs/up/secret.txt"]:
        with pytest.raises(ToolError, match="outside the allowed root"):
            await read(root, path)


@pytest.mark.anyio
async def test_follows_symlinks_that_stay_inside(root: Path) -> None:
    (root / "alias.md").symlink_to(root / "docs" / "notes.md")
    got = await read(root, "alias.md")
    assert got.text == "# notes\n"
    assert got.path == "docs/notes.md"  # reported where it really is


@pytest.mark.anyio
async def test_a_root_reached_through_a_symlink_works(root: Path, tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    assert (await read(tmp_path / "root-link", "hello.txt")).path == "hello.txt"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.txt", "no such file: 'missing.txt'"),
        ("docs", "'docs' is a directory"),
        ("", "path is empty"),
        ("a\x00b", "NUL"),
    ],
)
async def test_clear_errors(root: Path, path: str, message: str) -> None:
    with pytest.raises(ToolError) as info:
        await read(root, path)
    assert message in info.value.reason


@pytest.mark.anyio
async def test_refuses_a_fifo_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(ToolError, match="not a regular file"):
        await read(root, "pipe")


@pytest.mark.anyio
async def test_refuses_binary_and_non_utf8_files(root: Path) -> None:
    (root / "img.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ToolError, match="looks binary"):
        await read(root, "img.bin")
    with pytest.raises(ToolError, match="not UTF-8 text"):
        await read(root, "latin1.txt")


@pytest.mark.anyio
async def test_truncates_at_max_bytes_without_splitting_a_character(root: Path) -> None:
    (root / "long.txt").write_text("ab" + "é" * 10, encoding="utf-8")  # 22 bytes
    got = await read(root, "long.txt", max_bytes=5)  # cut inside the 2nd "é"
    assert got.truncated is True
    assert got.text == "abé"
    assert got.size_bytes == 22
    exact = await read(root, "long.txt", max_bytes=22)
    assert exact.truncated is False and exact.text == "ab" + "é" * 10


@pytest.mark.anyio
async def test_an_unusable_root_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"allowed root .* is not usable"):
        await read(tmp_path / "nope", "x.txt")
    (tmp_path / "file-root").write_text("x")
    with pytest.raises(ToolError, match="is not a directory"):
        await read(tmp_path / "file-root", "x.txt")


@pytest.mark.anyio
async def test_default_instance_uses_env_root_else_cwd(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert BUILTINS["read_file"] is read_file
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(root / "docs")
    assert (await read_file.invoke({"path": "notes.md"})).text == "# notes\n"
    with pytest.raises(ToolError, match="outside the allowed root"):
        await read_file.invoke({"path": "../hello.txt"})
    # the environment variable wins, and is read at call time
    monkeypatch.setenv(ROOT_ENV, str(root))
    assert (await read_file.invoke({"path": "hello.txt"})).path == "hello.txt"
    assert (await read_file.invoke({"path": "docs/notes.md"})).path == "docs/notes.md"


def test_declaration() -> None:
    tool = make_read_file(Path("."), max_bytes=123, name="read_docs")
    assert tool.name == "read_docs"
    assert "123 bytes" in tool.description
    assert tool.idempotent is True
    assert tool.timeout_s is not None and tool.expected_duration_s is not None
    assert tool.parameters_schema["required"] == ["path"]
    with pytest.raises(ValueError):
        make_read_file(Path("."), max_bytes=0)
