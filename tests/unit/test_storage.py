"""LocalStorage: real files under tmp_path."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    StorageError,
    TooLarge,
    validate_key,
)


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def all_files(root: Path) -> list[str]:
    """Every file under root, hidden ones included (what a leak would leave)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_put_open_list_delete_round_trip(store: LocalStorage) -> None:
    content = os.urandom(3 * (1 << 20) + 17)  # several 1 MiB chunks and a tail
    obj = store.put("u1/model/model.safetensors", io.BytesIO(content))
    assert obj.key == "u1/model/model.safetensors"
    assert obj.size == len(content)
    assert obj.sha256 == hashlib.sha256(content).hexdigest()
    with store.open(obj.key) as f:
        assert f.read() == content
    assert store.size(obj.key) == len(content)
    assert store.exists(obj.key)
    assert not store.exists("u1/model")  # a prefix is not an object
    store.put("u1/model/config.json", [b'{"a":', b" 1}"])
    store.put("u10/x.csv", [b"text,label\n"])  # shares the characters "u1", not the prefix
    assert store.read_bytes("u1/model/config.json") == b'{"a": 1}'
    assert store.list_keys("u1") == ["u1/model/config.json", "u1/model/model.safetensors"]
    assert store.list_keys() == [*store.list_keys("u1"), "u10/x.csv"]
    assert store.delete("u1/model/config.json") is True
    assert store.delete("u1/model/config.json") is False
    assert store.delete_prefix("u1") == 1
    assert store.list_keys() == ["u10/x.csv"]
    assert not (store.root / "u1").exists()
    with pytest.raises(ObjectNotFound):
        store.open("u1/model/model.safetensors")
    with pytest.raises(ObjectNotFound):
        store.size("nothing")


def test_files_are_written_atomically_with_mode_0644(store: LocalStorage) -> None:
    store.put("a/b.txt", [b"old"])
    with store.writer("a/b.txt") as w:
        w.write(b"new content")
        # Not yet committed: readers still see the old object, and the temporary file is
        # not a key.
        assert store.read_bytes("a/b.txt") == b"old"
        assert store.list_keys("a") == ["a/b.txt"]
        obj = w.commit()
    assert obj.size == len(b"new content")
    assert store.read_bytes("a/b.txt") == b"new content"
    assert stat.S_IMODE((store.root / "a/b.txt").stat().st_mode) == 0o644
    assert all_files(store.root) == ["a/b.txt"]


def test_size_cap_mid_stream_leaves_nothing_behind(store: LocalStorage) -> None:
    sent: list[int] = []

    def stream() -> Iterator[bytes]:
        for i in range(100):
            sent.append(i)
            yield b"x" * 1000

    with pytest.raises(TooLarge) as e:
        store.put("up/data.csv", stream(), max_bytes=10_500)
    assert e.value.limit == 10_500
    assert e.value.key == "up/data.csv"
    assert len(sent) == 11  # the stream was not read further than the chunk that overflowed
    assert all_files(store.root) == []
    # An exact fit is accepted; an earlier object survives a failed overwrite.
    store.put("up/data.csv", [b"y" * 500, b"y" * 500], max_bytes=1000)
    with pytest.raises(TooLarge):
        store.put("up/data.csv", io.BytesIO(b"z" * 1001), max_bytes=1000)
    assert store.read_bytes("up/data.csv") == b"y" * 1000
    assert all_files(store.root) == ["up/data.csv"]


def test_an_error_in_the_stream_aborts_the_write(store: LocalStorage) -> None:
    def broken() -> Iterator[bytes]:
        yield b"abc"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put("k/v", broken())
    assert all_files(store.root) == []
    w = store.writer("k/v")
    w.abort()
    with pytest.raises(StorageError):
        w.write(b"late")
    assert all_files(store.root) == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside",
        "a/../../outside",
        "a/./b",
        "a//b",
        "a/",
        "a\x00b",
        "a\\b",
        "C:/windows",
        ".hidden",
        "a/.tmp-123",
        "-rf",
        "a b",
        "ü",
        "x" * 256,
        "a/" * 600,
    ],
)
def test_keys_that_could_escape_or_confuse_are_refused(store: LocalStorage, key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)
    with pytest.raises(InvalidKey):
        store.put(key, [b"x"])
    with pytest.raises(InvalidKey):
        store.local_path(key)
    assert not store.root.exists() or all_files(store.root) == []


def test_a_symlink_planted_in_the_store_cannot_lead_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    store = LocalStorage(tmp_path / "store")
    store.put("ok/file", [b"1"])
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    (store.root / "ok" / "secret-link").symlink_to(outside / "secret")
    for key in ("link/secret", "ok/secret-link", "link/new"):
        with pytest.raises(InvalidKey, match="outside the store"):
            store.open(key)
    with pytest.raises(InvalidKey):
        store.put("link/new", [b"x"])
    assert store.list_keys() == ["ok/file"]
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_delete_prefix_refuses_the_whole_store(store: LocalStorage) -> None:
    store.put("a/b", [b"1"])
    with pytest.raises(InvalidKey):
        store.delete_prefix("")
    assert store.delete_prefix("missing") == 0
    assert store.list_keys() == ["a/b"]


def test_put_dir_publishes_a_directory_with_readable_modes(
    store: LocalStorage, tmp_path: Path
) -> None:
    store.put("job1/stale.txt", [b"from an earlier attempt"])
    staged = store.root / ".partial" / "job1-1"
    (staged / "sub").mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"w" * 100)
    (staged / "sub" / "x.json").write_bytes(b"{}")
    os.chmod(staged / "model.safetensors", 0o600)
    objects = store.put_dir("job1", staged)
    assert [(o.key, o.size) for o in objects] == [
        ("job1/model.safetensors", 100),
        ("job1/sub/x.json", 2),
    ]
    assert objects[0].sha256 == hashlib.sha256(b"w" * 100).hexdigest()
    assert not staged.exists()
    assert store.list_keys() == ["job1/model.safetensors", "job1/sub/x.json"]  # stale one replaced
    assert stat.S_IMODE((store.root / "job1/model.safetensors").stat().st_mode) == 0o644
    # From a folder outside the store.
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "a.txt").write_bytes(b"a")
    assert [o.key for o in store.put_dir("job2", other)] == ["job2/a.txt"]
    assert store.local_path("job2") == store.root / "job2"
    assert (store.local_path("job2") / "a.txt").read_bytes() == b"a"
