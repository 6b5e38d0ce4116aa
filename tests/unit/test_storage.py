"""The storage contract, against both backends: LocalStorage (real files under tmp_path) and
S3Storage (a real S3 server over HTTP: moto's server mode, a fresh bucket per test). Tests
of what only the local backend has (file modes, symlinks) use LocalStorage alone."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from core.settings import Settings
from core.storage import (
    InvalidKey,
    LocalStorage,
    ObjectNotFound,
    Storage,
    StorageError,
    TooLarge,
    artifact_storage,
    validate_key,
)
from core.storage.s3 import S3Storage
from tests import s3


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = s3.new_bucket(endpoint)
    st = S3Storage(
        s3.client(endpoint),
        bucket,
        "pre/fix",
        tmp_path / "cache",
        multipart_threshold=5 * 1024**2,
        multipart_chunksize=5 * 1024**2,
    )
    st.check()
    return st


def all_files(root: Path) -> list[str]:
    """Every file under root, hidden ones included (what a leak would leave)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def leftovers(store: Storage) -> list[str]:
    """Everything the store holds, invalid names and temporary files included."""
    if isinstance(store, LocalStorage):
        return all_files(store.root) if store.root.exists() else []
    assert isinstance(store, S3Storage)
    endpoint = str(store.client.meta.endpoint_url)
    spooled = all_files(store.staging_root()) if store.staging_root().exists() else []
    return [o.removeprefix(store.prefix) for o in s3.all_objects(endpoint, store.bucket)] + [
        f"(spool) {f}" for f in spooled
    ]


def test_put_open_list_delete_round_trip(store: Storage) -> None:
    content = os.urandom(6 * (1 << 20) + 17)  # several 1 MiB chunks and a tail (s3: multipart)
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
    assert leftovers(store) == ["u10/x.csv"]
    with pytest.raises(ObjectNotFound):
        store.open("u1/model/model.safetensors")
    with pytest.raises(ObjectNotFound):
        store.size("nothing")


def test_files_are_written_atomically_with_mode_0644(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
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


def test_writes_are_atomic(store: Storage) -> None:
    store.put("a/b.txt", [b"old"])
    with store.writer("a/b.txt") as w:
        w.write(b"new content")
        assert store.read_bytes("a/b.txt") == b"old"  # not yet committed
        assert store.list_keys("a") == ["a/b.txt"]
        obj = w.commit()
    assert obj.size == len(b"new content")
    assert obj.sha256 == hashlib.sha256(b"new content").hexdigest()
    assert store.read_bytes("a/b.txt") == b"new content"
    assert leftovers(store) == ["a/b.txt"]


def test_size_cap_mid_stream_leaves_nothing_behind(store: Storage) -> None:
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
    assert leftovers(store) == []
    # An exact fit is accepted; an earlier object survives a failed overwrite.
    store.put("up/data.csv", [b"y" * 500, b"y" * 500], max_bytes=1000)
    with pytest.raises(TooLarge):
        store.put("up/data.csv", io.BytesIO(b"z" * 1001), max_bytes=1000)
    assert store.read_bytes("up/data.csv") == b"y" * 1000
    assert leftovers(store) == ["up/data.csv"]


def test_an_error_in_the_stream_aborts_the_write(store: Storage) -> None:
    def broken() -> Iterator[bytes]:
        yield b"abc"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put("k/v", broken())
    assert leftovers(store) == []
    w = store.writer("k/v")
    w.abort()
    with pytest.raises(StorageError):
        w.write(b"late")
    assert leftovers(store) == []


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
def test_keys_that_could_escape_or_confuse_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)
    for call in (
        lambda: store.put(key, [b"x"]),
        lambda: store.local_path(key),
        lambda: store.open(key),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert leftovers(store) == []


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


def test_delete_prefix_refuses_the_whole_store(store: Storage) -> None:
    store.put("a/b", [b"1"])
    with pytest.raises(InvalidKey):
        store.delete_prefix("")
    assert store.delete_prefix("missing") == 0
    assert store.list_keys() == ["a/b"]


def test_put_dir_publishes_a_directory_with_readable_modes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
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


def test_put_dir_replaces_keeps_and_local_path_copies(store: Storage, tmp_path: Path) -> None:
    """The contract of put_dir (replace, keep, skip invalid names) and local_path (an object,
    a prefix, refreshed after a change, absent after a delete) on both backends."""
    store.put("job1/stale.txt", [b"from an earlier attempt"])
    store.put("job1/checkpoints/c1/state.bin", [b"kept"])
    staged = store.staging_root() / "job1-1"
    (staged / "sub").mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"w" * 100)
    (staged / "sub" / "x.json").write_bytes(b"{}")
    (staged / ".hidden").write_bytes(b"not a key")
    (staged / "checkpoints").mkdir()
    (staged / "checkpoints" / "dropped").write_bytes(b"the source's own copy is dropped")
    objects = store.put_dir("job1", staged, keep=("checkpoints",))
    assert [(o.key, o.size) for o in objects] == [
        ("job1/model.safetensors", 100),
        ("job1/sub/x.json", 2),
    ]
    assert objects[0].sha256 == hashlib.sha256(b"w" * 100).hexdigest()
    assert not staged.exists()
    assert store.list_keys("job1") == [
        "job1/checkpoints/c1/state.bin",
        "job1/model.safetensors",
        "job1/sub/x.json",
    ]
    folder = store.local_path("job1")
    assert (folder / "model.safetensors").read_bytes() == b"w" * 100
    assert (folder / "checkpoints/c1/state.bin").read_bytes() == b"kept"
    assert store.local_path("job1/sub/x.json").read_bytes() == b"{}"
    # A changed object is seen again; a deleted one is gone from the copy.
    store.put("job1/sub/x.json", [b'{"v": 2}'])
    store.delete("job1/model.safetensors")
    folder = store.local_path("job1")
    assert (folder / "sub/x.json").read_bytes() == b'{"v": 2}'
    assert not (folder / "model.safetensors").exists()
    assert store.delete_prefix("job1") == 2
    assert not store.local_path("job1").exists()
    assert not store.local_path("job1/sub/x.json").exists()
    assert leftovers(store) == []


def test_s3_sha256_is_recorded_in_the_object_metadata(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = s3.new_bucket(s3_endpoint)
    store = S3Storage(s3.client(s3_endpoint), bucket, "", tmp_path / "cache")
    obj = store.put("m/w.bin", io.BytesIO(b"weights"))
    head = s3.client(s3_endpoint).head_object(Bucket=bucket, Key="m/w.bin")
    assert head["Metadata"]["sha256"] == obj.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert store.sha256("m/w.bin") == obj.sha256
    # An object put there by another tool (no sha256 metadata) is hashed on read.
    s3.client(s3_endpoint).put_object(Bucket=bucket, Key="m/other.bin", Body=b"other")
    assert store.sha256("m/other.bin") == hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ObjectNotFound):
        store.sha256("m/none")
    # Objects whose names are not keys are not listed.
    s3.client(s3_endpoint).put_object(Bucket=bucket, Key="m/bad name", Body=b"x")
    assert store.list_keys("m") == ["m/other.bin", "m/w.bin"]


def test_s3_missing_bucket_and_unreachable_endpoint_are_named(
    s3_endpoint: str, tmp_path: Path
) -> None:
    missing = S3Storage(s3.client(s3_endpoint), "no-such-bucket-x", "", tmp_path / "c")
    with pytest.raises(StorageError, match="DISTILLERY_S3_BUCKET") as e:
        missing.check()
    assert "no-such-bucket-x" in str(e.value)
    with pytest.raises(StorageError, match="does not exist"):
        missing.put("a", [b"x"])
    # The settings' factory makes (and checks) an S3 store under <prefix>/artifacts.
    bucket = s3.new_bucket(s3_endpoint)
    env = s3.env(s3_endpoint, bucket, prefix="dist")
    settings = Settings(**{k.removeprefix("DISTILLERY_").lower(): v for k, v in env.items()})
    made = artifact_storage(settings)
    assert isinstance(made, S3Storage) and made.prefix == "dist/artifacts/"
    # Settings: s3 without a bucket is refused at start, naming the variable.
    with pytest.raises(ValueError, match="DISTILLERY_S3_BUCKET is required"):
        Settings(storage_backend="s3")
    with pytest.raises(ValueError, match="go together"):
        Settings(storage_backend="s3", s3_bucket="b", s3_access_key_id="k")
    # An endpoint nothing answers on names the endpoint setting.
    unreachable = boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        region_name=s3.REGION,
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2),
    )
    nowhere = S3Storage(unreachable, bucket, "", tmp_path / "c2")
    with pytest.raises(StorageError, match="DISTILLERY_S3_ENDPOINT_URL"):
        nowhere.check()
