"""Exact k-nearest-neighbour search on the device, chunked to bound memory.

The search ranks by one matrix product, ``|q|^2 - 2 q.b + |b|^2`` (clamped at zero), the
formulation of faiss' flat L2 index and of PatchCore's reference code; the distances it
returns are then measured again for the k chosen rows as sums of squared differences.
Why: the product form cancels (its rounding error scales with ``|q| |b|``, not with the
distance), and how large that error is depends on the kernel's summation order, which
differs between CPUs (AMX, AVX-512, AVX2) and BLAS libraries: a SPADE image score moved by
1e-5 (relative) between an Intel and an AMD machine. A sum of squared differences has a
relative error of at most ``gamma_D`` (D the dimension) whatever the order, and equals
what the screened search of :mod:`anomaly_bench.ops.screen` reports. Queries are split
into chunks so the (queries x bank) distance block stays under ``max_bytes``; a bank too
large for one block is split too and the per-chunk top-k lists are merged, so the result is
the exact k nearest whatever the sizes. The product and the selection of the k smallest go
through :mod:`anomaly_bench.ops.matmul` (the fastest exact kernels per device); otherwise
nothing leaves the device, so the same code runs on CPU and CUDA.

:class:`KnnIndex` holds a fixed bank: it measures distances between mean-centred vectors
(the same distances, with far less cancellation for features sharing a large mean), finds
single nearest neighbours with the projected lower bound of
:mod:`anomaly_bench.ops.projected` when that beats brute force on the bank, and optionally
hands the search to faiss when it is installed (CPU tensors only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomaly_bench.ops.matmul import matmul_nt, pairwise_sqdist, smallest_k, sqnorm
from anomaly_bench.ops.projected import ProjectedSearch

#: Default upper bound of one distance block, in bytes.
MAX_BYTES = 256 * 2**20
#: Block of the single-nearest-neighbour search (queries x bank rows, 8 MiB of float32).
_K1_ROWS, _K1_COLS = 1024, 2048


@dataclass
class Neighbours:
    """The k nearest bank rows per query: Euclidean ``distances`` (ascending), ``indices``."""

    distances: torch.Tensor
    indices: torch.Tensor


def _rows_per_chunk(n_cols: int, max_bytes: int, element_bytes: int = 4) -> int:
    return max(1, max_bytes // max(1, n_cols * element_bytes))


def knn(query: torch.Tensor, bank: torch.Tensor, k: int, *, bank_sq: torch.Tensor | None = None,
        max_bytes: int = MAX_BYTES, remeasure: bool = True) -> Neighbours:
    """The exact ``k`` nearest rows of ``bank`` (N, D) for every row of ``query`` (M, D).

    ``remeasure``: the distances of the chosen rows as sums of squared differences
    (kernel-independent, see the module docstring), else as the search ranked them."""
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"knn expects (M, D) and (N, D); got {tuple(query.shape)} and "
                         f"{tuple(bank.shape)}")
    n = bank.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in 1..{n} (the bank size)")
    bank_sq = sqnorm(bank) if bank_sq is None else bank_sq
    if k == 1:  # cache-sized blocks: the row minimum then reads what the product just wrote
        cols = min(n, _K1_COLS)
        rows = max(1, min(_K1_ROWS, _rows_per_chunk(cols, max_bytes)))
    else:
        cols = min(n, max(k, _rows_per_chunk(1, max_bytes // 64)))  # bank chunk for huge banks
        rows = _rows_per_chunk(cols, max_bytes)
    out_d, out_i = [], []
    for q0 in range(0, query.shape[0], rows):
        q = query[q0:q0 + rows]
        q_sq = sqnorm(q)
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for b0 in range(0, n, cols):
            blk = bank[b0:b0 + cols]
            if k == 1:  # |b|^2 - 2 q.b, then the row minimum, then + |q|^2
                d = matmul_nt(q, blk).mul_(-2).add_(bank_sq[b0:b0 + cols].unsqueeze(0))
                dv, di = d.min(dim=1, keepdim=True)
                dv = dv.add_(q_sq.unsqueeze(1)).clamp_min_(0)
            else:
                d = pairwise_sqdist(q, blk, q_sq, bank_sq[b0:b0 + cols])
                dv, di = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            di = di + b0
            if best_d is None:
                best_d, best_i = dv, di
            elif k == 1:  # strictly closer only: ties keep the smaller index, as argmin does
                closer = dv < best_d
                best_d, best_i = torch.where(closer, dv, best_d), torch.where(closer, di, best_i)
            else:
                cat_d, cat_i = torch.cat([best_d, dv], 1), torch.cat([best_i, di], 1)
                best_d, pos = cat_d.topk(k, dim=1, largest=False)
                best_i = cat_i.gather(1, pos)
        if remeasure:
            best_d = sqdist_rows(q, bank, best_i, max_bytes)
            if k > 1:  # ascending by the measured distances (ties keep the search's order)
                best_d, pos = best_d.sort(dim=1, stable=True)
                best_i = best_i.gather(1, pos)
        out_d.append(best_d.sqrt_())
        out_i.append(best_i)
    return Neighbours(torch.cat(out_d), torch.cat(out_i))


def sqdist_rows(query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """(M, k) squared distances of each query row (M, D) to its bank rows ``index`` (M, k),
    as sums of squared differences (chunked to bound the (rows, k, D) differences)."""
    m, k = index.shape
    rows = max(1, max_bytes // max(1, k * bank.shape[1] * bank.element_size()))
    out = torch.empty(m, k, device=query.device, dtype=query.dtype)
    for r0 in range(0, m, rows):
        diff = query[r0:r0 + rows].unsqueeze(1) - bank[index[r0:r0 + rows]]
        out[r0:r0 + rows] = diff.square_().sum(dim=-1)
    return out


def max_cosine(query: torch.Tensor, bank: torch.Tensor, *,
               max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """(M,) largest dot product of each row of ``query`` (M, D) with a row of ``bank``
    (N, D): the nearest cosine similarity when both are L2-normalised. Query rows are
    chunked so each (rows x N) block of products stays under ``max_bytes``."""
    rows = _rows_per_chunk(bank.shape[0], max_bytes)
    return torch.cat([matmul_nt(query[r0:r0 + rows], bank).amax(dim=1)
                      for r0 in range(0, query.shape[0], rows)])


def self_knn_mean(x: torch.Tensor, k: int, *, max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """Mean Euclidean distance of each row of ``x`` (B, P, D) to its ``k`` nearest *other* rows.

    Each of the B sets is searched on its own, in row chunks of one matrix product each; a
    row's own distance is excluded, duplicates of it elsewhere are not. Returns (B, P).
    """
    b, p, _ = x.shape
    if not 1 <= k < p:
        raise ValueError(f"k={k} must be in 1..{p - 1} (the other rows of each set)")
    sq = sqnorm(x)
    rows = _rows_per_chunk(p, max_bytes)
    out = torch.empty(b, p, device=x.device, dtype=x.dtype)
    for i in range(b):  # one image's patches against each other
        for r0 in range(0, p, rows):
            d = pairwise_sqdist(x[i, r0:r0 + rows], x[i], sq[i, r0:r0 + rows], sq[i])
            r = torch.arange(d.shape[0], device=x.device)
            d[r, r + r0] = float("inf")
            # only the mean is needed: an unsorted selection of the k smallest suffices
            out[i, r0:r0 + rows] = smallest_k(d, k).sqrt_().mean(1)
    return out


class KnnIndex:
    """A searchable bank: exact torch search, or a faiss flat L2 index (``backend='faiss'``).

    ``backend='auto'`` uses torch; faiss is used only when asked for, is installed and the
    bank lives on the CPU (its results are exact too, from a different BLAS order).
    ``prune=False`` turns the projected lower bound off (brute force for every query).
    """

    def __init__(self, bank: torch.Tensor, backend: str = "torch",
                 max_bytes: int = MAX_BYTES, prune: bool = True) -> None:
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"knn backend {backend!r} is not one of auto, torch, faiss")
        self.bank = bank
        # distances are taken between mean-centred vectors: the same values, but far less
        # cancellation in |q|^2 - 2 q.b + |b|^2 for features that share a large mean
        self.mean = bank.mean(dim=0)
        self.centred = bank - self.mean
        self.bank_sq = sqnorm(self.centred)
        self.max_bytes = max_bytes
        self._faiss = None
        if backend == "faiss":
            self._faiss = _faiss_index(bank)
        #: exact 1-NN with a projected lower bound, when it beats brute force on this bank
        self.projected = (ProjectedSearch.build(self.centred, self.mean)
                          if prune and self._faiss is None and bank.dtype == torch.float32
                          else None)

    def search(self, query: torch.Tensor, k: int) -> Neighbours:
        if self._faiss is not None:
            d, i = self._faiss.search(query.detach().float().contiguous().numpy(), k)
            return Neighbours(torch.from_numpy(d).clamp_min_(0).sqrt_(),
                              torch.from_numpy(i).long())
        if k == 1 and self.projected is not None and query.dtype == self.bank.dtype:
            d, i = self.projected.nearest(query)
            return Neighbours(d.sqrt_().unsqueeze(1), i.unsqueeze(1))
        return knn(query - self.mean, self.centred, k, bank_sq=self.bank_sq,
                   max_bytes=self.max_bytes)


def _faiss_index(bank: torch.Tensor):  # faiss has no type stubs
    from anomaly_bench.errors import ConfigError

    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            "method.knn_backend=faiss needs the faiss package: pip install -e '.[faiss]' "
            "(or use method.knn_backend=torch, which is exact too)."
        ) from exc
    if bank.device.type != "cpu":
        raise ConfigError("method.knn_backend=faiss runs on the CPU; use knn_backend=torch "
                          "on CUDA (the torch search stays on the device).")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().float().contiguous().numpy())
    return index
