"""Inputs users already have: mapped columns, images inside Parquet, WebDataset tars (local and S3), flaky HTTP."""
import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_cfg, make_tar

from igpt_batch import __version__, config
from igpt_batch.errors import ManifestError
from igpt_batch.inputs.manifest import Columns, iter_manifest, scan_manifest
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output

cfg_for = functools.partial(job_cfg, **{"run.shard_size": 3, "extract.batch_size": 4, "run.executor": "local",
                                        "extract.layers": [1]})  # (ckpt, out, **over)


@pytest.fixture
def wired():
    """run_job: the driver passes Columns.of(cfg.input) and plans tar-aligned shards itself."""
    return run_job


def embeddings(out, **so):
    t = read_output(str(out), "embeddings", so or None).sort_by("id")
    return t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), t


@pytest.fixture(scope="module")
def photos(image_dir):
    return {p.stem: p.read_bytes() for p in sorted(image_dir.iterdir()) if p.suffix == ".jpg" and p.stem not in ("text", "truncated")}


@pytest.fixture(scope="module")
def reference(tiny_ckpt, image_dir, photos, tmp_path_factory):
    """Embeddings of the photos read as files, by id: every other input form must give the same."""
    root = tmp_path_factory.mktemp("ref")
    pq.write_table(pa.table({"id": list(photos), "uri": [str(image_dir / f"{k}.jpg") for k in photos]}), root / "m.parquet")
    run_job(cfg_for(tiny_ckpt, root / "out", **{"input.manifest": str(root / "m.parquet")}), "extract")
    ids, emb, _ = embeddings(root / "out")
    return dict(zip(ids, emb))


# ----------------------------------------------------------------------------- mapped columns, bytes in Parquet


def test_img2dataset_parquet_key_url_and_jpg_columns(wired, tiny_ckpt, image_dir, photos, reference, tmp_path):
    keys = [f"{i:09d}" for i in range(len(photos))]
    table = pa.table({"key": keys, "url": [str(image_dir / f"{k}.jpg") for k in photos], "jpg": list(photos.values()),
                      "status": ["success"] * len(photos)})
    pq.write_table(table, tmp_path / "00000.parquet")
    by_key = dict(zip(keys, (reference[k] for k in photos)))
    for bytes_column in (None, "jpg"):  # fetched by url, then read from the rows themselves
        out = tmp_path / f"out-{bytes_column}"
        s = wired(cfg_for(tiny_ckpt, out, **{"input.manifest": str(tmp_path / "00000.parquet"), "input.id_column": "key",
                                            "input.uri_column": "url", "input.bytes_column": bytes_column}), "extract")
        ids, emb, t = embeddings(out)
        assert s["rows"] == {"embeddings": len(photos), "errors": 0} and ids == keys
        np.testing.assert_allclose(emb, np.stack([by_key[k] for k in ids]), atol=1e-5)
        assert t.column("uri").to_pylist() == table.column("url").to_pylist()


def test_hugging_face_image_struct_without_uri(wired, tiny_ckpt, photos, reference, tmp_path):
    struct = pa.array([{"bytes": b, "path": None} for b in photos.values()] + [{"bytes": b"junk", "path": None}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"image": struct, "label": list(range(len(photos) + 1))}), tmp_path / "data" / "train.parquet")
    cfg = cfg_for(tiny_ckpt, tmp_path / "out", **{"input.manifest": str(tmp_path / "data" / "train.parquet"),
                                                 "input.bytes_column": "image.bytes"})
    s = wired(cfg, "extract")
    assert s["rows"] == {"embeddings": len(photos), "errors": 1}
    ids, emb, _ = embeddings(tmp_path / "out")
    rows = {f"{tmp_path / 'data' / 'train.parquet'}#{i}": k for i, k in enumerate(photos)}
    assert sorted(rows) == ids  # no uri column: where the row is, which is the id too
    np.testing.assert_allclose(emb, np.stack([reference[rows[i]] for i in ids]), atol=1e-5)
    assert read_output(str(tmp_path / "out"), "errors").column("stage").to_pylist() == ["decode"]


def test_bytes_fingerprint_follows_the_images_and_mapped_csv_jsonl(photos, tmp_path):
    path, cols = tmp_path / "m.parquet", Columns(bytes="jpg")
    blobs = list(photos.values())
    pq.write_table(pa.table({"id": list(photos), "jpg": blobs}), path)
    before = scan_manifest(str(path), None, cols)
    assert before == scan_manifest(str(path), None, cols) and before.rows == len(photos)
    pq.write_table(pa.table({"id": list(photos), "jpg": blobs[::-1]}), path)  # same ids, other images
    assert scan_manifest(str(path), None, cols).fingerprint != before.fingerprint
    (tmp_path / "m.csv").write_text("key,url\nk1,/a.png\nk2,/b.png\n")
    (tmp_path / "m.jsonl").write_text('{"key": "k1", "url": "/a.png"}\n{"key": "k2", "url": "/b.png"}\n')
    for name in ("m.csv", "m.jsonl"):
        t = pa.concat_tables(iter_manifest(str(tmp_path / name), None, Columns("key", "url")))
        assert t.to_pydict() == {"id": ["k1", "k2"], "uri": ["/a.png", "/b.png"]}
        with pytest.raises(ManifestError, match="no 'url2'"):
            scan_manifest(str(tmp_path / name), None, Columns("key", "url2"))
        with pytest.raises(ManifestError, match="needs a Parquet"):
            scan_manifest(str(tmp_path / name), None, Columns("key", "url", "jpg"))
    with pytest.raises(ManifestError, match="no field 'bytes'"):
        scan_manifest(str(path), None, Columns(bytes="jpg.bytes"))
    with pytest.raises(config.ConfigError, match="input.retries"):
        config.load(None, {"input.retries": -1})


# ----------------------------------------------------------------------------- WebDataset


def test_webdataset_tars_brace_range_and_glob(wired, tiny_ckpt, photos, reference, tmp_path):
    keys = list(photos)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(make_tar({f"s/{k}": photos[k] for k in keys[:3]}))
    (tmp_path / "shards" / "00001.tar").write_bytes(make_tar({f"s/{keys[3]}": photos[keys[3]], "s/bad": b"junk"}, "png"))
    spec = str(tmp_path / "shards" / "{00000..00001}.tar")
    scan = scan_manifest(spec)
    assert scan.rows == 5 and scan.groups == (3, 2) and scan == scan_manifest(str(tmp_path / "shards" / "*.tar"))
    assert [(s.start, s.stop) for s in scan.shards(2)] == [(0, 2), (2, 3), (3, 5)]  # no shard crosses a tar
    s = wired(cfg_for(tiny_ckpt, tmp_path / "out", **{"input.manifest": spec, "run.shard_size": 2}), "extract")
    assert s["shards"] == 3 and s["rows"] == {"embeddings": 4, "errors": 1}
    ids, emb, t = embeddings(tmp_path / "out")
    assert ids == sorted(f"s/{k}" for k in keys) and t.column("uri").to_pylist()[0].endswith(".tar#s/astronaut.jpg")
    np.testing.assert_allclose(emb, np.stack([reference[i[2:]] for i in ids]), atol=1e-5)
    (tmp_path / "shards" / "00001.tar").write_bytes(make_tar({f"s/{keys[3]}": photos[keys[0]], "s/bad": b"junk"}, "png"))
    assert scan_manifest(spec).fingerprint != scan.fingerprint  # a changed image: a rerun recomputes
    with pytest.raises(ManifestError, match="1 of 3 tars not found"):
        scan_manifest(str(tmp_path / "shards" / "{00000..00002}.tar"))


def test_webdataset_on_s3(s3_server, tiny_ckpt, photos, reference, tmp_path):
    fs, so = s3_server.fs(), s3_server.storage_options()
    fs.mkdir("igpt-wds")
    keys = list(photos)
    for i in range(2):
        fs.pipe_file(f"igpt-wds/shards/{i:05d}.tar", make_tar({k: photos[k] for k in keys[2 * i:2 * i + 2]}))
    cfg = cfg_for(tiny_ckpt, "s3://igpt-wds/out", **{"input.manifest": "s3://igpt-wds/shards/{00000..00001}.tar",
                                                    "storage_options": so, "run.shard_size": 2})
    s = run_job(cfg, "extract")  # two tars of two: row shards of 2 are tar shards too, with the driver as it is
    assert s["rows"] == {"embeddings": 4, "errors": 0}
    ids, emb, t = embeddings("s3://igpt-wds/out", **so)
    assert ids == sorted(keys) and all(u.startswith("s3://igpt-wds/shards/") for u in t.column("uri").to_pylist())
    np.testing.assert_allclose(emb, np.stack([reference[i] for i in ids]), atol=1e-5)


# ----------------------------------------------------------------------------- flaky HTTP (the server: conftest.http_server)


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_flaky_urls_are_retried_and_counted(wired, http_server, tiny_ckpt, photos, reference, tmp_path, mode):
    state, base = http_server
    state["mode"] = mode
    (tmp_path / "m.csv").write_text("key,url\n" + "".join(f"{k},{base}/{k}.jpg\n" for k in photos))
    cfg = cfg_for(tiny_ckpt, tmp_path / "out", **{"input.manifest": str(tmp_path / "m.csv"), "input.id_column": "key",
                                                 "input.uri_column": "url"})
    s = wired(cfg, "extract")
    assert s["rows"] == {"embeddings": len(photos), "errors": 0}
    assert s["http_retries"] == len(photos)  # one retry per url
    ids, emb, _ = embeddings(tmp_path / "out")
    np.testing.assert_allclose(emb, np.stack([reference[k] for k in ids]), atol=1e-5)
    assert state["agents"] == {f"igpt-batch/{__version__}"}


