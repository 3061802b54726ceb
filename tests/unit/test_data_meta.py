"""meta.json, the index the APRIL-GAN and WinCLIP repositories read for MVTec AD and VisA:
written from the folders in the official form, honoured when present, every entry checked."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures import write_btad, write_mvtec, write_visa

from anomaly_bench.data import get_layout, meta
from anomaly_bench.data_cli import main
from anomaly_bench.errors import DataError


def _official_mvtec(root, categories):
    """The index as the official data/mvtec.py builds it (images sorted per defect folder,
    masks paired by sorted position), written out by hand for the tiny tree."""
    info = {"train": {}, "test": {}}
    for cat in categories:
        for phase in ("train", "test"):
            rows = []
            for specie in sorted(p.name for p in (root / cat / phase).iterdir()):
                bad = specie != "good"
                imgs = sorted(p.name for p in (root / cat / phase / specie).iterdir())
                masks = sorted(p.name for p in (root / cat / "ground_truth" / specie).iterdir()
                               ) if bad else None
                rows += [{"img_path": f"{cat}/{phase}/{specie}/{name}",
                          "mask_path": f"{cat}/ground_truth/{specie}/{masks[i]}" if bad else "",
                          "cls_name": cat, "specie_name": specie, "anomaly": int(bad)}
                         for i, name in enumerate(imgs)]
            info[phase][cat] = rows
    return json.dumps(info, indent=4) + "\n"


def _records(split):
    return [(r.image_path, r.label, r.defect_type, r.mask_path) for r in split.train + split.test]


def test_written_mvtec_index_is_the_official_file_and_reads_back_as_the_folders(tmp_path,
                                                                                capsys):
    root = write_mvtec(tmp_path / "mvtec", ("bottle", "metal_nut"))
    layout = get_layout("mvtec")
    from_folders = {c: layout.split(root, c) for c in ("bottle", "metal_nut")}
    assert main(["meta", "mvtec", "--root", str(root)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (root / "meta.json").read_text() == _official_mvtec(root, ["bottle", "metal_nut"])
    assert layout.categories(root) == ["bottle", "metal_nut"]
    for cat, split in from_folders.items():
        assert _records(layout.split(root, cat)) == _records(split)
    assert main(["meta", "mvtec", "--root", str(root)]) == 0  # same content: nothing to do
    assert "up to date" in capsys.readouterr().out


def test_visa_index_has_the_official_empty_species_and_reads_back_as_the_split_file(tmp_path):
    root = write_visa(tmp_path / "visa")
    layout = get_layout("visa")
    before = layout.split(root, "pcb1")
    assert main(["meta", "visa", "--root", str(root), "--category", "pcb1"]) == 0
    data = json.loads((root / "meta.json").read_text())
    assert list(data["test"]) == ["pcb1"] and layout.categories(root) == ["pcb1"]
    assert {e["specie_name"] for e in data["test"]["pcb1"]} == {""}
    anomalous = [e for e in data["test"]["pcb1"] if e["anomaly"]]
    assert anomalous[0]["mask_path"] == "pcb1/Data/Masks/Anomaly/000.png"
    assert _records(layout.split(root, "pcb1")) == _records(before)
    with pytest.raises(DataError, match=r"'candle' is not listed in .*meta.json .*pcb1.*"
                                        r"anomaly-bench-data meta"):
        layout.split(root, "candle")


def test_a_users_reduced_index_is_honoured_in_its_order(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", ("bottle",))
    main(["meta", "mvtec", "--root", str(root)])
    data = json.loads((root / "meta.json").read_text())
    data["train"]["bottle"] = data["train"]["bottle"][:1]
    data["test"]["bottle"] = data["test"]["bottle"][::-1][:3]
    (root / "meta.json").write_text(json.dumps(data))
    split = get_layout("mvtec").split(root, "bottle")
    assert [r.image_path for r in split.train] == [root / data["train"]["bottle"][0]["img_path"]]
    assert [r.image_path.relative_to(root).as_posix() for r in split.test] == [
        e["img_path"] for e in data["test"]["bottle"]]
    assert all(r.mask_path is not None for r in split.test if r.label)


def test_btad_and_other_layouts_ignore_a_meta_json(tmp_path):
    mvtec, btad = write_mvtec(tmp_path / "mvtec", ("bottle",)), write_btad(tmp_path / "btad")
    for root in (mvtec, btad):
        (root / "meta.json").write_text("not json")
    with pytest.raises(DataError, match=r"meta\.json is not valid JSON"):
        get_layout("mvtec").categories(mvtec)
    layout = get_layout("btad")
    assert layout.split(btad, layout.categories(btad)[0]).test


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["test"]["bottle"][0].update(img_path="../outside.png"), r"without '\.\.'"),
    (lambda d: d["test"]["bottle"][0].update(img_path="/etc/passwd"), r"relative to"),
    (lambda d: d["test"]["bottle"][0].update(img_path="bottle/test/good/nope.png"),
     r"does not exist"),
    (lambda d: d["test"]["bottle"][0].update(cls_name="cable"), r"cls_name 'cable'"),
    (lambda d: d["test"]["bottle"][0].update(anomaly=2), r"anomaly 2; expected 0 or 1"),
    (lambda d: d["train"]["bottle"][0].update(anomaly=1), r"anomalous training image"),
    (lambda d: [e.update(mask_path="") for e in d["test"]["bottle"] if e["anomaly"]],
     r"mask_path \(anomalous\) is ''"),
    (lambda d: d["test"].update(bottle=[]), r"0 test images"),
    (lambda d: d.pop("train"), r"not a dataset index"),
])
def test_a_broken_entry_is_one_paragraph_naming_the_file_and_entry(tmp_path, edit, message):
    root = write_mvtec(tmp_path / "mvtec", ("bottle",))
    main(["meta", "mvtec", "--root", str(root)])
    data = json.loads((root / "meta.json").read_text())
    edit(data)
    (root / "meta.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as err:
        get_layout("mvtec").split(root, "bottle")
    assert str(root / "meta.json") in str(err.value) and "\n" not in str(err.value)


def test_an_index_that_differs_is_replaced_only_with_force(tmp_path, capsys):
    root = write_mvtec(tmp_path / "mvtec", ("bottle",))
    main(["meta", "mvtec", "--root", str(root)])
    written = (root / "meta.json").read_text()
    shutil.rmtree(root / "bottle" / "test" / "hole")  # the folders change
    shutil.rmtree(root / "bottle" / "ground_truth" / "hole")
    assert main(["meta", "mvtec", "--root", str(root)]) == 2
    assert "exists and differs" in capsys.readouterr().err
    assert (root / "meta.json").read_text() == written
    assert main(["meta", "mvtec", "--root", str(root), "--force"]) == 0
    assert "hole" not in (root / "meta.json").read_text()
    (root / "meta.json").write_text("{broken")  # unreadable: --force rewrites it
    assert main(["meta", "mvtec", "--root", str(root), "--force"]) == 0
    assert meta.index(root)["test"]["bottle"]


def test_meta_for_a_dataset_without_an_official_index_is_refused(tmp_path, capsys):
    assert main(["meta", "btad", "--root", str(tmp_path)]) == 2
    assert "meta.json for mvtec and visa only" in capsys.readouterr().err
