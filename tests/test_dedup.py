"""store/dedup.py: pair tasks over fragments (in-process and on a real local Ray) grouped by connected components,
and each night's near-duplicates of its new and updated rows (refresh.dup_threshold) on real photos."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_manifest
from test_search import COPIES, NAMES, cfg_for, photo

from igpt_batch.store import dedup as dd
from igpt_batch.store.layout import Store
from igpt_batch.store.refresh import refresh


def planted_store(tmp_path):
    """Three nights (three fragments) of random 16-d rows; planted near-copies across and within nights:
    a~1 of a (night 2 of night 1), a chain b - b~1 - b~2 (b~1 is near both), c~1 of c in the same night."""
    from test_index import table
    from test_store import V, night

    st = Store(str(tmp_path / "store"))
    st.create_version(V, {})
    parts = [table(tmp_path, 40, seed=s)[0] for s in range(3)]
    rng = np.random.default_rng(9)

    def near(t, i, new_id, eps):
        e = np.asarray(t.column("embedding")[i].values) + eps * rng.standard_normal(16).astype(np.float32)
        return t.slice(i, 1).set_column(0, "id", pa.array([new_id])).set_column(
            6, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(e, pa.float32()), 16))

    a, b = parts[0].column("id")[3].as_py(), parts[0].column("id")[5].as_py()
    parts[1] = pa.concat_tables([parts[1], near(parts[0], 3, "a~1", 0.01), near(parts[0], 5, "b~1", 0.01)])
    b1 = parts[1].slice(parts[1].num_rows - 1, 1)
    parts[2] = pa.concat_tables([parts[2], near(b1, 0, "b~2", 0.01), near(parts[2], 7, "c~1", 0.01)])
    c = parts[2].column("id")[7].as_py()
    for n, t in enumerate(parts):
        night(st, f"2026010{n + 1}T000000Z", t)
    return st, [{a, "a~1"}, {b, "b~1", "b~2"}, {c, "c~1"}]


def run(st, executor, tmp_path, monkeypatch, threshold=0.99):
    monkeypatch.setattr(dd, "TASK_ROWS", 1)  # one task per fragment
    out = tmp_path / f"dups-{executor}.parquet"
    got = dd.dedup(st.url, threshold, str(out), k=4, executor=executor)
    return got, pq.read_table(out)


def test_dedup_groups_pairs_across_fragments_and_cleans_its_scratch(tmp_path, monkeypatch):
    st, want = planted_store(tmp_path)
    assert len(st.open(st.resolve(None)).get_fragments()) == 3
    got, t = run(st, "local", tmp_path, monkeypatch)
    groups = {}
    for r in t.to_pylist():
        groups.setdefault(r["group"], set()).add(r["id"])
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, want))
    assert [r["group_size"] for r in t.to_pylist()] == [len(groups[g]) for g in t.column("group").to_pylist()]
    assert got["groups"] == 3 and got["duplicates"] == 4 and got["live_rows"] == 124 and got["pairs"] >= 8
    assert t.column("group").to_pylist() == sorted(t.column("group").to_pylist())  # numbered in table order
    assert (t.column("score").to_numpy() >= 0.99).all()
    assert not list((tmp_path / "store").glob("*/_scratch/*"))  # the pair files are removed


def test_dedup_on_ray_gives_the_same_groups(tmp_path, monkeypatch, ray_local):
    st, _ = planted_store(tmp_path)
    local, t_local = run(st, "local", tmp_path, monkeypatch)
    on_ray, t_ray = run(st, "ray", tmp_path, monkeypatch)
    assert on_ray == local | {"output": on_ray["output"]} and t_ray.equals(t_local)


def test_group_pairs_is_connected_components():
    pairs = pa.table({"a": pa.array([5, 9, 2, 7], pa.uint64()), "a_id": ["e", "i", "b", "g"],
                      "a_uri": ["/e", "/i", "/b", "/g"], "b": pa.array([9, 5, 7, 30], pa.uint64()),
                      "b_id": ["i", "e", "g", "z"], "b_uri": ["/i", "/e", "/g", "/z"],
                      "score": pa.array([0.97, 0.97, 0.99, 0.96], pa.float32())}, schema=dd.PAIRS_SCHEMA)
    t = dd.group_pairs(pairs).to_pylist()
    assert [(r["group"], r["id"], r["group_size"], round(r["score"], 2)) for r in t] == [
        (0, "b", 3, 0.99), (0, "g", 3, 0.99), (0, "z", 3, 0.96), (1, "e", 2, 0.97), (1, "i", 2, 0.97)]
    assert dd.group_pairs(dd.PAIRS_SCHEMA.empty_table()).num_rows == 0


def test_each_night_finds_near_copies_of_its_new_rows(tmp_path, one_torch_thread):
    img = tmp_path / "img"
    img.mkdir()
    ids, uris = [], []
    for name in NAMES:
        photo(name).save(img / f"{name}.png")
        ids, uris = ids + [name], uris + [str(img / f"{name}.png")]
    store, extra = tmp_path / "store", {"refresh.dup_threshold": 0.99}
    s1 = refresh(cfg_for(store, write_manifest(tmp_path / "m1.parquet", uris, ids), **extra))
    assert s1["duplicates"]["searched"] == len(NAMES) and s1["duplicates"]["pairs"] == 0
    copies = {}
    for name in ("astronaut", "coffee", "rocket"):  # recompressed (JPEG q30) and resized (half, q85) on night 2
        for kind in ("q30", "half"):
            COPIES[kind](photo(name), img / f"{name}-{kind}.jpg")
            copies[f"{name}~{kind}"] = str(img / f"{name}-{kind}.jpg")
    s2 = refresh(cfg_for(store, write_manifest(tmp_path / "m2.parquet", uris + list(copies.values()),
                                               ids + list(copies)), **extra))
    d = s2["duplicates"]
    assert d["searched"] == len(copies) and d["ids"] == len(copies) and d["index"] is False
    st = Store(str(store))
    pairs = st.read_duplicates(st.resolve(None), s2["snapshot"]).to_pylist()
    found = {(p["id"], p["duplicate_of"]) for p in pairs}
    for cid in copies:
        assert (cid, cid.split("~")[0]) in found  # each copy names its original
    assert all(p["id"].split("~")[0] == p["duplicate_of"].split("~")[0] and p["cosine"] >= 0.99 for p in pairs)
    s3 = refresh(cfg_for(store, write_manifest(tmp_path / "m3.parquet", uris + list(copies.values()),
                                               ids + list(copies)), **extra))
    assert s3["computed"] == 0 and s3["duplicates"] == {"threshold": 0.99, "searched": 0, "pairs": 0, "ids": 0}
