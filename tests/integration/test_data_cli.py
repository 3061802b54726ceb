"""anomaly-bench-data: a dataset folder checked against its published layout and counts,
and downloads from a loopback HTTP server serving fake files (a download cut short and
resumed, a file with the wrong digest)."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

from anomaly_bench.data.catalog import MVTEC
from anomaly_bench.data_cli import main
from anomaly_bench.download import Remote, fetch
from anomaly_bench.errors import DataError

from cli_helpers import make_mvtec, write_png
from http_helpers import serve


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_resumes_a_cut_download_with_a_range_request(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    with serve({"/a.tar": data}, cut={"/a.tar": 1_200_000}) as server:
        remote = Remote(server.url + "/a.tar", _sha(data), "a.tar")
        with pytest.raises(DataError, match=r"stopped after 1200000 .*Run again to resume"):
            fetch(remote, tmp_path, progress=False)
        assert (tmp_path / "a.tar.part").stat().st_size == 1_200_000
        path = fetch(remote, tmp_path, progress=False)
        assert path.read_bytes() == data and not (tmp_path / "a.tar.part").exists()
        assert server.requests[-1] == ("GET", "/a.tar", "bytes=1200000-")
        n = len(server.requests)
        assert fetch(remote, tmp_path, progress=False) == path  # verified, not fetched again
        assert len(server.requests) == n


def test_fetch_refuses_a_file_with_another_digest(tmp_path):
    data = b"not the published archive" * 1000
    wanted = _sha(b"the published archive")
    with serve({"/a.zip": data}) as server, \
            pytest.raises(DataError, match=f"SHA-256 is {_sha(data)}, but the published one "
                                           f"is {wanted}: the file was removed"):
        fetch(Remote(server.url + "/a.zip", wanted, "a.zip"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def _btad_zip() -> bytes:
    """BTAD as its archive unpacks: BTech_Dataset_transformed/<01|02|03>/..."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cat in ("01", "02", "03"):
            for rel in ("train/ok/000.bmp", "train/ok/001.bmp", "test/ok/000.bmp",
                        "test/ko/000.bmp", "ground_truth/ko/000.png"):
                img = io.BytesIO()
                from PIL import Image

                fmt = "PNG" if rel.endswith(".png") else "BMP"
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(img, fmt)
                zf.writestr(f"BTech_Dataset_transformed/{cat}/{rel}", img.getvalue())
    return buf.getvalue()


def test_download_resumes_then_unpacks_and_checks(tmp_path, capsys):
    archive = _btad_zip()
    with serve({"/btad.zip": archive}, cut={"/btad.zip": len(archive) // 2}) as server:
        args = ["download", "btad", "--data-root", str(tmp_path), "--no-progress",
                "--url", server.url + "/btad.zip", "--sha256", _sha(archive)]
        assert main(args) == 2
        assert "Run again to resume" in capsys.readouterr().err
        assert main(args) == 0
        assert server.requests[-1][2] == f"bytes={len(archive) // 2}-"
    out = capsys.readouterr().out
    root = tmp_path / "btad" / "BTech_Dataset_transformed"
    assert f"btad at {root}:" in out
    assert "01: 2 training, 1 normal and 1 anomalous test images" in out
    assert "no published per-category counts for BTAD" in out
    # a second download reuses the verified archive and the unpacked folder
    assert main([*args[:4], "--url", "http://127.0.0.1:9/none", "--sha256", _sha(archive)]) == 0


def test_download_of_a_mirror_with_another_digest_is_refused(tmp_path, capsys):
    archive = _btad_zip()
    with serve({"/btad.zip": archive}) as server:
        code = main(["download", "btad", "--data-root", str(tmp_path), "--no-progress",
                     "--url", server.url + "/btad.zip", "--sha256", "0" * 64])
    assert code == 2
    err = capsys.readouterr().err
    assert f"SHA-256 is {_sha(archive)}, but the published one is {'0' * 64}" in err
    assert not (tmp_path / "btad").exists()


def test_datasets_without_a_permitted_download_say_why(tmp_path, capsys):
    assert main(["download", "mvtec", "--data-root", str(tmp_path)]) == 2
    assert "download form on mvtec.com" in capsys.readouterr().err


def test_check_names_missing_categories_and_counts(tmp_path, capsys):
    root = make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))
    (root / "screw" / "train" / "good" / "000.png").unlink()  # one file lost
    assert main(["check", "mvtec", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    b = MVTEC["bottle"]
    assert (f"bottle has 6/3/3 training/normal test/anomalous test images where "
            f"Bergmann et al., IJCV 2021, Table 1 has {b.train}/{b.test_normal}/"
            f"{b.test_anomalous}") in err
    assert "screw has 5/3/3" in err
    assert "13 of its 15 categories are missing (cable, capsule, carpet, grid, hazelnut, " \
           "leather, metal_nut, pill, tile, toothbrush, transistor, wood, zipper)" in err


def test_check_of_a_complete_folder_and_an_unreadable_category(tmp_path, capsys, monkeypatch):
    import anomaly_bench.data.catalog as catalog

    root = make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))
    monkeypatch.setitem(catalog.PUBLISHED, "mvtec", {c: catalog.Counts(6, 3, 3)
                                                     for c in ("bottle", "screw")})
    assert main(["check", "mvtec", "--data-root", str(tmp_path)]) == 0
    assert "bottle: 6 training, 3 normal and 3 anomalous test images (as published)" in \
        capsys.readouterr().out
    (root / "screw" / "ground_truth" / "crack" / "001_mask.png").unlink()
    assert main(["check", "mvtec", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "screw cannot be read:" in err and "001" in err


def test_check_visa_by_its_split_file(tmp_path, capsys):
    root = tmp_path / "visa"
    rng = np.random.default_rng(0)
    lines = ["object,split,label,image,mask"]
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        write_png(root / rel, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        lines.append(f"candle,{'train' if i < 2 else 'test'},normal,{rel},")
    rel, mask = "candle/Data/Images/Anomaly/0000.JPG", "candle/Data/Masks/Anomaly/0000.png"
    write_png(root / rel, rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_png(root / mask, np.full((8, 8), 255, np.uint8))
    lines.append(f"candle,test,anomaly,{rel},{mask}")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    assert main(["check", "visa", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "candle has 2/1/1 training/normal test/anomalous test images where split_csv/1cls" \
           ".csv of amazon-science/spot-diff has 900/100/100" in err
    assert "11 of its 12 categories are missing (capsules, cashew," in err


def test_unknown_dataset_lists_the_known_ones(capsys):
    assert main(["check", "nosuch"]) == 2
    assert "Known layouts:" in capsys.readouterr().err


def test_an_archive_member_outside_the_folder_is_refused(tmp_path):
    from anomaly_bench.data_cli import _unpack

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.txt", "x")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"would unpack outside"):
        _unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def test_list_says_which_datasets_download(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "visa: counts: split_csv/1cls.csv" in out and "downloads (CC BY 4.0" in out
    assert "mvtec: counts: Bergmann et al." in out and "not downloaded" in out
