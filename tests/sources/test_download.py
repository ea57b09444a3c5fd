"""Downloads: locally built archives served through file:// URLs (no internet here), checksums, unpacking, registry."""

from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cytoretrieve.cli.datasets import app
from cytoretrieve.errors import CytoError
from cytoretrieve.sources.cells import SOURCES, download_dataset, open_dataset
from cytoretrieve.sources.cells.herlev import HERLEV_FOLDERS
from cytoretrieve.sources.cells.sipakmed import FOLDER_NAMES


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def herlev_zip(tmp_path: Path) -> Path:
    """A tiny smear2005.zip: smear2005/New database pictures/<class>/<stem>.BMP + masks, and macOS junk."""
    path = tmp_path / "served" / "smear2005.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        for i, folder in enumerate(HERLEV_FOLDERS):
            base = f"smear2005/New database pictures/{folder}/20{i}-001"
            zf.writestr(f"{base}.BMP", b"BM" + bytes(64))
            zf.writestr(f"{base}-d.bmp", b"BM" + bytes(64))
        zf.writestr("smear2005/readme.txt", "Herlev")
        for folder in HERLEV_FOLDERS:
            zf.writestr(f"__MACOSX/smear2005/New database pictures/{folder}/._x.BMP", b"junk")
    return path


def test_download_file_url_with_checksum(herlev_zip: Path, tmp_path: Path) -> None:
    to = tmp_path / "data" / "herlev"
    seen: list[tuple[str, int, int | None]] = []
    root = download_dataset(
        "herlev", to, url=herlev_zip.as_uri(), sha256=sha(herlev_zip).upper(), progress=lambda *a: seen.append(a)
    )
    assert root == to.resolve() / "smear2005" / "New database pictures"
    ds = open_dataset(root)
    assert ds.layout == "herlev" and len(ds.records) == 7 and {r.label for r in ds.records} == set(HERLEV_FOLDERS.values())
    size = herlev_zip.stat().st_size
    assert seen[-1] == ("smear2005.zip", size, size)
    assert sorted(p.name for p in to.iterdir()) == ["smear2005"]  # archive removed, no .part, no __MACOSX


def test_download_is_a_no_op_when_already_unpacked(herlev_zip: Path, tmp_path: Path) -> None:
    to = tmp_path / "h"
    first = download_dataset("herlev", to, url=str(herlev_zip), sha256=sha(herlev_zip))  # a plain path works too
    again = download_dataset("herlev", to, url=(tmp_path / "gone.zip").as_uri())  # would fail if it downloaded
    assert again == first


def test_wrong_checksum_leaves_nothing(herlev_zip: Path, tmp_path: Path) -> None:
    to = tmp_path / "new"
    wrong = "0" * 64
    with pytest.raises(CytoError) as err:
        download_dataset("herlev", to, url=herlev_zip.as_uri(), sha256=wrong)
    msg = str(err.value)
    assert wrong in msg and sha(herlev_zip) in msg and "mismatch" in msg
    assert not to.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(CytoError, match="mismatch"):
        download_dataset("herlev", existing, url=herlev_zip.as_uri(), sha256=wrong)
    assert list(existing.iterdir()) == []


def test_unpinned_download_reports_its_sha256(herlev_zip: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=f"no published checksum.*{sha(herlev_zip)}"):
        root = download_dataset("herlev", tmp_path / "h", url=herlev_zip.as_uri())
    assert root.name == "New database pictures"


def test_stale_partial_file_is_replaced_for_file_urls(herlev_zip: Path, tmp_path: Path) -> None:
    to = tmp_path / "h"
    to.mkdir()
    (to / "smear2005.zip.part").write_bytes(b"garbage from an interrupted run")
    root = download_dataset("herlev", to, url=herlev_zip.as_uri(), sha256=sha(herlev_zip))
    assert len(open_dataset(root).records) == 7


def test_tar_archive_of_doubly_nested_sipakmed(tmp_path: Path) -> None:
    archive = tmp_path / "sipakmed.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in FOLDER_NAMES:
            for member in (f"{name}/{name}/001.bmp", f"{name}/{name}/CROPPED/001_01.bmp", f"{name}/{name}/CROPPED/001_01.dat"):
                info = tarfile.TarInfo(f"SIPaKMeD/{member}")
                info.size = 4
                tf.addfile(info, io.BytesIO(b"BM00"))
    root = download_dataset("sipakmed", tmp_path / "s", url=archive.as_uri(), sha256=sha(archive))
    assert root == (tmp_path / "s" / "SIPaKMeD").resolve()
    ds = open_dataset(root)
    assert ds.layout == "sipakmed" and len(ds.records) == 5 and {r.binary for r in ds.records} == {0, 1, None}


def test_archive_without_the_dataset(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/cat.jpg", b"x")
    with pytest.raises(CytoError, match="found no herlev layout"):
        download_dataset("herlev", tmp_path / "h", url=archive.as_uri(), sha256=sha(archive))


def test_rar_archive_is_refused_clearly(tmp_path: Path) -> None:
    archive = tmp_path / "x.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x00" + bytes(32))
    with pytest.raises(CytoError, match="RAR archive, which cytoretrieve cannot unpack; extract it"):
        download_dataset("herlev", tmp_path / "h", url=archive.as_uri(), sha256=sha(archive))


def test_7z_without_extractor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "im_Parabasal.7z"
    archive.write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(32))
    monkeypatch.setitem(sys.modules, "py7zr", None)  # import py7zr -> ImportError
    monkeypatch.setattr("shutil.which", lambda name: None)
    to = tmp_path / "s"
    with pytest.raises(CytoError, match="7-Zip archive and no 7-Zip extractor was found; install one"):
        download_dataset("sipakmed", to, url=archive.as_uri(), sha256=sha(archive))
    assert (to / "im_Parabasal.7z").is_file()  # kept, so a rerun does not download again


def test_unreachable_url(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="cannot download"):
        download_dataset("herlev", tmp_path / "h", url=(tmp_path / "missing.zip").as_uri())
    assert not (tmp_path / "h").exists()
    with pytest.raises(CytoError, match="neither an http"):
        download_dataset("herlev", tmp_path / "h", url="no/such/file.zip")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sha256": "abc"}, "64 hex digits"),
        ({"url": "file:///x.zip", "sha256": ",".join(["a" * 64] * 2)}, "one `sha256`"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(CytoError, match=match):
        download_dataset("herlev", tmp_path / "h", **kwargs)


def test_multi_archive_source_needs_one_pin_per_archive(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="5 comma-separated `sha256` values in this order: im_Superficial-Intermediate.7z"):
        download_dataset("sipakmed", tmp_path / "s", sha256="a" * 64)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(CytoError, match="unknown dataset 'cric'; choose one of herlev, sipakmed"):
        download_dataset("cric", tmp_path)


def test_registry_holds_official_addresses() -> None:
    herlev, sipakmed = SOURCES["herlev"], SOURCES["sipakmed"]
    assert [f.url for f in herlev.files] == ["http://mde-lab.aegean.gr/images/stories/docs/smear2005.zip"]
    assert [f.url.rsplit("/", 1)[1] for f in sipakmed.files] == [f"{n}.7z" for n in FOLDER_NAMES]
    assert all(f.url.startswith("https://www.cs.uoi.gr/~marina/SIPAKMED/") for f in sipakmed.files)
    for source in (herlev, sipakmed):
        assert source.layout == source.name
        for f in source.files:  # None (nothing published) or a real 64-hex pin, never a placeholder
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)


def test_cli_download(herlev_zip: Path, tmp_path: Path) -> None:
    to = tmp_path / "cli"
    result = CliRunner().invoke(app, ["download", "herlev", "--to", str(to), "--url", herlev_zip.as_uri()])
    assert result.exit_code == 0, result.output
    root = to.resolve() / "smear2005" / "New database pictures"
    assert str(root) in result.output and sha(herlev_zip) in result.output  # the unpinned hash is shown as a note
    bad = CliRunner().invoke(app, ["download", "herlev", "--to", str(tmp_path / "x"), "--url", herlev_zip.as_uri(), "--sha256", "f" * 64])
    assert isinstance(bad.exception, CytoError)
