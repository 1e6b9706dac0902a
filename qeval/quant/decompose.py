"""GEAR's decomposition as pure functions: X ~ Q + S + L, a quantized backbone Q, exact sparse
outliers S and a low-rank fit L of the remaining error (Kang et al., arXiv 2403.05527).

Both of GEAR's backends (:mod:`qeval.methods.gear`, :mod:`qeval.methods.gear_packed`) call
:func:`gear_decompose`, so they keep the same outliers and factors. The backbone is passed in as
``quantizer(x, exclude) -> x_hat``; the outliers are kept out of its min/max (the paper's rule,
:func:`outlier_mask`). :func:`reference_outliers` is the authors' code's rule instead, which counts
and places outliers differently and hands the quantizer the row's mean in their place.
"""

from __future__ import annotations

import functools

import torch


def levels(bits: int) -> int:
    """Quantization levels (largest code) GEAR uses: ``2**bits - 1`` at every width."""
    return 2**bits - 1


def outliers_per_side(ratio: float, n: int, d: int) -> int:
    """Outliers kept at each end (top, bottom) per (row, head) of an (n, D) block."""
    return int(ratio / 2 * n * d)


def outlier_mask(x: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """(B, H, n, D) -> bool mask of the top and bottom ``ratio / 2`` entries per (row, head)."""
    b, h, n, d = x.shape
    k = outliers_per_side(ratio, n, d)
    if k == 0:
        return None
    flat = x.float().reshape(b, h, n * d)                       # (B, H, n, D) -> (B, H, n * D)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(-1, flat.topk(k, dim=-1).indices, True)
    mask.scatter_(-1, flat.topk(k, dim=-1, largest=False).indices, True)
    return mask.reshape(b, h, n, d)


def reference_outliers_per_side(ratio: float, h: int, n: int, d: int) -> int:
    """Outliers kept at each end of a row under the reference code's count, for one sequence's
    (H, n, D) block: ``int(int(H n D s) / n / 2)``, about s H D / 2 whatever the block's length
    (GEAR ``compress_function.py`` lines 264-267 and 300-303 with batch 1; per sequence here, so
    a sequence gets the same count alone or in a batch)."""
    return int(int(h * n * d * ratio) / n / 2)


def reference_outliers(x: torch.Tensor, ratio: float, which: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The reference code's outlier rule (GEAR ``gears_channelQ`` / ``gears_tokenQ``) on a block
    X (B, H, n, D) of keys (``which="k"``) or values (``"v"``) -> (outlier mask, what the
    quantizer sees, fp32).

    Rows: a key channel (head, d) over the block's n tokens; a value token over all heads' H*D
    entries. Each row keeps its top and bottom :func:`reference_outliers_per_side` entries, capped
    at the row's length (where the reference's ``topk`` would fail, every entry is kept). The
    quantizer sees the outliers replaced by their row's mean (taken before the replacement, so the
    outliers are in it) and quantizes with nothing excluded: the mean enters min/max."""
    b, h, n, d = x.shape
    k = min(reference_outliers_per_side(ratio, h, n, d), n if which == "k" else h * d)
    if k == 0:
        return None, x
    if which == "k":
        rows = x.float().transpose(-1, -2).contiguous()                # (B, H, n, D) -> (B, H, D, n)
    else:
        rows = x.float().transpose(1, 2).reshape(b, n, h * d)          # (B, H, n, D) -> (B, n, H * D)
    idx = torch.cat([rows.topk(k, dim=-1, largest=False).indices, rows.topk(k, dim=-1).indices], dim=-1)
    mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, idx, True)
    seen = torch.where(mask, rows.mean(dim=-1, keepdim=True), rows)
    if which == "k":
        return mask.transpose(-1, -2), seen.transpose(-1, -2)          # (B, H, D, n) -> (B, H, n, D)
    # (B, n, H * D) -> (B, H, n, D)
    return (mask.reshape(b, n, h, d).transpose(1, 2), seen.reshape(b, n, h, d).transpose(1, 2))


@functools.lru_cache(maxsize=64)
def _start_vectors(d: int, rank: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The power iteration's random start, drawn on the CPU (the same numbers on every device) and
    moved once per shape: a copy from pageable memory per call would stall every GEAR block
    compressed during decoding until the GPU drained its queue."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d, rank, generator=g).to(device, dtype)


def low_rank_factors(e: torch.Tensor, rank: int, iterations: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n, D) -> U (..., n, r) orthonormal and W = U^T E (..., r, D) by block power iteration."""
    v = _start_vectors(e.shape[-1], rank, seed, e.device, e.dtype)  # (D, r), shared by all rows/heads
    u = torch.linalg.qr(e @ v).Q                                    # (..., n, r)
    for _ in range(iterations - 1):
        u = torch.linalg.qr(e @ (e.transpose(-1, -2) @ u)).Q
    return u, u.transpose(-1, -2) @ e


def low_rank(e: torch.Tensor, rank: int, iterations: int, seed: int = 0) -> torch.Tensor:
    """Rank-``rank`` approximation U U^T E of (..., n, D) by block power iteration."""
    u, w = low_rank_factors(e, rank, iterations, seed)
    return u @ w


def gear_decompose(x: torch.Tensor, quantizer, outlier_ratio: float, rank: int, iterations: int,
                   outliers=None):
    """X (B, H, n, D) -> (Q, mask, U, W): the backbone ``Q = quantizer(x, mask)`` in X's dtype, the
    outlier mask (None without outliers) and the low-rank factors in fp32 (None at rank 0) of the
    error E = X - Q - S left once the outliers S are exact. The one decomposition both backends use.

    ``outliers``: None for the paper's rule (:func:`outlier_mask`, kept out of min/max), or
    ``x -> (mask, what the quantizer sees)`` for a rule that substitutes its outliers instead
    (:func:`reference_outliers`); the quantizer then excludes nothing."""
    if outliers is None:
        mask = outlier_mask(x, outlier_ratio) if outlier_ratio > 0 else None
        q = quantizer(x, mask)
    else:
        mask, seen = outliers(x)
        q = quantizer(seen, None).to(x.dtype)
    rank = min(rank, *x.shape[-2:])
    if rank == 0:
        return q, mask, None, None
    xf = x.float()
    qs = q.float() if mask is None else torch.where(mask, xf, q.float())
    return (q, mask, *low_rank_factors(xf - qs, rank, iterations))


def gear_compress(x: torch.Tensor, bits: int, quantizer, outlier_ratio: float, rank: int,
                  iterations: int, outliers=None) -> tuple[torch.Tensor, int, int]:
    """X -> (Q + S + L in X's dtype, number of outliers, rank used). ``quantizer(x, exclude)``
    is the backbone; with no outliers and rank 0 the result is exactly the backbone's.
    ``outliers``: the rule, as :func:`gear_decompose` takes it (None: the paper's)."""
    q, mask, u, w = gear_decompose(x, quantizer, outlier_ratio, rank, iterations, outliers)
    if mask is None and u is None:
        return q, 0, 0
    y = q.float() if mask is None else torch.where(mask, x.float(), q.float())
    if u is not None:
        y = y + u @ w
    return y.to(x.dtype), 0 if mask is None else int(mask.sum()), 0 if u is None else u.shape[-1]
