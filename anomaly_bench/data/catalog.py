"""What is published about each dataset: image counts per category, where it can be
downloaded (with the file's SHA-256) and under which terms.

Counts are (training images, normal test images, anomalous test images) per category:

- MVTec AD: Table 1 of Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021);
  they add up to the paper's 3629 training and 1725 test images (5354 in all).
- VisA: the official one-class split file ``split_csv/1cls.csv`` of amazon-science/spot-diff
  (commit 6dbf63c), whose normal and anomalous totals match that repository's statistics
  table (9621 normal, 1200 anomalous images).
- BTAD and MPDD: per-category counts are not published in a form checked here (BTAD's
  README gives one image count per product without the train/test split; MPDD's paper
  gives totals only), so only their layout is checked.

Downloads: only datasets whose licence allows redistribution and that are published at a
stable direct URL with a known SHA-256 (the digests anomalib pins for the same files).
"""

from __future__ import annotations

from dataclasses import dataclass

from anomaly_bench.download import Remote


@dataclass(frozen=True)
class Counts:
    train: int
    test_normal: int
    test_anomalous: int


MVTEC = {
    "bottle": Counts(209, 20, 63), "cable": Counts(224, 58, 92),
    "capsule": Counts(219, 23, 109), "carpet": Counts(280, 28, 89),
    "grid": Counts(264, 21, 57), "hazelnut": Counts(391, 40, 70),
    "leather": Counts(245, 32, 92), "metal_nut": Counts(220, 22, 93),
    "pill": Counts(267, 26, 141), "screw": Counts(320, 41, 119),
    "tile": Counts(230, 33, 84), "toothbrush": Counts(60, 12, 30),
    "transistor": Counts(213, 60, 40), "wood": Counts(247, 19, 60),
    "zipper": Counts(240, 32, 119),
}
VISA = {
    "candle": Counts(900, 100, 100), "capsules": Counts(542, 60, 100),
    "cashew": Counts(450, 50, 100), "chewinggum": Counts(453, 50, 100),
    "fryum": Counts(450, 50, 100), "macaroni1": Counts(900, 100, 100),
    "macaroni2": Counts(900, 100, 100), "pcb1": Counts(904, 100, 100),
    "pcb2": Counts(901, 100, 100), "pcb3": Counts(905, 101, 100),
    "pcb4": Counts(904, 101, 100), "pipe_fryum": Counts(450, 50, 100),
}
#: layout name -> published counts per category
PUBLISHED: dict[str, dict[str, Counts]] = {"mvtec": MVTEC, "visa": VISA}
COUNT_SOURCES = {
    "mvtec": "Bergmann et al., IJCV 2021, Table 1",
    "visa": "split_csv/1cls.csv of amazon-science/spot-diff",
}


@dataclass(frozen=True)
class Source:
    """How a dataset is fetched: archives and files (``member``: where a plain file goes
    inside the dataset folder), its licence, and the folder the archive unpacks to."""

    licence: str
    files: tuple[Remote, ...]
    members: tuple[str | None, ...]  # per file: None = an archive to unpack, else a path


SOURCES: dict[str, Source] = {
    "visa": Source(
        licence="CC BY 4.0 (amazon-science/spot-diff, LICENSE-DATASET)",
        files=(
            Remote("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
                   "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
                   "VisA_20220922.tar"),
            Remote("https://raw.githubusercontent.com/amazon-science/spot-diff/"
                   "6dbf63c1f0ac62140e506753e68b4fecb437a5ff/split_csv/1cls.csv",
                   "a48557e6033318cb90556f706196bc9d247a776a23ea51aecee5a80dd0332995",
                   "1cls.csv"),
        ),
        members=(None, "split_csv/1cls.csv"),
    ),
    "btad": Source(
        licence="CC BY-SA (its README; anomalib lists CC BY-NC-SA 4.0): attribution to "
                "beanTech srl and Mishra et al. 2021",
        files=(Remote("https://avires.dimi.uniud.it/papers/btad/btad.zip",
                      "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
                      "btad.zip"),),
        members=(None,),
    ),
}
#: datasets that are not downloaded, and why
NOT_DOWNLOADED = {
    "mvtec": "MVTec hands the archive out through the download form on mvtec.com, where the "
             "CC BY-NC-SA 4.0 terms (non-commercial use) are accepted: download it there",
    "mpdd": "published as a OneDrive share (CC BY-NC-SA 4.0) without a stable direct URL or "
            "checksum: download it from the link on the authors' page (Jezek et al., 2021)",
    "aebad_s": "published on Google Drive and Baidu without a licence statement or checksum",
    "aebad_v": "published on Google Drive and Baidu without a licence statement or checksum",
    "stc": "ShanghaiTech Campus is shared through links on the authors' page without a "
           "licence statement or checksum",
}
