"""igpt_batch.ray_data.Embedder: on a plain batch dict, then inside Ray Data's map_batches on an actor pool."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from igpt_batch.inputs import images
from igpt_batch.model import palette
from igpt_batch.model.loading import load_model
from igpt_batch.ray_data import Embedder

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    return load_model(tiny_ckpt, "fp32", "cpu")


def expected_features(model, paths, layers) -> np.ndarray:
    """The reference: images.load_rgb -> palette.tokenize -> model.features, one batch."""
    rgb = np.stack([images.load_rgb(str(p), model.n_px)[0] for p in paths])
    tokens = torch.from_numpy(palette.tokenize(rgb, model.clusters))
    return model.features(tokens, layers).numpy()


def cols(table) -> dict:
    """An output batch (a pyarrow Table) as numpy: `embedding` (B, dim) float32, other columns 1-D."""
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), table.schema.field("embedding").type.list_size)
    out = {n: np.array(table.column(n).to_pylist(), dtype=object) for n in table.column_names if n != "embedding"}
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    out["embedding"] = flat.reshape(table.num_rows, table.schema.field("embedding").type.list_size).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def embedder(tiny_ckpt):
    return Embedder(model=tiny_ckpt, layers=LAYERS, dtype="fp32", device="cpu", column="bytes", model_batch_size=3)


def test_bytes_column_keeps_every_row(embedder, tiny_model, image_dir):
    files = sorted(image_dir.iterdir())  # 4 jpg + 4 png + truncated.jpg + text.jpg
    batch = {"bytes": np.array([f.read_bytes() for f in files], dtype=object),
             "path": np.array([str(f) for f in files], dtype=object),
             "n": np.arange(len(files))}
    out = cols(embedder(batch))
    assert set(out) == {"path", "n", "embedding", "error"}  # the images are not carried into the output
    assert out["path"].tolist() == batch["path"].tolist() and out["n"].tolist() == list(range(len(files)))
    emb, err = out["embedding"], out["error"]
    assert emb.dtype == np.float32 and emb.shape == (len(files), len(LAYERS) * tiny_model.n_embd)
    bad = {"truncated.jpg", "text.jpg"}
    good = [i for i, f in enumerate(files) if f.name not in bad]
    for i, f in enumerate(files):
        if f.name in bad:
            assert err[i].startswith("decode: ") and np.isnan(emb[i]).all(), (f.name, err[i])
        else:
            assert err[i] is None and np.isfinite(emb[i]).all(), (f.name, err[i])
    ref = expected_features(tiny_model, [files[i] for i in good], LAYERS)
    np.testing.assert_allclose(emb[good], ref, atol=1e-5, rtol=0)


def test_path_column_reports_read_errors(tiny_ckpt, tiny_model, image_dir):
    emb = Embedder(model=tiny_ckpt, layers=[2], device="cpu", column="uri")
    pngs = sorted(image_dir.glob("*.png"))
    uris = [str(pngs[0]), str(image_dir / "missing.png"), "file://" + str(pngs[1]), None]
    out = cols(emb({"uri": np.array(uris, dtype=object)}))
    err = out["error"].tolist()
    assert err[0] is None and err[2] is None
    assert err[1].startswith("read: file not found") and err[3] == "read: missing value"
    assert np.isnan(out["embedding"][[1, 3]]).all()
    np.testing.assert_allclose(out["embedding"][[0, 2]], expected_features(tiny_model, pngs[:2], [2]), atol=1e-5)


def test_auto_column_default_layer_and_bad_column(tiny_ckpt, image_dir):
    emb = Embedder(model=tiny_ckpt, device="cpu", column=None)
    assert emb.layers == [emb.model.n_layer // 2]
    png = sorted(image_dir.glob("*.png"))[0]
    out = cols(emb({"path": np.array([str(png)], dtype=object)}))
    assert out["error"].tolist() == [None] and out["embedding"].shape == (1, emb.model.n_embd)
    out = cols(emb({"path": np.array([], dtype=object)}))
    assert out["embedding"].shape == (0, emb.model.n_embd) and len(out["error"]) == 0
    with pytest.raises(KeyError, match="none of the columns"):
        emb({"image": np.array([png.read_bytes()], dtype=object)})
    with pytest.raises(KeyError, match="'bytes' not in batch"):
        Embedder(model=tiny_ckpt, device="cpu", column="bytes")({"path": np.array([str(png)], dtype=object)})


def test_map_batches_on_actor_pool(ray_local, tiny_ckpt, tiny_model, image_dir, tmp_path):
    import ray

    pngs = sorted(str(p) for p in image_dir.glob("*.png"))
    ds = ray.data.read_binary_files(pngs, include_paths=True)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model": tiny_ckpt, "layers": LAYERS, "dtype": "fp32", "device": "auto",
                               "column": "bytes"},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=3,
        num_cpus=0.5,  # on 2 CPUs a whole-CPU actor would starve the read stage
    )
    ds = ds.materialize()  # run the pipeline once, for the schema and the rows
    assert ds.schema().base_schema.field("embedding").type == pa.list_(pa.float32(), len(LAYERS) * tiny_model.n_embd)
    rows = ds.take_all()
    assert len(rows) == len(pngs)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(Path(p).name for p in pngs)
    assert all(r["error"] is None for r in rows)
    got = np.stack([np.asarray(by_name[Path(p).name]["embedding"]) for p in pngs])
    np.testing.assert_allclose(got, expected_features(tiny_model, pngs, LAYERS), atol=1e-5, rtol=0)
    # the README's example: what it writes has the CLI's columns (an id to join on, no image bytes, null errors)
    import pyarrow.parquet as pq

    ds.rename_columns({"path": "id"}).write_parquet(str(tmp_path / "out"))
    t = pq.read_table(tmp_path / "out")
    assert sorted(t.column_names) == ["embedding", "error", "id"] and t.column("error").null_count == len(pngs)
    assert t.schema.field("error").type == pa.string() and sorted(t.column("id").to_pylist()) == pngs
