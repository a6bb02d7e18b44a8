"""igpt_batch.model.extractor: RGB -> tokens -> pooled features, against transformers' ImageGPT as the oracle."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import real_photos, tiny_hf

from igpt_batch.model import palette
from igpt_batch.model.extractor import Extractor, embedding_array
from igpt_batch.model.transformer import IGPT


@pytest.fixture(scope="module")
def model(one_torch_thread):
    hf = tiny_hf(seed=3)  # 8x8 pixels, 16 clusters, 3 layers of 32
    return IGPT(hf, np.random.default_rng(3).uniform(-1, 1, (16, 3)).astype(np.float32)), hf


def photos_rgb(n_px: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(a).resize((n_px, n_px))) for a in real_photos().values()])


def test_features_are_hf_hidden_states_through_ln_1_mean_pooled(model):
    igpt, hf = model
    rgb = photos_rgb(igpt.n_px)
    layers = [2, 1]
    ext = Extractor(igpt, layers, batch_size=3)  # 4 images: two model calls
    stats = {}
    got = ext(rgb, stats)
    ids = torch.from_numpy(palette.tokenize(rgb, igpt.clusters))
    assert np.array_equal(ext.tokens(rgb), ids.numpy())
    with torch.no_grad():
        hidden = hf(torch.cat([torch.full((4, 1), 16), ids[:, :-1]], 1), output_hidden_states=True).hidden_states
    # Chen et al. 2020: the mean over positions of ln_1(h[l]) of block l, layers concatenated in the order given
    want = np.concatenate([hf.transformer.h[l].ln_1(hidden[l]).mean(1).numpy() for l in layers], axis=1)
    assert got.shape == (4, 2 * 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert set(stats) == {"preprocess_s", "model_s"}
    np.testing.assert_array_equal(ext(rgb[:1]), got[:1])  # a batch of one gives the same row


def test_a_batch_size_below_one_is_refused_and_the_lock_is_held_for_model_calls(model):
    igpt, _ = model
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Extractor(igpt, [1], batch_size=0)

    class Lock:
        held = 0

        def __enter__(self):
            self.held += 1

        def __exit__(self, *exc):
            return False

    lock = Lock()
    Extractor(igpt, [1], batch_size=2, lock=lock)(photos_rgb(igpt.n_px))
    assert lock.held == 2  # 4 images, 2 a call


def test_embedding_column_is_a_fixed_size_list_of_float32():
    arr = embedding_array(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert arr.type == pa.list_(pa.float32(), 3) and arr.to_pylist() == [[0, 1, 2], [3, 4, 5]]
