"""k-means palette fitting (weighted k-means++ then Lloyd, numpy only): how train_demo picks the demo model's colours."""
from __future__ import annotations

import numpy as np

from igpt_batch.model.palette import normalize, row_chunks, unique_colours


def _assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """float32 (U, 3), (k, 3) -> int64 (U,) index of the nearest centre, in row chunks.

    |x|^2 is the same for every centre of a row, so argmin only needs |c|^2 - 2 x.c;
    float32 is plenty for fitting and halves the memory traffic.
    """
    labels = np.empty(len(x), dtype=np.int64)
    c2 = np.sum(centres**2, axis=1)  # (k,)
    for start, stop in row_chunks(len(x), len(centres)):
        d = x[start:stop] @ centres.T  # (rows, k)
        d *= -2
        d += c2
        labels[start:stop] = np.argmin(d, axis=1)
    return labels


def _pick(weights: np.ndarray, rng: np.random.Generator) -> int:
    # Sample an index with probability proportional to weights (cumsum is robust to tiny totals).
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _kmeans_pp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means++ seeding over unique colours x (U, 3) with pixel counts w (U,)."""
    centres = np.empty((k, 3), dtype=np.float64)
    centres[0] = x[_pick(w, rng)]
    d2 = np.sum((x - centres[0]) ** 2, axis=1)  # (U,) distance to the closest centre so far
    for i in range(1, k):
        p = w * d2
        # Every colour already is a centre (fewer unique colours than k): duplicate one by weight.
        centres[i] = x[_pick(p if p.sum() > 0 else w, rng)]
        d2 = np.minimum(d2, np.sum((x - centres[i]) ** 2, axis=1))
    return centres


def fit_palette(pixels: np.ndarray, k: int, seed: int = 0, iters: int = 50, sample: int = 200_000) -> np.ndarray:
    """k-means palette of uint8 pixels (N, 3) or (..., 3) -> float32 (k, 3) in [-1, 1], sorted by luminance.

    k-means++ seeding then Lloyd iterations, numpy only, deterministic for a seed. At most `sample`
    pixels are used; they are collapsed to unique colours weighted by count (same objective, less
    work). Fewer unique colours than k gives duplicated centres, never NaN.
    """
    px = np.asarray(pixels)
    if px.dtype != np.uint8 or px.shape[-1] != 3:
        raise ValueError(f"fit_palette expects uint8 (..., 3) pixels, got {px.dtype} {px.shape}")
    if k < 1:
        raise ValueError("k must be >= 1")
    px = px.reshape(-1, 3)
    if len(px) == 0:
        raise ValueError("fit_palette needs at least one pixel")
    rng = np.random.default_rng(seed)
    if len(px) > sample:
        px = px[np.sort(rng.choice(len(px), size=sample, replace=False))]
    colours, inverse = unique_colours(px)
    w = np.bincount(inverse, minlength=len(colours)).astype(np.float64)  # (U,) pixel counts
    x = normalize(colours).astype(np.float64)  # (U, 3)

    centres = _kmeans_pp(x, w, k, rng)
    x32 = x.astype(np.float32)
    for _ in range(iters):
        labels = _assign(x32, centres.astype(np.float32))
        count = np.bincount(labels, weights=w, minlength=k)  # (k,)
        sums = np.stack([np.bincount(labels, weights=w * x[:, j], minlength=k) for j in range(3)], axis=1)
        new = centres.copy()  # empty clusters keep their centre
        filled = count > 0
        new[filled] = sums[filled] / count[filled, None]
        shift = np.max(np.abs(new - centres))
        centres = new
        if shift < 1e-7:
            break

    out = np.clip(centres, -1.0, 1.0).astype(np.float32)
    lum = 0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]
    order = np.lexsort((out[:, 2], out[:, 1], out[:, 0], lum))  # luminance, then R, G, B for ties
    return out[order]
