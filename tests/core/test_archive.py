"""The archive checks on their own (``core.archive``): escaping paths, links, zip bombs and entry counts are
refused before anything is written, and a lying size is caught while extracting."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from core.archive import ArchiveError, ArchiveLimits, checked_members, extract_archive, extract_members

LIMITS = ArchiveLimits(max_files=10, max_bytes=10_000_000, max_compression_ratio=100)


def zipped(entries: dict[str | zipfile.ZipInfo, bytes], compression: int = zipfile.ZIP_STORED) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def refused(upload: io.BytesIO, target: Path, limits: ArchiveLimits = LIMITS) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        extract_archive(upload, "upload.zip", target, limits)
    assert not target.exists(), "nothing is extracted from a refused archive"
    assert str(caught.value).startswith("upload.zip: ")
    return caught.value


def test_a_sound_archive_is_extracted_without_the_junk_archivers_add(tmp_path):
    upload = zipped({"a.txt": b"one", "sub/b.txt": b"two", "__MACOSX/._a.txt": b"x", ".DS_Store": b"x"})
    extract_archive(upload, "upload.zip", tmp_path / "out", LIMITS)
    found = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert found == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"two"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "C:/x"])
def test_a_path_that_escapes_the_folder_is_refused(tmp_path, name):
    error = refused(zipped({"fine.txt": b"ok", name: b"escape"}), tmp_path / "out")
    assert "escaping the archive" in str(error) and not error.too_large
    assert not (tmp_path / "x").exists()


def test_a_symbolic_link_entry_is_refused(tmp_path):
    link = zipfile.ZipInfo("images/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    error = refused(zipped({"a.txt": b"ok", link: b"/etc/passwd"}), tmp_path / "out")
    assert "symbolic link" in str(error) and not error.too_large


def test_a_zip_bomb_is_refused_by_its_compression_ratio(tmp_path):
    bomb = zipped({"a.txt": b"ok", "zeros.bin": bytes(8 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    assert len(bomb.getvalue()) < 100_000  # 8 MiB in a few kilobytes
    error = refused(bomb, tmp_path / "out")
    assert "zip bomb" in str(error) and error.too_large


def test_small_entries_may_compress_as_well_as_they_like(tmp_path):
    upload = zipped({"zeros.bin": bytes(512 * 1024)}, zipfile.ZIP_DEFLATED)
    extract_archive(upload, "upload.zip", tmp_path / "out", LIMITS)
    assert (tmp_path / "out" / "zeros.bin").stat().st_size == 512 * 1024


def test_an_archive_that_unpacks_past_the_total_size_is_refused(tmp_path):
    limits = ArchiveLimits(max_files=10, max_bytes=2500, max_compression_ratio=100)
    error = refused(zipped({f"{i}.bin": bytes(1000) for i in range(3)}), tmp_path / "out", limits)
    assert "more than 2500 bytes" in str(error) and error.too_large


def test_too_many_entries_are_refused_from_the_central_directory(tmp_path):
    limits = ArchiveLimits(max_files=3, max_bytes=10_000_000, max_compression_ratio=100)
    error = refused(zipped({f"{i}.txt": b"x" for i in range(5)}), tmp_path / "out", limits)
    assert "the limit is 3" in str(error) and error.too_large


def test_too_many_entries_are_refused_by_the_member_check_too():
    limits = ArchiveLimits(max_files=3, max_bytes=10_000_000, max_compression_ratio=100)
    with (
        zipfile.ZipFile(zipped({f"{i}.txt": b"x" for i in range(5)})) as archive,
        pytest.raises(ArchiveError) as caught,
    ):
        checked_members(archive, "upload.zip", limits)
    assert caught.value.too_large


def test_extracting_counts_the_bytes_written_not_what_the_headers_claim(tmp_path):
    with zipfile.ZipFile(zipped({"big.bin": bytes(5000)})) as archive:
        members = checked_members(archive, "upload.zip", LIMITS)
        with pytest.raises(ArchiveError) as caught:
            extract_members(archive, members, tmp_path / "out", "upload.zip", limit=1000)
    assert "more than 1000 bytes" in str(caught.value) and caught.value.too_large


@pytest.mark.parametrize("data", [b"not a zip at all", b"PK\x03\x04" + bytes(100)])
def test_what_is_not_a_zip_is_refused(tmp_path, data):
    error = refused(io.BytesIO(data), tmp_path / "out")
    assert not error.too_large


def test_an_empty_archive_is_refused(tmp_path):
    error = refused(zipped({"__MACOSX/._a": b"x", "folder/": b""}), tmp_path / "out")
    assert "holds no files" in str(error)
