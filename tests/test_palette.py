"""Tests for igpt_batch.model.palette against the real HF ImageGPT processor and brute force."""

import hashlib
import io
import re
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage import data

from igpt_batch.inputs import images
from igpt_batch.model import checkpoint, palette
from igpt_batch.model.kmeans import fit_palette

N_PX = 32
DEMO_PALETTE_HASH = "290da7a411e21d41"  # palette_hash of the committed demo model's clusters


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
    clusters = fit_palette(pixels, 64, seed=0, iters=15, sample=20_000)
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
    # the documented recipe: sha256 of the float32 little-endian bytes, first 16 hex digits
    assert h == hashlib.sha256(c.astype("<f4").tobytes()).hexdigest()[:16]
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    # stable across calls, copies, dtypes, byte order and memory layout
    assert palette.palette_hash(c) == h and palette.palette_hash(c.copy()) == h
    assert palette.palette_hash(c.astype(np.float64)) == h and palette.palette_hash(c.astype(">f4")) == h
    assert palette.palette_hash(np.asfortranarray(c)) == h and palette.palette_hash(c.tolist()) == h
    # any change to one cluster changes it: by 1e-4, or by one float32 ulp
    for delta in (1e-4, np.nextafter(c[3, 1], np.float32(2)) - c[3, 1]):
        c2 = c.copy()
        c2[3, 1] += delta
        assert palette.palette_hash(c2) != h
    # so does the order of the clusters (token ids would change meaning)
    assert palette.palette_hash(c[::-1]) != h
    # pinned: stored outputs and refresh-store versions are keyed by this value, so it must never drift
    assert palette.palette_hash(np.zeros((2, 3), np.float32)) == hashlib.sha256(bytes(24)).hexdigest()[:16]
    assert palette.palette_hash(checkpoint.read_clusters(checkpoint.resolve("demo"))) == DEMO_PALETTE_HASH


def test_row_chunks_cover_rows_without_lone_rows(monkeypatch):
    monkeypatch.setattr(palette, "_CHUNK_ELEMS", 30)
    assert list(palette.row_chunks(7, 10)) == [(0, 3), (3, 7)]  # (6, 7) would be a lone row: merged
    assert list(palette.row_chunks(6, 10)) == [(0, 3), (3, 6)]
    assert list(palette.row_chunks(5, 100)) == [(0, 2), (2, 5)]  # at least 2 rows per chunk
    assert list(palette.row_chunks(1, 10)) == [(0, 1)] and list(palette.row_chunks(0, 10)) == []
