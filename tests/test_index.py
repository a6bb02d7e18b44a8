"""The vector index (store/index.py): built past refresh.index_min_rows, updated each night, used by neighbors and dedup."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest
from PIL import Image
from test_search import NAMES, cfg_for, cli, photo

from igpt_batch.cli import main
from igpt_batch.store.index import exact_topk, has_index, knn, recall_at_k, update_index
from igpt_batch.store.layout import Store
from igpt_batch.store.refresh import refresh


def crops(d: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """n distinct 24x24 crops of the photos at random places and sizes."""
    rng = np.random.default_rng(seed)
    ids, uris = [], []
    pics = [np.asarray(photo(name)) for name in NAMES]
    for i in range(n):
        a = pics[i % len(pics)]
        s = int(rng.integers(32, min(a.shape[:2]) // 2))
        y, x = rng.integers(0, a.shape[0] - s), rng.integers(0, a.shape[1] - s)
        Image.fromarray(a[y:y + s, x:x + s]).resize((24, 24)).save(d / f"crop-{seed}-{i:04d}.png")
        ids, uris = ids + [f"crop-{seed}-{i:04d}"], uris + [str(d / f"crop-{seed}-{i:04d}.png")]
    return ids, uris


def test_index_built_past_index_min_rows_and_updated_each_night(tmp_path, capsys, one_torch_thread):
    (tmp_path / "img").mkdir()
    ids, uris = crops(tmp_path / "img", 300, 0)
    store = tmp_path / "store"
    refresh(cfg_for(store, write_manifest(tmp_path / "m1.parquet", uris, ids), **{"refresh.index_min_rows": 300}))
    st = Store(str(store))
    ix = {i.field_names[0]: i for i in st.open(st.resolve(None)).describe_indices()}
    assert set(ix) == {"embedding", "id", "deleted"} and ix["embedding"].num_rows_indexed == 300
    assert has_index(st.open(st.resolve(None)))
    info = st.index_info(st.resolve(None))
    assert info["built"] == "build" and info["trained_rows"] == 300 and info["partitions"] == 17
    assert info["recall_queries"] == 300 and info["recall_k"] == 10 and 0.5 <= info["recall"] <= 1.0
    more_ids, more_uris = crops(tmp_path / "img", 19, 1)
    more_ids, more_uris = more_ids + ["twin"], more_uris + [uris[7]]  # the same picture under a second id
    refresh(cfg_for(store, write_manifest(tmp_path / "m2.parquet", uris + more_uris, ids + more_ids),
                    **{"refresh.index_min_rows": 300}))
    ix = {i.field_names[0]: i for i in st.open(st.resolve(None)).describe_indices()}
    assert {k: i.num_rows_indexed for k, i in ix.items()} == {"embedding": 320, "id": 320, "deleted": 320}  # updated
    assert st.index_info(st.resolve(None)) == info  # 320 < 4 x 300: not re-trained, recall not re-measured
    rc = main(["inspect", str(store)])
    assert rc == 0 and f"recall@10 {info['recall']}" in capsys.readouterr().out
    for row_id in (ids[7], more_ids[3]):
        rc, got, _ = cli(capsys, "neighbors", str(store), "--id", row_id, "-k", "3")
        assert rc == 0 and got["index"] is True and got["neighbors"][0]["id"] == row_id
        assert abs(got["neighbors"][0]["score"] - 1.0) < 1e-5  # refined: exact cosine of the candidates
    rc, got, _ = cli(capsys, "dedup", str(store), "--threshold", "0.99999", "--output", str(tmp_path / "d.parquet"))
    assert rc == 0 and got["index"] is True and got["live_rows"] == 320
    groups = {}
    for r in pq.read_table(tmp_path / "d.parquet").to_pylist():
        groups.setdefault(r["group"], set()).add(r["id"])
    assert {ids[7], "twin"} in groups.values()


def test_no_index_below_index_min_rows(tmp_path):
    from test_store import V, night, rows

    st = Store(str(tmp_path / "store"))
    st.create_version(V, {})
    night(st, "20260101T000000Z", rows([f"id{i}" for i in range(8)], "20260101T000000Z"))
    update_index(st, V, 9)
    assert not has_index(st.open(V)) and st.index_info(V) == {}
    assert sorted(i.field_names[0] for i in st.open(V).describe_indices()) == ["deleted", "id"]  # scalar ones only
    update_index(st, "v-000000000000", 0)  # a version without a table: nothing to index, no error


def table(tmp_path, n: int, dim: int = 16, seed: int = 0, deleted: int = 0):
    """A store's table of n rows of random unit-ish embeddings (its last `deleted` rows marked deleted)."""
    from test_store import V

    from igpt_batch.store.layout import current_schema

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    t = pa.table({"id": [f"r{seed}-{i:05d}" for i in range(n)], "uri": [f"/img/{i}.jpg" for i in range(n)],
                  "sha256": ["x"] * n, "size": [1] * n, "mtime": ["1"] * n, "etag": pa.nulls(n, pa.string()),
                  "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), dim), "width": pa.array([8] * n, pa.int32()),
                  "height": pa.array([8] * n, pa.int32()), "snapshot": ["s"] * n,
                  "deleted": [i >= n - deleted for i in range(n)]}).cast(current_schema(dim, {"version": V}))
    return t, emb


def test_scalar_indices_without_a_vector_index_and_merge_through_the_id_index(tmp_path):
    from test_store import V, night

    st = Store(str(tmp_path / "store"))
    st.create_version(V, {})
    t, _ = table(tmp_path, 600)
    night(st, "20260101T000000Z", t)
    assert update_index(st, V, 10_000) is None  # below index_min_rows: scalar indices only
    ix = {i.field_names[0]: i.index_type for i in st.open(V).describe_indices()}
    assert ix == {"id": "BTree", "deleted": "Bitmap"} and not has_index(st.open(V))
    changed = table(tmp_path, 600, seed=0)[0].slice(10, 3)  # three rows updated (same ids)
    ds = st.open(V)
    builder = ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
    with pytest.raises(OSError, match="scalar-index execution path"):  # Lance takes the index path (no plan to show)
        builder.explain_plan(changed.schema)
    ds = night(st, "20260102T000000Z", changed)
    assert ds.count_rows() == 600 and ds.count_rows(pc.field("id") == "r0-00011") == 1
    update_index(st, V, 10_000)
    ix = {i.field_names[0]: i.num_rows_indexed for i in st.open(V).describe_indices()}
    assert ix == {"id": 600, "deleted": 600}  # the rewritten rows were indexed again


def test_exact_topk_is_brute_force_and_skips_deleted_rows(tmp_path):
    from test_store import V, night

    st = Store(str(tmp_path / "store"))
    st.create_version(V, {})
    t, emb = table(tmp_path, 500, deleted=50)
    night(st, "20260101T000000Z", t)
    q = emb[:7] + 0.1
    got = exact_topk(st.open(V), q, 10)
    unit = emb[:450] / np.linalg.norm(emb[:450], axis=1, keepdims=True)
    want = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :10]
    assert [set(r) for r in got] == [{f"r0-{i:05d}" for i in row} for row in want]
    assert recall_at_k(st.open(V)) == {"recall": 1.0, "recall_k": 10, "recall_queries": 450}  # exact: no index
    hits = knn(st.open(V), q[:2], 10, ("id",))
    assert {h for h in hits.column("id").to_pylist()} <= {f"r0-{i:05d}" for i in range(450)}


def test_vector_index_retrained_when_the_table_has_grown_4x(tmp_path):
    from test_store import V, night

    st = Store(str(tmp_path / "store"))
    st.create_version(V, {})
    night(st, "20260101T000000Z", table(tmp_path, 300)[0])
    first = update_index(st, V, 300)
    assert first["built"] == "build" and first["trained_rows"] == 300 and st.index_info(V) == first
    night(st, "20260102T000000Z", table(tmp_path, 800, seed=1)[0])  # 1,100 rows: < 4 x 300
    assert update_index(st, V, 300) is None and st.index_info(V) == first
    night(st, "20260103T000000Z", table(tmp_path, 100, seed=2)[0])  # 1,200 rows = 4 x 300
    again = update_index(st, V, 300)
    assert again["built"] == "retrain" and again["trained_rows"] == 1200 and again["partitions"] == 35
    assert again["recall_queries"] == 1000 and 0.5 <= again["recall"] <= 1.0 and st.index_info(V) == again
    (vec,) = [i for i in st.open(V).describe_indices() if i.field_names == ["embedding"]]
    assert vec.num_rows_indexed == 1200
