"""The vector index (store/index.py): built past refresh.index_min_rows, updated each night, used by neighbors and dedup."""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from conftest import write_manifest
from PIL import Image
from test_search import NAMES, cfg_for, cli, photo

from igpt_batch.store.index import has_index, update_index
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
    (ix,) = st.open(st.resolve(None)).describe_indices()
    assert ix.field_names == ["embedding"] and ix.num_rows_indexed == 300 and has_index(st.open(st.resolve(None)))
    more_ids, more_uris = crops(tmp_path / "img", 19, 1)
    more_ids, more_uris = more_ids + ["twin"], more_uris + [uris[7]]  # the same picture under a second id
    refresh(cfg_for(store, write_manifest(tmp_path / "m2.parquet", uris + more_uris, ids + more_ids),
                    **{"refresh.index_min_rows": 300}))
    (ix,) = st.open(st.resolve(None)).describe_indices()
    assert ix.num_rows_indexed == 320  # the second night's rows were added to the index
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
    assert not has_index(st.open(V)) and st.open(V).describe_indices() == []
    update_index(st, "v-000000000000", 0)  # a version without a table: nothing to index, no error
