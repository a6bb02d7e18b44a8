"""Likelihood scores: nll_bits against transformers' ImageGPT logits, one pass, the extract column, outliers."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_hf, write_manifest

from igpt_batch import config
from igpt_batch.model.extractor import Extractor
from igpt_batch.model.transformer import IGPT
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output


def oracle_nll_bits(hf, tokens: torch.Tensor) -> np.ndarray:
    """transformers: logits of SOS + the first P-1 tokens (vocab_size-1 colours), mean -log2 p(token_t)."""
    sos = torch.full_like(tokens[:, :1], hf.config.vocab_size - 1)
    with torch.no_grad():
        logits = hf(input_ids=torch.cat([sos, tokens[:, :-1]], dim=1)).logits.double()  # (B, P, V-1)
    assert logits.shape[-1] == hf.config.vocab_size - 1
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, :, None]).squeeze(-1)
    return (-logp.mean(dim=1) / math.log(2)).numpy()


@pytest.mark.parametrize("seed,inverse_layer_idx", [(0, False), (1, True)])
def test_nll_bits_equal_transformers_logits(one_torch_thread, seed, inverse_layer_idx):
    hf = tiny_hf(seed=seed, scale_attn_by_inverse_layer_idx=inverse_layer_idx)
    clusters = np.random.default_rng(seed).uniform(-1, 1, (16, 3)).astype(np.float32)
    model = IGPT(hf, clusters)
    tokens = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(seed))
    want = oracle_nll_bits(hf, tokens)
    feats, got = model.features_and_scores(tokens, [1, 3])
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert np.ptp(want) > 0.01  # the images differ: a constant would not pass by luck
    np.testing.assert_array_equal(feats.numpy(), model.features(tokens, [1, 3]).numpy())
    # the head in chunks of any size gives the same scores
    _, again = model.features_and_scores(tokens, [2])
    np.testing.assert_allclose(again.numpy(), want, rtol=1e-5)


def test_scoring_with_features_is_one_full_depth_pass(one_torch_thread):
    hf = tiny_hf(seed=2)
    model = IGPT(hf, np.random.default_rng(2).uniform(-1, 1, (16, 3)).astype(np.float32))
    calls, original = [], model.block

    def counted(i, x, *args, **kwargs):
        calls.append(i)
        return original(i, x, *args, **kwargs)

    model.block = counted
    tokens = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    head_calls = []
    original_head = model.head
    model.head = lambda x: head_calls.append(x.shape) or original_head(x)
    model.features_and_scores(tokens, [1])
    assert calls == [0, 1, 2] and head_calls == [(3, 64, 32)]  # every block once, the head once
    calls.clear()
    model.features(tokens, [1])
    assert calls == [0]  # features alone stay truncated


def test_extractor_scores_in_batches_like_one_call(one_torch_thread):
    hf = tiny_hf(seed=3)
    model = IGPT(hf, np.random.default_rng(3).uniform(0, 255, (16, 3)).astype(np.float32) / 127.5 - 1)
    rgb = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    feats, nll = Extractor(model, [2], batch_size=3, score=True).embed(rgb)
    tokens = torch.from_numpy(Extractor(model, [2]).tokens(rgb))
    np.testing.assert_allclose(nll, oracle_nll_bits(hf, tokens), rtol=1e-5)
    np.testing.assert_allclose(feats, model.features(tokens, [2]).numpy(), atol=1e-6)
    assert Extractor(model, [2]).embed(rgb)[1] is None


def demo_inputs(folder):
    """Real files: 12 scikit-learn digits as 8x8 PNGs (the model's size, so no resize blurs them), uniform
    noise, and four photographs."""
    from PIL import Image
    from skimage import data

    from igpt_batch.train_demo import digits_rgb

    folder.mkdir(parents=True)
    uris = []
    for i, rgb in enumerate(digits_rgb()[0][:12]):
        Image.fromarray(rgb).save(folder / f"digit-{i:04d}.png")
        uris.append(str(folder / f"digit-{i:04d}.png"))
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"noise-{i}.png")
        uris.append(str(folder / f"noise-{i}.png"))
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
        uris.append(str(folder / f"{name}.jpg"))
    return uris


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """An extract job with --score over digits, noise and photos on the demo model."""
    root = tmp_path_factory.mktemp("scored")
    uris = demo_inputs(root / "inputs")
    manifest = write_manifest(root / "m.parquet", uris, [u.rsplit("/", 1)[-1].split(".")[0] for u in uris])
    cfg = config.load(None, {"input.manifest": str(manifest), "output.path": str(root / "out"), "run.executor": "local",
                             "extract.score": True, "run.shard_size": 8, "output.report": False})
    summary = run_job(cfg, "extract")
    return root / "out", summary


def test_demo_model_scores_noise_and_photos_above_digits(scored):
    out, summary = scored
    t = read_output(str(out), "embeddings")
    assert summary["rows"]["embeddings"] == 19 and t.schema.field("nll_bits").type == "double"
    assert b"nll_bits" in t.schema.metadata
    nll = dict(zip(t.column("id").to_pylist(), t.column("nll_bits").to_pylist()))
    digits = [v for k, v in nll.items() if k.startswith("digit")]
    others = {k: v for k, v in nll.items() if not k.startswith("digit")}
    assert len(digits) == 12 and len(others) == 7
    assert min(others.values()) > 4 * max(digits), (sorted(digits), others)
    assert all(0 < v < 1 for v in digits)  # trained to ~0.2 bits a token on these digits
    assert min(others.values()) > math.log2(16)  # worse than guessing the 16 colours uniformly
    # the same scores as the model scoring those files directly (one extraction path)
    from igpt_batch.inputs import images
    from igpt_batch.model.loading import load_model

    model = load_model("demo", "fp32", "cpu")
    rgb = np.stack([images.load_rgb(u, model.n_px)[0] for u in t.column("uri").to_pylist()])
    _, direct = Extractor(model, [2], score=True).embed(rgb)
    np.testing.assert_allclose(t.column("nll_bits").to_numpy(), direct, rtol=1e-6)


def test_score_is_a_compatibility_key(scored, tmp_path):
    out, _ = scored

    job = json.loads((out / "_job.json").read_text())
    assert job["compat"]["score"] is True
    from igpt_batch.errors import JobError

    cfg = config.load(None, {"input.manifest": job["config"]["input"]["manifest"], "output.path": str(out),
                             "run.executor": "local", "run.shard_size": 8})
    with pytest.raises(JobError, match="score"):
        run_job(cfg, "extract")


def test_outliers_lists_the_least_likely_first_with_a_contact_sheet(scored, tmp_path, capsys):
    from PIL import Image

    from igpt_batch.cli import main

    out, _ = scored
    sheet = tmp_path / "odd.png"
    assert main(["outliers", str(out), "-n", "7", "--contact-sheet", str(sheet), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert not any(r["id"].startswith("digit") for r in rows)  # the seven non-digits, nothing else
    assert [r["nll_bits"] for r in rows] == sorted((r["nll_bits"] for r in rows), reverse=True)
    assert rows[0]["id"] == "astronaut"
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape == (3 * 128 + 4 * 2, 3 * 128 + 4 * 2, 3)  # 3x3 grid of 8 px images upscaled 16x
    assert img[2:130, 2:130].std() > 10  # the astronaut drawn, not a grey placeholder
    assert main(["outliers", str(out), "-n", "0"]) == 2


def test_outliers_refuses_an_output_without_scores(tmp_path, capsys):
    from PIL import Image

    from igpt_batch.cli import main

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "in" / "a.png")
    manifest = write_manifest(tmp_path / "m.parquet", [str(tmp_path / "in" / "a.png")])
    run_job(config.load(None, {"input.manifest": str(manifest), "output.path": str(tmp_path / "out"),
                               "run.executor": "local", "output.report": False}), "extract")
    assert main(["outliers", str(tmp_path / "out")]) == 2
    assert "--score" in capsys.readouterr().err


def test_refresh_score_gives_the_store_nll_bits_and_its_own_version(image_dir, tmp_path, capsys):
    """refresh.score: the current table's nll_bits equal extract --score's for the same files (demo model, fp32);
    it is part of the store version; `outliers STORE` lists the least likely live rows, and refuses a store
    version without scores."""
    import pyarrow as pa

    from igpt_batch.cli import main
    from igpt_batch.store.layout import Store
    from igpt_batch.store.refresh import read_current, refresh

    uris = sorted(str(p) for p in image_dir.iterdir())
    manifest = str(write_manifest(tmp_path / "m.parquet", uris, [u.rsplit("/", 1)[-1] for u in uris]))
    common = {"input.manifest": manifest, "run.executor": "local", "run.shard_size": 4, "output.report": False}
    store = tmp_path / "store"
    night = {**common, "refresh.store": str(store)}
    s1 = refresh(config.load(None, {**night, "refresh.score": True}))
    assert s1["computed"] == 10 and s1["errors"] == 2  # the truncated and the text file
    current = read_current(str(store))
    assert current.schema.field("nll_bits").type == pa.float64() and current.num_rows == 8
    got = dict(zip(current.column("id").to_pylist(), current.column("nll_bits").to_pylist()))
    run_job(config.load(None, {**common, "output.path": str(tmp_path / "out"), "extract.score": True}), "extract")
    t = read_output(str(tmp_path / "out"), "embeddings")
    want = dict(zip(t.column("id").to_pylist(), t.column("nll_bits").to_pylist()))
    assert sorted(got) == sorted(want) and len(want) == 8
    np.testing.assert_allclose([got[i] for i in sorted(want)], [want[i] for i in sorted(want)], rtol=1e-6)
    assert Store(str(store)).version_info(s1["version"])["score"] is True
    capsys.readouterr()
    assert main(["outliers", str(store), "-n", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    top = sorted(want, key=lambda i: (-want[i], i))[:5]
    assert [r["id"] for r in rows] == top
    np.testing.assert_allclose([r["nll_bits"] for r in rows], [want[i] for i in top], rtol=1e-6)
    # a night unchanged with score on embeds nothing; without score it is another store version, unscored
    assert refresh(config.load(None, {**night, "refresh.score": True}))["snapshot"] is None
    s2 = refresh(config.load(None, night))
    assert s2["version"] != s1["version"] and s2["computed"] == 10
    assert "nll_bits" not in read_current(str(store)).column_names
    assert main(["outliers", str(store), "-n", "5"]) == 2
    assert "no nll_bits column" in capsys.readouterr().err
