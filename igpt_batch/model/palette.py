"""Colour palette: nearest-cluster tokenisation (bit-exact with HF), tokens -> RGB -> PNG, palette hash."""

from __future__ import annotations

import hashlib
import io

import numpy as np

# Work on at most this many distance-matrix entries at a time (rows x clusters), so memory stays
# bounded (~16 MB per float32 temporary) whatever the number of colours.
_CHUNK_ELEMS = 1 << 22


def _normalize_lut() -> np.ndarray:
    # HF: rescale does float64(x) * (1/255) then casts to float32; normalize then does
    # (x - 0.5) / 0.5 in float32. Reproduce both steps for every possible uint8 value.
    v = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (v - half) / half


_NORM_LUT = _normalize_lut()  # float32 (256,)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 in [-1, 1], bit-identical to ImageGPTImageProcessor's rescale + normalize."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 RGB, got {rgb.dtype}")
    return _NORM_LUT[rgb]


def _check_clusters(clusters) -> np.ndarray:
    # Keep the caller's dtype: HF computes in whatever dtype np.array(clusters) has
    # (float32 clusters -> float32 distances, float64 -> float64), and ties depend on it.
    c = np.asarray(clusters)
    if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 1:
        raise ValueError(f"clusters must have shape (K, 3), got {c.shape}")
    return c


def unique_colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> (unique colours uint8 (U, 3), inverse (N,) index of each pixel's colour)."""
    flat = rgb.reshape(-1, 3).astype(np.uint32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]  # (N,) 24-bit colour
    uniq, inverse = np.unique(packed, return_inverse=True)
    colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1).astype(np.uint8)
    return colours, inverse.reshape(-1)


def row_chunks(n: int, k: int):
    """Row ranges of an (n, k) distance matrix that keep each chunk near _CHUNK_ELEMS entries,
    never a 1-row range when n >= 2.

    A single-row matmul goes through BLAS gemv, which rounds differently from the gemm HF's
    whole-image matmul uses, so a lone row could flip a near-tie.
    """
    rows = max(2, _CHUNK_ELEMS // k)
    start = 0
    while start < n:
        stop = min(n, start + rows)
        if n - stop == 1:
            stop = n
        yield start, stop
        start = stop


def _nearest(x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """float32 (U, 3) normalised colours -> int64 (U,) nearest cluster, with HF's exact formula.

    HF (image_processing_pil_imagegpt.squared_euclidean_distance):
        b = clusters.T; a2 = sum(a^2, axis=1); b2 = sum(b^2, axis=0)
        d = a2[:, None] - 2 * (a @ b) + b2[None, :];  argmin(d, axis=1)
    Each entry of d depends only on its own row and cluster, so evaluating it on unique colours
    in row chunks gives the same bits as HF evaluating it on every pixel at once.
    """
    if len(x) == 1:  # avoid the gemv path (see row_chunks)
        return _nearest(np.repeat(x, 2, axis=0), clusters)[:1]
    b = clusters.T  # (3, K) view, as in HF (BLAS sees the same transposed layout)
    b2 = np.sum(np.square(b), axis=0)  # (K,)
    out = np.empty(len(x), dtype=np.int64)
    for start, stop in row_chunks(len(x), clusters.shape[0]):
        a = x[start:stop]
        a2 = np.sum(np.square(a), axis=1)
        ab = np.matmul(a, b)
        d = a2[:, None] - 2 * ab + b2[None, :]  # (rows, K)
        out[start:stop] = np.argmin(d, axis=1)
    return out


def _margin(clusters: np.ndarray) -> float:
    """A bound, with wide headroom, on float32 rounding in HF's d = |x|^2 - 2 x.c + |c|^2 (|x_i| <= 1):
    64 ulps of the largest term. Real rounding differences are a few ulps."""
    c2 = float(np.max(np.sum(np.square(clusters.astype(np.float64)), axis=1)))
    return 64 * float(np.finfo(np.float32).eps) * (3.0 + 2.0 * (3.0 * c2) ** 0.5 + c2)


def _nearest_fast(x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Same result as _nearest, found with a k-d tree (O(log K) per colour instead of O(K)).

    The tree gives the two nearest clusters in float64; where the squared-distance gap between
    them exceeds HF's float32 rounding bound, HF's argmin must pick the same cluster. Near-ties
    (rare) are re-decided by the exact formula, so the result stays bit-identical to HF.
    """
    if clusters.shape[0] < 2 or len(x) < 64:
        return _nearest(x, clusters)
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(clusters.astype(np.float64)).query(x.astype(np.float64), k=2)  # (U, 2) ascending
    ids = idx[:, 0].astype(np.int64)
    close = np.square(dist[:, 1]) - np.square(dist[:, 0]) <= _margin(clusters)
    if close.any():
        ids[close] = _nearest(x[close], clusters)
    return ids


def _as_batch(rgb) -> tuple[np.ndarray, bool]:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) or (B, H, W, 3), got {rgb.dtype} {rgb.shape}")
    return (rgb[None], True) if rgb.ndim == 3 else (rgb, False)


def tokenize(rgb: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> int64 (B, H*W) nearest-cluster ids ((H, W, 3) -> (H*W,)).

    Equals ImageGPTImageProcessor's input_ids bit for bit for the same clusters (already-resized
    input). The answer depends only on the RGB triple, so distances are computed once per
    unique colour (a 32x32 photo has ~1000 pixels but often far fewer colours).
    """
    batch, single = _as_batch(rgb)
    clusters = _check_clusters(clusters)
    colours, inverse = unique_colours(batch)
    ids = _nearest_fast(normalize(colours), clusters)  # (U,)
    tokens = ids[inverse].reshape(batch.shape[0], -1)
    return tokens[0] if single else tokens


def tokenize_torch(rgb: np.ndarray, clusters: np.ndarray, device=None) -> np.ndarray:
    """Same result as tokenize(), with the distance matrix computed by torch on `device` (default: GPU if any).

    Device arithmetic (no FMA, other summation order) can round differently from numpy's BLAS,
    so only clear winners are taken from the device; colours whose best and second-best
    distances are within a few float32 ulps are re-decided by the exact numpy path.
    """
    import torch  # lazy: this module must stay importable without torch

    batch, single = _as_batch(rgb)
    clusters = _check_clusters(clusters)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    colours, inverse = unique_colours(batch)
    x = normalize(colours)  # float32 (U, 3)
    k = clusters.shape[0]
    if k == 1:
        ids = np.zeros(len(x), dtype=np.int64)
    else:
        xt = torch.from_numpy(x).to(device)
        ct = torch.from_numpy(np.ascontiguousarray(clusters, dtype=np.float32)).to(device)
        c2 = (ct * ct).sum(dim=1)  # (K,)
        margin = _margin(clusters)
        ids = np.empty(len(x), dtype=np.int64)
        gaps = np.empty(len(x), dtype=np.float32)  # (U,) second-best minus best distance
        for start, stop in row_chunks(len(x), k):
            a = xt[start:stop]
            # Elementwise dot product rather than matmul: no TF32 on GPUs, plain float32 everywhere.
            ab = (a[:, None, :] * ct[None, :, :]).sum(dim=2)  # (rows, K)
            d = (a * a).sum(dim=1)[:, None] - 2 * ab + c2[None, :]
            top = torch.topk(d, 2, dim=1, largest=False)  # sorted ascending
            ids[start:stop] = top.indices[:, 0].cpu().numpy()
            gaps[start:stop] = (top.values[:, 1] - top.values[:, 0]).cpu().numpy()
        close = gaps <= margin
        if close.any():  # near-ties: let the exact numpy formula decide
            ids[close] = _nearest(x[close], clusters)
    tokens = ids[inverse].reshape(batch.shape[0], -1)
    return tokens[0] if single else tokens


def cluster_colours(clusters: np.ndarray) -> np.ndarray:
    """float (K, 3) in [-1, 1] -> uint8 (K, 3) display colours: round((c + 1) * 127.5), clipped."""
    c = _check_clusters(clusters).astype(np.float64)
    return np.clip(np.rint((c + 1.0) * 127.5), 0, 255).astype(np.uint8)


def detokenize(tokens: np.ndarray, clusters: np.ndarray, n_px: int) -> np.ndarray:
    """int (B, n_px*n_px) -> uint8 (B, n_px, n_px, 3); a 1-D (n_px*n_px,) input gives (n_px, n_px, 3)."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    single = tokens.ndim == 1
    batch = tokens[None] if single else tokens
    if batch.ndim != 2 or batch.shape[1] != n_px * n_px:
        raise ValueError(f"tokens must have shape (B, {n_px * n_px}), got {tokens.shape}")
    colours = cluster_colours(clusters)  # (K, 3)
    if batch.size and (batch.min() < 0 or batch.max() >= len(colours)):
        raise ValueError(f"token ids must be in [0, {len(colours)}) (SOS is not a colour)")
    out = colours[batch].reshape(batch.shape[0], n_px, n_px, 3)
    return out[0] if single else out


def to_png(rgb: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"to_png expects uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def palette_hash(clusters: np.ndarray) -> str:
    """First 16 hex chars of sha256 over the clusters as float32 little-endian bytes."""
    c = np.ascontiguousarray(np.asarray(clusters), dtype="<f4")
    return hashlib.sha256(c.tobytes()).hexdigest()[:16]
