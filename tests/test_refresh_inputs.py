"""Issue 18 items 3 and 4: refresh reads what extract reads: mapped id/uri columns, bytes columns and WebDataset tars,
with the same live ids and embeddings as `extract` on the same inputs."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from conftest import real_photos
from test_refresh import cfg_for

from igpt_batch import config
from igpt_batch.cli import main
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.store.refresh import read_current, refresh


def pngs(n: int = 5) -> dict[str, bytes]:
    """n real photos (up to 8: the four, then flipped) as PNG bytes, keyed k0..k(n-1)."""
    from PIL import Image

    photos = list(real_photos().values())
    out = {}
    for i, arr in enumerate((photos + [a[:, ::-1] for a in photos])[:n]):
        buf = io.BytesIO()
        Image.fromarray(arr).resize((40 + 8 * i, 32 + 4 * i)).save(buf, format="PNG")
        out[f"k{i}"] = buf.getvalue()
    return out


def write_tar(path: Path, images: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tf:
        for key, data in images.items():
            for name, payload in ((f"{key}.png", data), (f"{key}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return str(path)


def embeddings_by_id(t: pa.Table) -> dict[str, np.ndarray]:
    return {r["id"]: np.asarray(r["embedding"], np.float32) for r in t.select(["id", "embedding"]).to_pylist()}


def extract(tiny_ckpt, m: str, out: Path, **extra) -> dict[str, np.ndarray]:
    cfg = config.load(None, {"model.name": tiny_ckpt, "input.manifest": m, "output.path": str(out),
                             "run.executor": "local", "run.shard_size": 3, "extract.layers": [2], **extra})
    run_job(cfg, "extract")
    return embeddings_by_id(read_output(str(out), "embeddings"))


def test_tars_bytes_and_files_give_extracts_ids_and_embeddings(tiny_ckpt, tmp_path):
    images = pngs()
    tar = write_tar(tmp_path / "00000.tar", images)
    byt = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"id": list(images), "jpg": pa.array(list(images.values()), pa.binary())}), byt)
    (tmp_path / "img").mkdir()
    for k, data in images.items():
        (tmp_path / "img" / f"{k}.png").write_bytes(data)
    files = tmp_path / "files.parquet"
    pq.write_table(pa.table({"id": list(images), "uri": [str(tmp_path / "img" / f"{k}.png") for k in images]}), files)
    kinds = {"tar": (tar, {}), "bytes": (str(byt), {"input.bytes_column": "jpg"}), "files": (str(files), {})}
    got = {}
    for kind, (m, extra) in kinds.items():
        store = tmp_path / f"store-{kind}"
        s = refresh(cfg_for(tiny_ckpt, store, m, **extra))
        assert (s["computed"], s["errors"], s["live_rows"]) == (5, 0, 5), kind  # today: tars 5 errors, 0 live rows
        live = embeddings_by_id(read_current(str(store)))
        want = extract(tiny_ckpt, m, tmp_path / f"out-{kind}", **extra)
        assert sorted(live) == sorted(want) == sorted(images), kind
        assert all(np.array_equal(live[k], want[k]) for k in images), kind
        got[kind] = live
        again = refresh(cfg_for(tiny_ckpt, store, m, **extra))  # the same images: nothing to embed, nothing read
        assert (again["computed"], again["unchanged"], again["precheck"]["hashed"]) == (0, 5, 0), kind
    assert all(np.allclose(got["tar"][k], got[kind][k], atol=1e-6) for kind in ("bytes", "files") for k in images)
    # one image changes inside the tar: only that row is embedded again
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(images["k2"])))[::-1].copy()).save(buf, format="PNG")
    write_tar(tmp_path / "00000.tar", images | {"k2": buf.getvalue()})
    s = refresh(cfg_for(tiny_ckpt, tmp_path / "store-tar", tar))
    assert (s["changed"], s["unchanged"], s["computed_ids"]) == (1, 4, ["k2"])


def test_refresh_honours_id_and_uri_columns(tiny_ckpt, tmp_path, capsys):
    images = pngs(4)
    (tmp_path / "img").mkdir()
    uris = []
    for k, data in images.items():
        (tmp_path / "img" / f"{k}.png").write_bytes(data)
        uris.append(str(tmp_path / "img" / f"{k}.png"))
    m = tmp_path / "m.csv"  # id, key, uri: the ids are in `key`
    pcsv.write_csv(pa.table({"id": [f"other-{i}" for i in range(4)], "key": list(images), "uri": uris}), m)
    store = tmp_path / "store"
    args = ["refresh", "--model", tiny_ckpt, "--manifest", str(m), "--store", str(store), "--layer", "2",
            "--executor", "local", "--id-column", "key"]
    assert main(args) == 0
    cur = read_current(str(store))
    assert sorted(cur.column("id").to_pylist()) == sorted(images)  # today: the uris
    assert cur.column("size").null_count == 0 and cur.column("mtime").null_count == 0
    assert main(args) == 0  # today: a traceback 'Ambiguous merge inserts'
    capsys.readouterr()
    # img2dataset: key, url
    m2 = tmp_path / "img2dataset.parquet"
    pq.write_table(pa.table({"key": list(images), "url": uris, "caption": ["x"] * 4}), m2)
    s = refresh(cfg_for(tiny_ckpt, tmp_path / "store2", m2, **{"input.id_column": "key", "input.uri_column": "url"}))
    assert (s["computed"], s["errors"]) == (4, 0)
    assert sorted(read_current(str(tmp_path / "store2")).column("id").to_pylist()) == sorted(images)
    # a misspelt id column is refused, in refresh and in extract, for CSV and Parquet
    for manifest in (m, m2):
        for cmd in (["refresh", "--store", str(tmp_path / "store3")], ["extract", "--output", str(tmp_path / "o")]):
            capsys.readouterr()
            code = main([*cmd, "--model", tiny_ckpt, "--manifest", str(manifest), "--executor", "local",
                         "--id-column", "kye", *(["--uri-column", "url"] if manifest == m2 else [])])
            assert code == 2 and "has no 'kye' column" in capsys.readouterr().err, (manifest, cmd)
    assert not (tmp_path / "store3").exists() or not list((tmp_path / "store3").glob("v-*/current.lance"))


def test_a_bad_image_in_a_bytes_column_is_not_retried_while_unchanged(tiny_ckpt, tmp_path):
    images = pngs(3)
    m = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"id": [*images, "bad"], "jpg": pa.array([*images.values(), b"not an image"], pa.binary())}), m)
    cfg = {"input.bytes_column": "jpg", "run.max_error_fraction": 0.5}
    s1 = refresh(cfg_for(tiny_ckpt, tmp_path / "store", m, **cfg))
    assert (s1["computed"], s1["errors"], s1["failed_ids"], s1["live_rows"]) == (4, 1, ["bad"], 3)
    s2 = refresh(cfg_for(tiny_ckpt, tmp_path / "store", m, **cfg))
    assert (s2["computed"], s2["failed_unchanged"], s2["snapshot"]) == (0, 1, None)
    pq.write_table(pa.table({"id": [*images, "bad"], "jpg": pa.array([*images.values(), images["k0"]], pa.binary())}), m)
    s3 = refresh(cfg_for(tiny_ckpt, tmp_path / "store", m, **cfg))  # its bytes changed: tried again, and it works
    assert (s3["computed_ids"], s3["errors"], s3["live_rows"]) == (["bad"], 0, 4)


def test_a_misspelt_id_column_is_refused_in_every_manifest_format(tmp_path):
    import pytest

    from igpt_batch.errors import ManifestError
    from igpt_batch.inputs.manifest import read_manifest
    from igpt_batch.inputs.manifest_files import Columns

    (tmp_path / "m.jsonl").write_text('{"key": "a", "uri": "/x/a.png"}\n{"key": "b", "uri": "/x/b.png"}\n')
    pcsv.write_csv(pa.table({"key": ["a"], "uri": ["/x/a.png"]}), tmp_path / "m.csv")
    pq.write_table(pa.table({"key": ["a"], "uri": ["/x/a.png"]}), tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        assert read_manifest(str(tmp_path / name), columns=Columns(id="key")).column("id").to_pylist()[0] == "a"
        with pytest.raises(ManifestError, match="no 'kye'"):
            read_manifest(str(tmp_path / name), columns=Columns(id="kye"))
        assert read_manifest(str(tmp_path / name)).column("id").to_pylist()[0] == "/x/a.png"  # default id: the uri


def test_images_inside_the_manifest_planned_in_buckets_as_in_one(tiny_ckpt, tmp_path):
    """Two tars, and a bytes column over two Parquet files in row groups of 2, planned in buckets of 2 rows (tasks
    over units: a tar, a range of row groups): the same live ids and embeddings as a night planned in one bucket,
    the images read back from the right file and row by their order keys."""
    images = pngs(8)
    parts = [dict(list(images.items())[:3]), dict(list(images.items())[3:])]
    (tmp_path / "tars").mkdir()
    (tmp_path / "bytes").mkdir()
    for i, part in enumerate(parts):
        write_tar(tmp_path / "tars" / f"{i:05d}.tar", part)
        pq.write_table(pa.table({"id": list(part), "jpg": pa.array(list(part.values()), pa.binary())}),
                       tmp_path / "bytes" / f"{i}.parquet", row_group_size=2)
    for kind, extra in (("tars", {}), ("bytes", {"input.bytes_column": "jpg"})):
        m, stores = str(tmp_path / kind), [tmp_path / f"one-{kind}", tmp_path / f"many-{kind}"]
        one = refresh(cfg_for(tiny_ckpt, stores[0], m, **extra))
        many = refresh(cfg_for(tiny_ckpt, stores[1], m, **extra, **{"refresh.plan_bucket_rows": 2}))  # 4 buckets or more
        assert (one["computed"], one["errors"], many["computed"], many["errors"]) == (8, 0, 8, 0), kind
        a, b = (embeddings_by_id(read_current(str(s))) for s in stores)
        assert sorted(a) == sorted(b) == sorted(images) and all(np.array_equal(a[k], b[k]) for k in images), kind
