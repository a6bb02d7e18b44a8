"""igpt_batch.model.kmeans: the k-means palette fit is deterministic, beats random palettes, and never yields NaN."""
import numpy as np
import pytest
from skimage import data

from igpt_batch.model import palette
from igpt_batch.model.kmeans import fit_palette


def mean_sq_error(rgb: np.ndarray, clusters: np.ndarray) -> float:
    """Mean float64 squared distance of each pixel to its nearest cluster, by brute force."""
    x = palette.normalize(rgb.reshape(-1, 3)).astype(np.float64)
    d = ((x[:, None, :] - clusters.astype(np.float64)[None, :, :]) ** 2).sum(-1)  # (N, K)
    return float(d.min(axis=1).mean())


def test_fit_palette_deterministic_and_better_than_random():
    pixels = data.astronaut()  # (512, 512, 3) accepted as (..., 3)
    a = fit_palette(pixels, 16, seed=3, iters=20, sample=20_000)
    b = fit_palette(pixels, 16, seed=3, iters=20, sample=20_000)
    assert a.dtype == np.float32 and a.shape == (16, 3)
    assert np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1) and np.isfinite(a).all()
    lum = a @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.all(np.diff(lum) >= -1e-6)  # sorted by luminance
    rand = [mean_sq_error(pixels[::8, ::8], np.random.default_rng(s).uniform(-1, 1, (16, 3))) for s in range(3)]
    assert mean_sq_error(pixels[::8, ::8], a) < 0.5 * min(rand)


def test_fit_palette_few_colours():
    three = np.array([[255, 0, 0], [0, 0, 255], [10, 200, 10]], np.uint8)
    pixels = three[np.random.default_rng(0).integers(0, 3, 500)]
    c = fit_palette(pixels, 8, seed=1)
    assert c.shape == (8, 3) and np.isfinite(c).all()
    # every real colour is a centre exactly, so quantisation is lossless
    img = pixels.reshape(20, 25, 3)
    assert np.array_equal(palette.detokenize(palette.tokenize(img[:20, :20], c), c, 20), img[:20, :20])
    # fewer pixels than k, and a single colour
    assert fit_palette(three[:2], 5).shape == (5, 3)
    one = fit_palette(np.full((10, 3), 7, np.uint8), 4)
    assert np.isfinite(one).all() and np.allclose(one, palette.normalize(np.full(3, 7, np.uint8)))
    with pytest.raises(ValueError):
        fit_palette(np.zeros((0, 3), np.uint8), 4)
