"""Tests for igpt_batch.palette against the real HF ImageGPT processor and brute force."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage import data

from igpt_batch import images, palette

N_PX = 32


def _processor(clusters, n_px=N_PX, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision ... falling back to the PIL backend"
        from transformers import ImageGPTImageProcessor

        return ImageGPTImageProcessor(clusters=clusters, size={"height": n_px, "width": n_px}, **kw)


def _hf_ids(clusters, batch):
    return _processor(clusters)(images=list(batch), return_tensors="np")["input_ids"]


@pytest.fixture(scope="module")
def photos():
    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


@pytest.fixture(scope="module")
def small(photos):
    # (4, 32, 32, 3) uint8, resized the way the pipeline does
    return np.stack([images.resize(Image.fromarray(p), N_PX) for p in photos])


def _brute_dist(rgb, clusters):
    """float64 squared distance of every pixel to every cluster: (N, K)."""
    x = palette.normalize(rgb.reshape(-1, 3)).astype(np.float64)
    c = clusters.astype(np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


# ----------------------------------------------------------------------------- tokenize vs HF


def test_normalize_matches_processor_pixel_values(small):
    pv = _processor(np.zeros((2, 3), np.float32), do_color_quantize=False)(images=list(small), return_tensors="np")
    pv = pv["pixel_values"].transpose(0, 2, 3, 1)  # HF is channels-first
    got = palette.normalize(small)
    assert got.dtype == np.float32 and np.array_equal(got, pv)
    assert palette.normalize(np.array([0, 255], np.uint8)).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("k", [16, 512])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokenize_equals_processor_random_clusters(small, k, seed):
    clusters = np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)
    ids = palette.tokenize(small, clusters)
    assert ids.dtype == np.int64 and ids.shape == (4, N_PX * N_PX)
    assert np.array_equal(ids, _hf_ids(clusters, small))


def test_tokenize_equals_processor_tie_heavy_clusters(small):
    # Centres exactly on pixel values, plus duplicated centres (exact ties -> first index wins).
    rng = np.random.default_rng(7)
    base = palette.normalize(rng.integers(0, 256, (100, 3), dtype=np.uint8))
    clusters = np.concatenate([base, base[:40], palette.normalize(small[0, :8, :8].reshape(-1, 3))])
    assert np.array_equal(palette.tokenize(small, clusters), _hf_ids(clusters, small))
    # float64 clusters: HF computes in float64 then, and so must we.
    c64 = np.random.default_rng(3).uniform(-1, 1, (64, 3))
    assert np.array_equal(palette.tokenize(small, c64), _hf_ids(c64, small))


def test_tokenize_equals_processor_on_full_size_photos(photos, small):
    # HF resizing the full photo itself == our resize then tokenize.
    clusters = np.random.default_rng(11).uniform(-1, 1, (512, 3)).astype(np.float32)
    ref = _processor(clusters)(images=photos, return_tensors="np")["input_ids"]
    assert np.array_equal(palette.tokenize(small, clusters), ref)


def test_tokenize_equals_processor_fitted_palette(photos, small):
    pixels = np.concatenate([p.reshape(-1, 3) for p in photos])
    clusters = palette.fit_palette(pixels, 64, seed=0, iters=15, sample=20_000)
    assert np.array_equal(palette.tokenize(small, clusters), _hf_ids(clusters, small))


def test_tokenize_chunking_and_shapes(small, monkeypatch):
    clusters = np.random.default_rng(5).uniform(-1, 1, (512, 3)).astype(np.float32)
    whole = palette.tokenize(small, clusters)
    # Tiny chunks (a few rows each, with odd remainders) must not change a single id.
    monkeypatch.setattr(palette, "_CHUNK_ELEMS", 512 * 3)
    assert np.array_equal(palette.tokenize(small, clusters), whole)
    # (H, W, 3) -> (H*W,)
    assert np.array_equal(palette.tokenize(small[1], clusters), whole[1])
    # a single-colour image (one unique colour) still agrees with HF
    flat = np.full((1, 8, 8, 3), 93, np.uint8)
    assert np.array_equal(palette.tokenize(flat, clusters[:3]), _processor(clusters[:3], 8)(images=list(flat),
                                                                                               return_tensors="np")["input_ids"])
    with pytest.raises(ValueError):
        palette.tokenize(small.astype(np.float32), clusters)
    with pytest.raises(ValueError):
        palette.tokenize(small, clusters[:, :2])


def test_tokenize_torch_equals_tokenize(small):
    for seed, k in [(0, 512), (1, 16)]:
        clusters = np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32)
        assert np.array_equal(palette.tokenize_torch(small, clusters, "cpu"), palette.tokenize(small, clusters))
    # ties and duplicates are re-decided by the exact path
    base = palette.normalize(small[2, ::4, ::4].reshape(-1, 3))
    clusters = np.concatenate([base, base])
    assert np.array_equal(palette.tokenize_torch(small, clusters, "cpu"), palette.tokenize(small, clusters))
    assert np.array_equal(palette.tokenize_torch(small[0], clusters[:1], "cpu"), np.zeros(N_PX * N_PX))


# ----------------------------------------------------------------------------- detokenize / png / hash


def test_detokenize_maps_each_pixel_to_nearest_centre(small):
    clusters = np.random.default_rng(4).uniform(-1, 1, (16, 3)).astype(np.float32)
    img = small[0, :12, :12]  # (12, 12, 3)
    tokens = palette.tokenize(img, clusters)
    d = _brute_dist(img, clusters)  # (144, 16)
    chosen = d[np.arange(len(d)), tokens]
    assert np.all(chosen <= d.min(axis=1) + 1e-6)
    colours = np.clip(np.rint((clusters.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    out = palette.detokenize(tokens, clusters, 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    assert np.array_equal(out.reshape(-1, 3), colours[d.argmin(axis=1)])
    batch = palette.detokenize(np.stack([tokens, tokens]), clusters, 12)
    assert batch.shape == (2, 12, 12, 3) and np.array_equal(batch[1], out)


def test_detokenize_exact_for_centres_on_pixel_values():
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (20, 3), dtype=np.uint8)
    colours[0], colours[1] = 0, 255
    clusters = palette.normalize(colours)
    img = colours[rng.integers(0, 20, (16, 16))]  # (16, 16, 3) drawn only from the palette
    assert np.array_equal(palette.detokenize(palette.tokenize(img, clusters), clusters, 16), img)
    assert np.array_equal(palette.cluster_colours(clusters), colours)


def test_detokenize_rejects_bad_tokens():
    clusters = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError):
        palette.detokenize(np.full(16, 4), clusters, 4)  # SOS / out of range
    with pytest.raises(ValueError):
        palette.detokenize(np.zeros(15, np.int64), clusters, 4)


def test_to_png_round_trip(small):
    png = palette.to_png(small[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), small[0])


def test_palette_hash():
    c = np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype(np.float32)
    h = palette.palette_hash(c)
    assert len(h) == 16 and int(h, 16) >= 0
    assert palette.palette_hash(c.astype(np.float64)) == h
    assert palette.palette_hash(c.copy()) == h
    c2 = c.copy()
    c2[3, 1] = np.nextafter(c2[3, 1], 2)
    assert palette.palette_hash(c2) != h


# ----------------------------------------------------------------------------- k-means


def test_fit_palette_deterministic_and_better_than_random(photos):
    pixels = photos[0]  # (512, 512, 3) accepted as (..., 3)
    a = palette.fit_palette(pixels, 16, seed=3, iters=20, sample=20_000)
    b = palette.fit_palette(pixels, 16, seed=3, iters=20, sample=20_000)
    assert a.dtype == np.float32 and a.shape == (16, 3)
    assert np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1) and np.isfinite(a).all()
    lum = a @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.all(np.diff(lum) >= -1e-6)  # sorted by luminance

    def err(c):
        return _brute_dist(pixels[::8, ::8], c).min(axis=1).mean()

    rand = [err(np.random.default_rng(s).uniform(-1, 1, (16, 3))) for s in range(3)]
    assert err(a) < 0.5 * min(rand)


def test_fit_palette_few_colours():
    three = np.array([[255, 0, 0], [0, 0, 255], [10, 200, 10]], np.uint8)
    pixels = three[np.random.default_rng(0).integers(0, 3, 500)]
    c = palette.fit_palette(pixels, 8, seed=1)
    assert c.shape == (8, 3) and np.isfinite(c).all()
    # every real colour is a centre exactly, so quantisation is lossless
    img = pixels.reshape(20, 25, 3)
    assert np.array_equal(palette.detokenize(palette.tokenize(img[:20, :20], c), c, 20), img[:20, :20])
    # fewer pixels than k, and a single colour
    assert palette.fit_palette(three[:2], 5).shape == (5, 3)
    one = palette.fit_palette(np.full((10, 3), 7, np.uint8), 4)
    assert np.isfinite(one).all() and np.allclose(one, palette.normalize(np.full(3, 7, np.uint8)))
    with pytest.raises(ValueError):
        palette.fit_palette(np.zeros((0, 3), np.uint8), 4)


# ----------------------------------------------------------------------------- grid


def test_grid_shape_and_crisp_blocks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)  # smaller: padded into the max cell
    scale, pad = 3, 2
    g = palette.grid([a, b, a], ncols=2, scale=scale, pad=pad)
    cell_h, cell_w = 4 * scale, 5 * scale
    assert g.dtype == np.uint8
    assert g.shape == (2 * cell_h + 3 * pad, 2 * cell_w + 3 * pad, 3)
    # each source pixel is a scale x scale block
    block = g[pad : pad + 4 * scale, pad : pad + 5 * scale]
    assert np.array_equal(block, np.kron(a, np.ones((scale, scale, 1), np.uint8)))
    assert np.array_equal(block[::scale, ::scale], a)
    # second image top-left of its cell, the rest of the cell white
    x0 = pad + cell_w + pad
    assert np.array_equal(g[pad : pad + 3 * scale : scale, x0 : x0 + 2 * scale : scale], b)
    assert (g[pad + 3 * scale : pad + cell_h, x0 : x0 + cell_w] == 255).all()
    # padding rows/columns are white, and the empty 4th cell too
    assert (g[:pad] == 255).all() and (g[:, :pad] == 255).all()
    assert (g[pad + cell_h + pad :, x0:] == 255).all()
    # ncols larger than the number of images is capped
    assert palette.grid([a], ncols=8, scale=1, pad=0).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        palette.grid([], ncols=2)
