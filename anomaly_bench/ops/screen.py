"""Exact single nearest neighbours of many queries: a bfloat16 screen, then float32 checks.

Why: on CPUs with AMX (Intel Xeon since Sapphire Rapids) a bfloat16 matrix product runs
about eight times faster than a float32 one of the same shape (1024 x 4096 x 256 on one
core of the reference machine: 13.5 ms float32, 1.7 ms bfloat16), so three bfloat16
products cost less than one float32 product. This module uses that speed without giving
up exactness: the bfloat16 product only decides which bank entries *cannot* be the
nearest one; the distances reported are float32 sums of squared differences of the
original vectors.

How: with ``x = query - mean`` and ``y = entry - mean``, each row is described by its
first principal coordinates ``p`` and the norm ``r`` of the rest (rows of at most 192
dimensions keep all of them), computed in float64, so that ``x.y <= p_x.p_y + r_x r_y``
(Cauchy-Schwarz on the rest). These coordinates ``z`` are split into bfloat16 parts
(``z = z_h + z_l`` up to a relative ``u^2``, ``u = 2^-8``), and one product of augmented
rows gives, per pair,

    Z = |x|^2 + |y|^2 - 2 (z_h.z'_h + z_h.z'_l + z_l.z'_h) - c (|x| + |y|)^2 - T

where the squared norms and ``T`` enter as three bfloat16 parts each (24 bits), the
product accumulates in float32 and rounds once to bfloat16. Without the last two terms
``Z`` is at most the squared distance, up to rounding; ``c (|x| + |y|)^2`` covers every
rounding on the way (the dropped ``z_l.z'_l`` terms, the float32 accumulation over all K
terms, the float64 coordinates, the centring), so ``Z <= 0`` holds for every entry whose
true distance is at most ``T``; rounding to bfloat16 keeps the sign. ``T`` is an upper
bound of the nearest distance: first the exact distance of the nearest entry among a
strided sample of the bank, then, tile by tile, the smallest exact distance among the
entries the screen let through. An entry with ``Z > 0`` is farther than an entry already
measured and is skipped; the nearest entry always passes. Each surviving entry's distance
is then computed exactly, so results equal a plain float32 search (distances as sums of
squared differences, ties to the smallest index as with ``argmin``).

On SPADE's 256-d layer1 features (one image's 3136 positions against 100,352 gallery
rows, two threads) this took 254 ms where the plain blocked search took 628 ms, with 11
exact checks per position on a texture and 21 on an object.

Where it applies: :func:`screen_available` is true on CPUs with AMX-BF16 only: elsewhere
a bfloat16 product is not faster than float32 (and cuBLAS may reduce bfloat16 products
in reduced precision, which the error bound does not cover), so callers use the plain
search there. The sign test (:func:`_nonpositive`) reads the product's int16 view and
runs in NumPy on the CPU.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from anomaly_bench.ops.knn import knn
from anomaly_bench.ops.matmul import sqnorm

_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
_U32 = 2.0 ** -24  # unit roundoff of float32
#: Query rows and bank rows of one screened tile (bfloat16 product of 16 MiB): few, large
#: products (with two threads on a loaded machine, 4 MiB tiles took 1.6 times as long).
TILE_ROWS, TILE_COLS = 2048, 4096
#: Candidate pairs whose exact distances are computed at once (bounds temporary memory).
_PAIRS = 8192
#: Stride of the bank sample whose nearest entry gives the first upper bound.
_SEED_STRIDE = 16


#: Set to 1 to take the plain search even on a CPU with AMX (what every other CPU runs).
NO_AMX_ENV = "ANOMALY_BENCH_NO_AMX"


@lru_cache(maxsize=1)
def screen_available() -> bool:
    """True when the CPU multiplies bfloat16 matrices with AMX (see the module docstring)
    and ``ANOMALY_BENCH_NO_AMX`` does not turn the screen off."""
    if os.environ.get(NO_AMX_ENV, "") not in ("", "0"):
        return False
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    except (AttributeError, RuntimeError):  # torch without the capability query
        return False


def _gamma(n: int) -> float:
    """Worst-case relative error of a float32 sum of ``n`` terms (Higham's gamma_n)."""
    return n * _U32 / (1 - n * _U32)


def _parts(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) bfloat16 parts whose sum is ``v`` to 24 bits: each part takes the next 8
    significant bits of what the previous ones left."""
    a = v.to(torch.bfloat16)
    r = v - a.to(v.dtype)
    b = r.to(torch.bfloat16)
    c = (r - b.to(v.dtype)).to(torch.bfloat16)
    return torch.stack([a, b, c], -1)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 ``x_h`` and ``x_l`` with ``|x - x_h - x_l| <= u^2 |x|`` per element."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.to(x.dtype)).to(torch.bfloat16)


def default_dims(d: int) -> int:
    """Principal coordinates kept by the screen for D-dimensional rows (D when <= 192)."""
    return d if d <= 192 else 128


class ScreenedSearch:
    """A bank prepared for :meth:`nearest`: its bfloat16 screening rows, built once.

    ``bank`` (N, D) float32 rows stay referenced (not copied) for the exact checks. The
    screen reads ``dims`` principal coordinates of each centred row plus the norm of the
    rest (default :func:`default_dims`): ``x.y <= p_x.p_y + |r_x| |r_y|`` by
    Cauchy-Schwarz, so the screened value stays below the distance while the product is
    ``3 (dims + 1) + 12`` deep instead of ``3 D + 12``. These coordinates are computed in
    float64 (their own rounding is then far below the bfloat16 budget). The screening rows
    take ``N x (3 dims + 15)`` bfloat16 values.
    """

    def __init__(self, bank: torch.Tensor, *, dims: int | None = None, chunk: int = 8192
                 ) -> None:
        if bank.ndim != 2 or bank.dtype != torch.float32:
            raise ValueError(f"ScreenedSearch expects (N, D) float32; got {tuple(bank.shape)} "
                             f"{bank.dtype}")
        n, d = bank.shape
        self.bank = bank
        self.mean = bank.mean(dim=0)
        m = default_dims(d) if dims is None else min(dims, d)
        self.basis = None if m >= d - 1 else _principal(bank, self.mean, m)  # (D, m) float64
        self.dims = d if self.basis is None else m + 1  # screened coordinates per row
        e = self.dims
        self.k = -(-(3 * e + 12) // 32) * 32  # product depth, padded for the AMX tiles
        # rounding budget per pair, as a multiple of (|x| + |y|)^2 (module docstring):
        # dropped low parts 6.02 u^2 |x||y| <= 1.51 u^2 (|x| + |y|)^2 (the .01: float64 ->
        # bfloat16 goes through float32), three-part norms u^3, the float64 coordinates and
        # norms 1e-9, centring in float32 2 u32, float32 accumulation over the product
        # gamma_K (1 + 3u); then 5% for the bfloat16 rounding of the margin's own
        # coefficients
        need = (1.51 * _U**2 + 2 * _U**3 + 1e-9 + 2.01 * _U32
                + _gamma(self.k) * (1 + 3 * _U)) / (1 - _gamma(self.k))
        self.margin = 1.05 * need
        self._gk = _gamma(self.k)
        self._gd = _gamma(d + 2)
        self.rows = torch.empty(n, self.k, dtype=torch.bfloat16, device=bank.device)
        for r0 in range(0, n, chunk):  # chunks bound the float64 temporaries
            z, ysq = self._coords(bank[r0:r0 + chunk] - self.mean)
            hi, lo = _split(z)
            out = self.rows[r0:r0 + chunk]
            out[:, :e], out[:, e:2 * e], out[:, 2 * e:3 * e] = hi, lo, hi
            out[:, 3 * e:3 * e + 3] = 1  # times the query's |x|^2 parts
            out[:, 3 * e + 3:3 * e + 6] = _parts(ysq)
            out[:, 3 * e + 6] = 1  # margin: -c |x|^2
            out[:, 3 * e + 7] = ysq.sqrt()  # -2c |x| |y|
            out[:, 3 * e + 8] = ysq  # -c |y|^2
            out[:, 3 * e + 9:3 * e + 12] = 1  # times -T
            out[:, 3 * e + 12:] = 0
        every = torch.arange(0, n, _SEED_STRIDE, device=bank.device)
        self._sample = every, bank[every]

    def _coords(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Screened coordinates (R, dims) and squared norms (R,) of centred rows, float64."""
        x64 = x.double()
        sq = sqnorm(x64)
        if self.basis is None:
            return x64, sq
        p = x64 @ self.basis
        rest = (sq - sqnorm(p)).clamp_min_(0).sqrt_()
        return torch.cat([p, rest.unsqueeze(1)], 1), sq

    def _query_rows(self, x: torch.Tensor) -> torch.Tensor:
        e = self.dims
        z, xsq = self._coords(x)
        a = torch.zeros(x.shape[0], self.k, dtype=torch.bfloat16, device=x.device)
        hi, lo = _split(z)
        hi2 = hi * -2  # exact: a power-of-two scaling
        a[:, :e], a[:, e:2 * e], a[:, 2 * e:3 * e] = hi2, hi2, lo * -2
        a[:, 3 * e:3 * e + 3] = _parts(xsq)
        a[:, 3 * e + 3:3 * e + 6] = 1
        a[:, 3 * e + 6] = -self.margin * xsq
        a[:, 3 * e + 7] = -2 * self.margin * xsq.sqrt()
        a[:, 3 * e + 8] = -self.margin
        return a

    def _upper(self, exact: torch.Tensor) -> torch.Tensor:
        """``T``: above the true distance of an entry measured as ``exact`` (float32 sum of
        squares, relative error gamma_{D+2}), with room for the product's accumulation."""
        return exact * (1 + self._gd) / (1 - self._gk)

    def nearest(self, query: torch.Tensor, rows: torch.Tensor | None = None,
                tile_rows: int = TILE_ROWS, tile_cols: int = TILE_COLS
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact squared distance to the nearest bank row and its index, per query row.

        ``rows`` restricts the search to the bank rows listed (a 1-D index tensor, e.g. the
        gallery of one test image); runs of consecutive rows are read in place.
        """
        n, e = self.bank.shape[0], self.dims
        dist = torch.empty(query.shape[0], device=query.device)
        index = torch.empty(query.shape[0], device=query.device, dtype=torch.long)
        spans = _spans(rows, n, tile_cols)
        if rows is None:
            sample, sample_bank = self._sample
        else:
            sample = rows[::_SEED_STRIDE]
            sample_bank = self.bank[sample]
        for r0 in range(0, query.shape[0], tile_rows):
            q = query[r0:r0 + tile_rows]
            best_i = sample[knn(q, sample_bank, 1).indices[:, 0]]
            best_d = (q - self.bank[best_i]).square_().sum(1)
            a = self._query_rows(q - self.mean)
            for s0, s1 in spans:
                a[:, 3 * e + 9:3 * e + 12] = _parts(-self._upper(best_d))
                z = a @ self.rows[s0:s1].T  # (R, C) bfloat16; <= 0: cannot be ruled out
                qi, bi = _nonpositive(z)
                for p0 in range(0, qi.numel(), _PAIRS):
                    pq, pb = qi[p0:p0 + _PAIRS], bi[p0:p0 + _PAIRS] + s0
                    dd = (q[pq] - self.bank[pb]).square_().sum(1)
                    new = best_d.scatter_reduce(0, pq, dd, "amin")
                    # smallest index among the entries at the new minimum (argmin's tie rule)
                    at = dd == new[pq]
                    cand = torch.full_like(best_i, n).scatter_reduce_(0, pq[at], pb[at], "amin")
                    keep = new == best_d
                    best_i = torch.where(keep, torch.minimum(best_i, cand), cand)
                    best_d = new
            dist[r0:r0 + tile_rows], index[r0:r0 + tile_rows] = best_d, best_i
        return dist, index


def _spans(rows: torch.Tensor | None, n: int, width: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) bank ranges covering ``rows`` (all rows when None), each
    at most ``width`` long."""
    if rows is None:
        return [(s, min(n, s + width)) for s in range(0, n, width)]
    r = torch.unique(rows).cpu()  # sorted
    if r.numel() == 0:
        return []
    cut = torch.nonzero(r[1:] != r[:-1] + 1).flatten() + 1
    starts = torch.cat([r[:1], r[cut]]).tolist()
    ends = (torch.cat([r[cut - 1], r[-1:]]) + 1).tolist()
    return [(s, min(e, s + width)) for s0, e in zip(starts, ends, strict=True)
            for s in range(s0, e, width)]


def _nonpositive(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the entries <= 0 of a bfloat16 matrix.

    The test runs on the int16 view (sign bit set or all bits clear <=> value <= 0, -0.0
    included): first each row's minimum (one multithreaded pass; once the bound is tight
    most rows have no entry left), then, on the CPU, ``np.flatnonzero`` over the rows that
    do (``torch.nonzero`` took three times as long on 4 M entries).
    """
    z16 = z.view(torch.int16)
    rows = torch.nonzero(z16.amin(dim=1) <= 0).flatten()
    if rows.numel() == 0:
        return rows, rows
    few = 4 * rows.numel() < z16.shape[0]  # then copying those rows out pays
    sub = z16[rows] if few else z16
    if z.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(sub.numpy() <= 0))
        r, c = flat // z.shape[1], flat % z.shape[1]
    else:
        r, c = (sub <= 0).nonzero(as_tuple=True)
    return (rows[r] if few else r), c


def _principal(bank: torch.Tensor, mean: torch.Tensor, m: int, rows: int = 65536,
               chunk: int = 8192) -> torch.Tensor:
    """(D, m) float64 orthonormal top-m principal directions of (a strided sample of) the
    bank's rows: any orthonormal basis keeps the screen exact, a good one keeps it tight."""
    n, d = bank.shape
    sample = bank[::max(1, n // rows)]
    cov = torch.zeros(d, d, dtype=torch.float64, device=bank.device)
    for r0 in range(0, sample.shape[0], chunk):
        c = (sample[r0:r0 + chunk] - mean).double()
        cov += c.T @ c
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return vecs.flip(1)[:, :m].contiguous()
