"""The "PRO" of the APRIL-GAN and MMR repositories: 200 thresholds, FPR < 0.3 rescaled.

Both repositories score the maps at 200 thresholds evenly spaced from the lowest score
(included) towards the highest (excluded), ``t_k = lo + k (hi - lo) / 200``; at ``t_k`` a
pixel is positive when its score is above it. PRO is the mean over 8-connected ground-truth
regions of the positive fraction of each region, FPR the positive fraction of the
defect-free pixels. The points with FPR < 0.3 are kept, their FPR rescaled, and the area
under PRO(FPR) is summed by the trapezoid rule. They pool differently:

- ``aupro_200`` (APRIL-GAN's ``cal_pro_score`` in ``test.py``, after cflow-ad): one curve
  per category: thresholds over the category's score range, PRO the mean over every region
  of every image, FPR over all its defect-free pixels; the kept FPRs min-max rescaled to
  [0, 1].
- ``aupro_200_per_image`` (MMR's ``compute_pro`` in ``utils/common.py``): one curve per
  image whose mask holds a defect: thresholds over that image's own score range, its own
  regions and defect-free pixels; the kept FPRs divided by the largest one; the mean of
  the areas over those images.

Neither is the official MVTec AD AUPRO (:mod:`~anomaly_bench.metrics.pro`): the rescaling
stretches whatever FPR range the kept points span to the whole axis, so the values are only
comparable with tables computed the same way.

Computation: a pixel is positive at ``t_k`` exactly when ``k < b``, ``b`` the number of
thresholds below its score. The category curve reads its 200 points from the sorted scores
the official AUPRO already holds (binary searches in the defect-free and defect scores); the
per-image curves bucketize every score among its image's thresholds and histogram ``b`` per
image, so there is no loop over thresholds or pixels, on any device. Thresholds are
computed in float64 and compared in the maps' dtype (see :func:`_thresholds`).

Where the repositories return NaN or raise, the value here is None (an empty cell):
a constant map (no threshold), no defect region or no defect-free pixel, fewer than two
kept points, kept FPRs that cannot be rescaled (APRIL-GAN: all equal, e.g. all 0; MMR: the
largest is 0, which happens when no defect-free pixel scores above the image's minimum).
The per-image value is None as soon as one image's area is: the repository's mean is NaN
then, and a mean over the other images would be a number no table holds. The repositories
pick MMR's images by image label, here by mask; they are the same images whenever labels
and masks agree. Both repositories build the thresholds with ``np.arange(lo, hi,
(hi - lo) / 200)``, which by floating-point rounding yields a 201st threshold at about
``hi`` for about 6% of score ranges (adding a point at FPR about 0 that can move the
area); here there are always 200.
"""

from __future__ import annotations

import logging

import torch

from anomaly_bench.metrics.pro import Counts, Regions, counts_of, regions_of
from anomaly_bench.metrics.roc import _has_nan
from anomaly_bench.metrics.sorting import select

log = logging.getLogger("anomaly_bench")

__all__ = ["STEPS", "aupro_200", "aupro_200_of", "aupro_200_per_image", "per_image_of"]

#: Thresholds per curve.
STEPS = 200
#: Points with an FPR below this are kept.
FPR_LIMIT = 0.3
#: Pixels bucketized at once by the per-image curves (bounds the int64 bucket tensor).
CHUNK_PIXELS = 1 << 22


def _thresholds(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, STEPS) thresholds ``lo + k (hi - lo) / STEPS`` of B score ranges.

    Computed in float64, then for float32 scores each is replaced by the largest float32
    not above it: a float32 score is above that value exactly when it is above the float64
    threshold, so the scores are compared without a float64 copy.
    """
    lo64, hi64 = lo.double(), hi.double()
    k = torch.arange(STEPS, dtype=torch.float64, device=lo.device)
    t = lo64[:, None] + k[None] * ((hi64 - lo64) / STEPS)[:, None]
    if dtype == torch.float64:
        return t
    low = t.to(dtype)
    return torch.where(low.double() > t, torch.nextafter(low, torch.full_like(low, -torch.inf)),
                       low)


def _areas(fpr: torch.Tensor, pro: torch.Tensor, min_max: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoid areas of B curves (B, STEPS) over their points with FPR < FPR_LIMIT, and
    whether each is defined.

    The FPR falls as the threshold rises, so the kept points are the curve's tail and
    consecutive kept points are neighbours. ``min_max``: the kept FPRs rescaled to [0, 1]
    (APRIL-GAN), else divided by the largest (MMR). Undefined: fewer than two kept points,
    or a rescaling by 0 (the repositories' NaN).
    """
    keep = fpr < FPR_LIMIT
    top = torch.where(keep, fpr, -torch.inf).amax(1)
    low = torch.where(keep, fpr, torch.inf).amin(1) if min_max else torch.zeros_like(top)
    ok = (keep.sum(1) >= 2) & (top > low)
    x = (fpr - low[:, None]) / torch.where(ok, top - low, 1.0)[:, None]
    trapezoids = 0.5 * (x[:, :-1] - x[:, 1:]) * (pro[:, :-1] + pro[:, 1:])
    area = torch.where(keep[:, 1:] & keep[:, :-1], trapezoids, 0.0).sum(1)
    return area.clamp(0.0, 1.0), ok


def _scores(maps: torch.Tensor) -> torch.Tensor:
    """Scores in a dtype :func:`_thresholds` handles (half precision widened exactly)."""
    return maps if maps.dtype in (torch.float32, torch.float64) else maps.float()


# ---------------------------------------------------------------------- per category
def aupro_200_of(counts: Counts) -> float | None:
    """``aupro_200`` from the category's counts (:func:`~.pro.counts_of` without an FPR
    limit); None where undefined (module docstring)."""
    if counts.n_regions == 0 or counts.n_normal == 0:
        return None
    lo, hi = counts.score_range()
    if float(hi) == float(lo):
        return None
    fp, overlap = counts.above(_thresholds(lo, hi, lo.dtype)[0])
    area, ok = _areas((fp / counts.n_normal)[None], (overlap / counts.n_regions)[None],
                      min_max=True)
    return float(area[0]) if bool(ok[0]) else None


def aupro_200(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> float | None:
    """APRIL-GAN's PRO of a category's maps (N, H, W) and masks; None where undefined."""
    regions = regions_of(anomaly_maps, masks)
    if regions.maps.numel() == 0 or _has_nan(regions.maps):
        return None
    return aupro_200_of(counts_of(regions))


# ---------------------------------------------------------------------- per image
def _below(scores: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
           ) -> torch.Tensor:
    """Thresholds below each score, 0..STEPS: row i of ``scores`` (B, P) searched in row i
    of ``t`` (:func:`_thresholds` of ``lo``, ``hi``).

    On the CPU a binary search per score (``torch.searchsorted``) takes about three times
    as long as reading the count off ``ceil((s - lo) / step)`` and checking it against the
    two thresholds around it; the rare scores the check rejects (a score exactly on a
    threshold where the float64 division rounds past the integer) are searched. On CUDA
    the search is fast and used as is.
    """
    if scores.device.type != "cpu":
        return torch.searchsorted(t, scores)
    n = scores.shape[0]
    lo64 = lo.double()[:, None]
    step = ((hi.double() - lo.double()) / STEPS)[:, None]
    below = ((scores.double() - lo64) / torch.where(step > 0, step, 1.0)).ceil_()
    below = below.clamp_(0, STEPS).long()
    # column k + 1 holds t_k: the thresholds around a count b are columns b and b + 1
    padded = torch.cat([t.new_full((n, 1), -torch.inf), t, t.new_full((n, 1), torch.inf)], 1)
    exact = (padded.gather(1, below) < scores) & (padded.gather(1, below + 1) >= scores)
    if not bool(exact.all()):
        below = torch.where(exact, below, torch.searchsorted(t, scores))
    return below


def _image_areas(scores: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR's area and whether it is defined, for each of B images (scores and region ids
    (B, P); ``weight``: 1/|region| by region id, 0 for id 0)."""
    n_images = scores.shape[0]
    lo, hi = scores.amin(1), scores.amax(1)
    t = _thresholds(lo, hi, scores.dtype)
    bins = STEPS + 1
    scores = scores.contiguous()
    index = _below(scores, t, lo, hi)  # thresholds under each score: 0..STEPS
    index += bins * torch.arange(n_images, device=scores.device)[:, None]
    # pixels by bucket, then the defect pixels alone (few): their count and overlap weights
    size = n_images * bins
    index = index.reshape(-1)
    is_defect = ids.reshape(-1) != 0
    at_defect = select(index, is_defect)
    pixels = torch.bincount(index, minlength=size)
    defects = torch.bincount(at_defect, minlength=size)
    overlap = torch.bincount(at_defect, weights=weight.index_select(0, select(ids.reshape(-1),
                                                                                is_defect)),
                             minlength=size).view(n_images, bins)
    normal = (pixels - defects).to(torch.float64).view(n_images, bins)
    n_normal = normal.sum(1)
    # each region's pixels add up to 1, so an image's overlap total is its region count
    n_regions = overlap.sum(1).round()

    def above(hist: torch.Tensor) -> torch.Tensor:  # at t_k: the pixels of buckets k+1..
        return hist.flip(1).cumsum(1).flip(1)[:, 1:]

    fpr = above(normal) / n_normal.clamp(min=1)[:, None]
    pro = above(overlap) / n_regions[:, None]
    area, ok = _areas(fpr, pro, min_max=False)
    return area, ok & (n_normal > 0) & (hi > lo)


def per_image_of(regions: Regions) -> float | None:
    """``aupro_200_per_image`` of labelled maps; None where undefined (module docstring)."""
    n = regions.maps.shape[0]
    scores = _scores(regions.maps).reshape(n, -1)
    ids = regions.ids.reshape(n, -1)
    weight = regions.weight
    pick = regions.is_defect.view(n, -1).any(1).nonzero().squeeze(1)  # images with a defect
    if pick.numel() == 0:
        return None
    per_chunk = max(1, CHUNK_PIXELS // max(scores.shape[1], 1))
    parts = [_image_areas(scores[i], ids[i], weight) for i in pick.split(per_chunk)]
    area = torch.cat([a for a, _ in parts])
    ok = torch.cat([o for _, o in parts])
    undefined = int((~ok).sum())
    if undefined:
        log.info("aupro_200_per_image is undefined: %d of %d images with a defect have a "
                 "constant map, no defect-free pixel or no kept FPR above 0", undefined,
                 ok.numel())
        return None
    return min(max(float(area.mean()), 0.0), 1.0)


def aupro_200_per_image(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> float | None:
    """MMR's PRO of a category's maps (N, H, W) and masks; None where undefined."""
    regions = regions_of(anomaly_maps, masks)
    if regions.maps.numel() == 0 or _has_nan(regions.maps):
        return None
    return per_image_of(regions)
