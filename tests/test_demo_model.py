"""The embedded demo model: its format, its reproducible palette, and recognisable samples."""
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from igpt_batch import config
from igpt_batch.model import checkpoint, palette
from igpt_batch.model.kmeans import fit_palette
from igpt_batch.model.loading import load_model
from igpt_batch.model.sampling import generate
from igpt_batch.train_demo import N_CLUSTERS, digits_rgb, train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def digit_classifier():
    """An MLP trained on the real digits (grey levels scaled to [0, 1])."""
    rgb, y = digits_rgb()
    X = rgb[..., 0].reshape(len(rgb), -1) / 255.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    held_out = MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0).fit(Xtr, ytr).score(Xte, yte)
    assert held_out >= 0.95  # the judge itself must be good at reading digits
    return MLPClassifier(hidden_layer_sizes=(128,), max_iter=1000, random_state=0).fit(X, y)


def test_demo_samples_are_recognisable(digit_classifier):
    model = load_model("demo", "fp32", "cpu")
    g = config.load(str(DEMO_CONFIG)).generate  # the sampling settings the demo itself uses
    tokens = generate(model, list(range(200)), temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
    grey = palette.detokenize(tokens, model.clusters, model.n_px)[..., 0].reshape(200, -1) / 255.0
    proba = digit_classifier.predict_proba(grey)
    confident = proba.max(axis=1) >= 0.9
    assert confident.mean() >= 0.8, f"only {confident.mean():.0%} of samples are confidently a digit"
    assert len(set(proba.argmax(axis=1)[confident])) >= 8  # many digits, not one memorised mode


def test_demo_checkpoint_is_a_small_safetensors_imagegpt_with_our_palette():
    path = Path(checkpoint.resolve("demo"))
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert sum(p.stat().st_size for p in path.iterdir()) < 5 * 2**20
    info = checkpoint.read_info("demo")
    assert (info.n_px, info.vocab_size) == (8, N_CLUSTERS + 1)
    # the palette is exactly what the project's own k-means gives on the digits (reproducible)
    rgb, _ = digits_rgb()
    np.testing.assert_array_equal(checkpoint.read_clusters(str(path)), fit_palette(rgb.reshape(-1, 3), k=N_CLUSTERS, seed=0))


def test_training_script_produces_a_loadable_checkpoint(tmp_path):
    stats = train(str(tmp_path / "m"), steps=3, n_embd=16, n_layer=1, n_head=2, batch_size=8, log_every=1)
    assert stats["steps"] == 3 and np.isfinite(stats["final_loss"])
    model = load_model(str(tmp_path / "m"), "fp32", "cpu")
    assert model.n_px == 8 and model.n_layer == 1
    assert generate(model, [1, 2], temperature=1.0).shape == (2, 64)
