"""PRO curve and AUPRO exactly as the official MVTec AD evaluation script, in pure torch.

Every pixel of every image is pooled: a defect-free pixel adds 1 to the false-positive
count and a pixel of ground-truth region k adds 1/|k| to the overlap sum (each region
weighs the same, whatever its image). Lowering the threshold, the counts change in steps;
between two consecutive scores of defect pixels only the false positives grow. So the
curve is read off two sorts, the defect-free pixels' scores and the defect pixels' scores,
with no per-threshold loop: at each distinct defect score a binary search in the
defect-free scores gives the false positives (:func:`counts_of`). Regions are the
8-connected components of each mask; labelling them with SciPy is the only CPU step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy import ndimage

from anomaly_bench.metrics.roc import _has_nan, binary_labels
from anomaly_bench.metrics.sorting import kth_smallest, select, sort_asc, sort_desc

__all__ = ["Counts", "Regions", "aupro", "aupro_of", "counts_of", "label_regions", "pro_curve",
           "regions_of"]

# 8-connectivity inside each image and none across the stack: only the middle slice of the
# 3x3x3 structure is set, so one scipy call labels all masks with ids unique in the stack.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _stack(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, H, W) view of a (N, H, W), (N, 1, H, W) or single (H, W) tensor."""
    x = torch.as_tensor(x)
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.dim() == 2:
        x = x[None]
    if x.dim() != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


def _label(m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Region ids (int32, N x H x W, on the masks' device) of bool masks, and their count."""
    if m.numel() == 0:
        return torch.zeros(m.shape, dtype=torch.int32, device=m.device), 0
    ids, n = ndimage.label(m.cpu().numpy(), structure=_STRUCTURE, output=np.int32)
    return torch.from_numpy(ids).to(m.device), int(n)


def label_regions(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected defect regions of each mask, with ids unique across the whole stack.

    Returns ``(region_ids, n_regions)``: int64 ids (N, H, W) on the masks' device, 0 for
    defect-free pixels and 1..n_regions for the regions. Diagonal neighbours are connected;
    regions never span two images.
    """
    ids, n = _label(binary_labels(_stack(masks, "masks")))
    return ids.long(), n


@dataclass
class Counts:
    """The corners of the pooled counting curve, highest threshold first, and the sorted
    scores they are read from.

    Lowering the threshold through the distinct scores, the false positives ``fp``
    (defect-free pixels at or above it), true positives ``tp`` (defect pixels) and the
    ``overlap`` (summed 1/|region| of those defect pixels) only grow; between two distinct
    defect scores only ``fp`` does, so there every curve built from the counts (ROC,
    precision-recall, PRO) runs flat in its y. The corners are each distinct defect score
    (``fp`` counting the defect-free pixels tied with it) and the point before it (the end
    of the flat run: the defect-free pixels above it), then the count of all pixels;
    repeated points are merged. Trapezoid areas, average precision, F1-max and the AUPRO
    interpolation over the corners equal those over every distinct score, from at most two
    points per defect pixel instead of one per pixel. Counts are float64.

    ``normal``: the defect-free pixels' scores, ascending; ``defect``: the defect pixels'
    scores, descending, and ``defect_overlap`` the overlap summed along them (what
    :meth:`above` reads at any threshold).
    """

    fp: torch.Tensor
    tp: torch.Tensor
    overlap: torch.Tensor
    n_regions: int
    n_normal: int
    normal: torch.Tensor
    defect: torch.Tensor
    defect_overlap: torch.Tensor

    def pro_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unclipped (fpr, pro) per corner."""
        return self.fp / self.n_normal, self.overlap / self.n_regions

    def above(self, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(false positives, overlap) float64 at each threshold: the pixels scoring above
        it (of those counted, see :func:`counts_of`'s ``fpr_limit``)."""
        fp = self.normal.numel() - torch.searchsorted(self.normal, thresholds, right=True)
        n_defect = (self.defect.numel()
                    - torch.searchsorted(self.defect.flip(0), thresholds, right=True))
        overlap = torch.cat([self.defect_overlap.new_zeros(1), self.defect_overlap])
        return fp.to(torch.float64), overlap[n_defect]

    def score_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lowest, highest) score counted, as 1-element tensors."""
        ends = torch.cat([self.normal[:1], self.normal[-1:], self.defect[:1], self.defect[-1:]])
        return ends.amin(0, keepdim=True), ends.amax(0, keepdim=True)


@dataclass
class Regions:
    """Maps (N, H, W, floating point) and the region ids of their masks (int32, 0 for
    defect-free pixels, 1..n_regions, unique across the stack), on the maps' device."""

    maps: torch.Tensor
    ids: torch.Tensor
    n_regions: int

    @cached_property
    def is_defect(self) -> torch.Tensor:
        """Whether each pixel lies in a region (bool, flat)."""
        return self.ids.reshape(-1) != 0

    @cached_property
    def defect_ids(self) -> torch.Tensor:
        """The region id of each defect pixel, in pixel order."""
        return select(self.ids.reshape(-1), self.is_defect)

    @cached_property
    def sizes(self) -> torch.Tensor:
        """Pixels per region id (float64; index 0 counts the defect-free pixels)."""
        sizes = torch.bincount(self.defect_ids, minlength=self.n_regions + 1).to(torch.float64)
        sizes[0] = self.ids.numel() - self.defect_ids.numel()
        return sizes

    @cached_property
    def weight(self) -> torch.Tensor:
        """Overlap one pixel adds by region id, 1/|region| (float64); 0 for id 0."""
        weight = 1.0 / self.sizes.clamp(min=1)
        weight[0] = 0.0
        return weight


def regions_of(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> Regions:
    """Maps and masks checked for shape, the masks labelled once (8-connected regions)."""
    maps = _stack(anomaly_maps, "anomaly_maps")
    m = binary_labels(_stack(masks, "masks")).to(maps.device)
    if maps.shape != m.shape:
        raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(m.shape)} "
                         "differ in shape")
    if not maps.is_floating_point():
        maps = maps.double()
    ids, n_regions = _label(m)
    return Regions(maps, ids, n_regions)


def counts_of(regions: Regions, fpr_limit: float | None = None) -> Counts:
    """The corners of the pooled counting curve (:class:`Counts`) of all pixels of the stack.

    With ``fpr_limit`` only the pixels scoring at least as high as the k-th highest normal
    pixel are counted, k = floor(fpr_limit * #normal) + 2: the curve's points above that
    score are unchanged and the last one has FPR > fpr_limit, so the curve up to the limit
    (and its interpolation point) is exact while less is sorted.
    """
    scores = regions.maps.reshape(-1)
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()  # exact for half precision; the sorts' fast paths take it
    n_normal = int(regions.sizes[0])
    normal, defect = select(scores, ~regions.is_defect), select(scores, regions.is_defect)
    defect_ids = regions.defect_ids
    if fpr_limit is not None and n_normal > 0:
        k = math.floor(fpr_limit * n_normal) + 2
        if k <= n_normal:
            kth = kth_smallest(normal, n_normal - k + 1)
            normal = normal[normal >= kth]
            keep = defect >= kth
            defect, defect_ids = defect[keep], defect_ids[keep]
    normal = sort_asc(normal)
    defect, defect_ids = sort_desc(defect, defect_ids)
    defect_overlap = regions.weight.index_select(0, defect_ids).cumsum_(0)
    n = normal.numel()
    last = torch.ones_like(defect, dtype=torch.bool)
    last[:-1] = defect[1:] != defect[:-1]
    ends = last.nonzero().squeeze(1)  # the last defect pixel of each distinct score
    at = defect[ends]
    zero = defect_overlap.new_zeros(1)
    # the counts of defect pixels down to each distinct defect score, after a leading 0
    tp = torch.cat([zero, (ends + 1).to(torch.float64)])
    overlap = torch.cat([zero, defect_overlap[ends]])
    # per distinct defect score: the point before it (the defect-free pixels above it, the
    # counts of the scores above) and its own point (those tied with it, too); then all
    before = (n - torch.searchsorted(normal, at, right=True)).to(torch.float64)
    at_or_above = (n - torch.searchsorted(normal, at)).to(torch.float64)
    fp = _corners(before, at_or_above, zero + n)
    tp, overlap = (_corners(c[:-1], c[1:], c[-1:]) for c in (tp, overlap))
    # merge repeated points, and a first one at the origin (no pixel counted yet)
    new = torch.ones_like(fp, dtype=torch.bool)
    new[1:] = (fp[1:] != fp[:-1]) | (tp[1:] != tp[:-1])
    new[0] = fp[0] + tp[0] > 0
    fp, tp, overlap = fp[new], tp[new], overlap[new]
    return Counts(fp, tp, overlap, regions.n_regions, n_normal, normal, defect, defect_overlap)


def _corners(before: torch.Tensor, at: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """``before[0], at[0], before[1], at[1], ..., final``: a count at the corners of
    :class:`Counts`, in order."""
    return torch.cat([torch.stack([before, at], 1).reshape(-1), final])


def pro_curve(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official MVTec AD PRO curve over all pixels of the stack.

    Returns float64 ``fpr`` and ``pro`` at the curve's corners (:class:`Counts`: the same
    polyline as one point per distinct score, without the points inside its flat runs),
    clipped to 1, with (0, 0) prepended and (1, 1) appended. The values are NaN
    when the masks hold no region (PRO) or no defect-free pixel (FPR); :func:`aupro` then
    returns None.
    """
    regions = regions_of(anomaly_maps, masks)
    if _has_nan(regions.maps):
        raise ValueError("pro_curve: anomaly_maps contain NaN")
    return _close_curve(*counts_of(regions).pro_points())


def _close_curve(fpr: torch.Tensor, pro: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to 1, prepend (0, 0) and append (1, 1), as the official script does."""
    zero, one = fpr.new_zeros(1), fpr.new_ones(1)
    return (torch.cat([zero, fpr.clamp(max=1.0), one]),
            torch.cat([zero, pro.clamp(max=1.0), one]))


def _trapezoid_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> torch.Tensor:
    """Trapezoid integral of y(x) over [x[0], x_max] for sorted x with x[0] <= x_max.

    Where x_max falls strictly between two points, y is interpolated linearly there (the
    official ``trapezoid(..., x_max)``). Works without a host sync until the result is read.
    """
    dx, y_sum = x[1:] - x[:-1], y[1:] + y[:-1]
    area = torch.where(x[1:] <= x_max, 0.5 * dx * y_sum, 0.0).sum()
    ins = torch.searchsorted(x, x.new_full((1,), x_max), right=True)  # x[:ins] <= x_max
    i0, i1 = ins - 1, ins.clamp(max=x.numel() - 1)
    x0, x1, y0, y1 = x[i0], x[i1], y[i0], y[i1]
    inside = (ins < x.numel()) & (x0 < x_max)
    span = torch.where(inside, x1 - x0, 1.0)
    y_at = y0 + (y1 - y0) * (x_max - x0) / span
    return area + torch.where(inside, 0.5 * (y_at + y0) * (x_max - x0), 0.0).sum()


def aupro(anomaly_maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the official PRO curve up to ``fpr_limit`` (default 0.3).

    None when the masks hold no defect region or no defect-free pixel, or the maps contain
    NaN; otherwise a float in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    regions = regions_of(anomaly_maps, masks)
    if regions.maps.numel() == 0 or _has_nan(regions.maps):
        return None
    return aupro_of(counts_of(regions, fpr_limit), fpr_limit)


def aupro_of(counts: Counts, fpr_limit: float) -> float | None:
    if counts.n_regions == 0 or counts.n_normal == 0:
        return None
    fpr, pro = counts.pro_points()
    # only the points up to the limit and the first one past it shape the area
    keep = int(torch.searchsorted(fpr, fpr.new_full((1,), fpr_limit), right=True)) + 1
    fpr, pro = _close_curve(fpr[:keep], pro[:keep])
    value = float(_trapezoid_to(fpr, pro, fpr_limit)) / fpr_limit
    return min(max(value, 0.0), 1.0)
