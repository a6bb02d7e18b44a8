"""Store: the refresh store's layout, its Lance commits and tags, reads while a night is in flight, retention, listing."""
import numpy as np
import pyarrow as pa
import pytest
from conftest import S3Server

from igpt_batch.run.lance_output import lance_options
from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.layout import FAILED_SCHEMA, Store, current_schema

V = "v-0123456789ab"


def rows(ids, snap, value=0.0, deleted=False):
    n = len(ids)
    return pa.table({"id": ids, "uri": [f"/img/{i}.jpg" for i in ids], "sha256": [f"{i}-sha" for i in ids],
                     "size": [10] * n, "mtime": ["1"] * n, "etag": pa.nulls(n, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 4, value, np.float32)), 4),
                     "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
                     "snapshot": [snap] * n, "deleted": [deleted] * n}).cast(current_schema(4, {"version": V}))


def night(store, snap, table, drop_ids=None):
    ds = store.commit(V, snap, pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), drop_ids)
    store.publish(V, snap, ds.version)
    return ds


def test_write_publish_read_and_time_travel(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {"model": "m", "created_at": "2026-01-01"})
    assert store.versions() == [V] and store.open(V) is None and store.kept_snapshots(V) == {}
    night(store, "20260101T000000Z", rows(["a", "b", "c", "it's"], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["b", "d"], "20260102T000000Z", 1.0), drop_ids=pa.array(["c", "it's"]))
    assert store.latest()["snapshot"] == "20260102T000000Z" and store.resolve(None) == V
    now = {r["id"]: r for r in store.read(V).to_pylist()}
    assert sorted(now) == ["a", "b", "d"] and now["b"]["embedding"] == [1.0] * 4 and now["a"]["embedding"] == [0.0] * 4
    then = store.read(V, "20260101T000000Z")
    assert sorted(then.column("id").to_pylist()) == ["a", "b", "c", "it's"]  # the first snapshot, by its tag
    assert list(store.kept_snapshots(V)) == ["20260101T000000Z", "20260102T000000Z"] and store.verify(V) == []


def test_a_reader_never_sees_a_night_in_flight(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows(["a", "b"], "20260101T000000Z"))
    OutputFolder(store.snapshot_url(V, "20260102T000000Z")).start_job({"compat": {"rows": 1}})  # its extract began
    assert store.pending(V) == {"snapshot": "20260102T000000Z", "rows": 1}
    ds = store.open(V)
    builder = ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
    builder.execute_uncommitted(rows(["c"], "20260102T000000Z"))  # data files written, no commit yet
    assert sorted(store.read(V).column("id").to_pylist()) == ["a", "b"]
    night(store, "20260102T000000Z", rows(["c"], "20260102T000000Z"))
    assert sorted(store.read(V).column("id").to_pylist()) == ["a", "b", "c"] and store.pending(V) is None


def test_a_night_killed_between_commit_and_tag_is_tagged_by_the_next_run(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows(["a"], "20260101T000000Z"))
    t = rows(["b"], "20260102T000000Z")
    ds = store.commit(V, "20260102T000000Z", pa.RecordBatchReader.from_batches(t.schema, t.to_batches()))
    assert list(store.kept_snapshots(V)) == ["20260101T000000Z"]
    assert store.finish_interrupted(V) == "20260102T000000Z"
    assert store.kept_snapshots(V)["20260102T000000Z"] == ds.version and store.finish_interrupted(V) is None


def test_retention_keeps_the_newest_nights_and_compacts(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    snaps = [f"2026010{d}T000000Z" for d in range(1, 7)]
    for i, s in enumerate(snaps):
        night(store, s, rows([f"id{i}"], s))
    assert len(store.open(V).get_fragments()) == 6
    assert store.prune(V, keep=2, compact_fragments=4) == snaps[:4]
    assert list(store.kept_snapshots(V)) == snaps[4:] and len(store.open(V).get_fragments()) == 1
    assert store.read(V).num_rows == 6 and store.read(V, snaps[4]).num_rows == 5
    with pytest.raises(Exception):
        store.read(V, snaps[0])
    assert store.prune(V, keep=0, compact_fragments=0) == [] and store.verify(V) == []


def test_listing_failed_record_and_verify(tmp_path):
    store = Store(str(tmp_path / "store"))
    for v in (V, "v-ffffffffffff"):
        store.create_version(v, {"created_at": v})
    assert store.versions() == [V, "v-ffffffffffff"] and store.resolve(None) == "v-ffffffffffff"
    (tmp_path / "store" / V / "snapshots" / "20260101T000000Z").mkdir(parents=True)
    assert store.snapshot_outputs(V) == ["20260101T000000Z"] and store.taken(V, "20260101T000000Z")
    failed = pa.table({"id": ["x", "y"], "uri": ["/x", "/y"], "sha256": [None, None], "size": [1, None],
                       "mtime": ["5", None], "etag": [None, None], "stage": ["decode", "read"],
                       "reason": ["cannot identify image file /x", "file not found: /y"],
                       "first_night": ["20260101T000000Z"] * 2, "last_night": ["20260101T000000Z"] * 2})
    store.write_failed(V, failed.cast(FAILED_SCHEMA))
    assert store.read_failed(V).column("id").to_pylist() == ["x", "y"] and sum(store.failed_by_reason(V).values()) == 2
    night(store, "20260101T000000Z", rows(["a"], "20260101T000000Z"))
    data = next((tmp_path / "store" / V / "current.lance" / "data").iterdir())
    data.unlink()
    assert any("is missing" in p for p in store.verify(V))


def test_lance_options_are_the_fsspec_ones():
    so = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu"}}
    assert lance_options("s3://b/store", so) == {"aws_access_key_id": "k", "aws_secret_access_key": "s",
                                                 "aws_endpoint": "http://127.0.0.1:9000", "aws_region": "eu",
                                                 "allow_http": "true"}
    assert lance_options("/local/store", so) is None and lance_options("s3://b/s", {"anon": True}) == {"aws_skip_signature": "true"}


def test_store_on_s3(s3_server: S3Server):
    s3_server.fs().mkdir("igpt-store")
    store = Store("s3://igpt-store/store", s3_server.storage_options())
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows(["a", "b"], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["c"], "20260102T000000Z"))
    assert sorted(store.read(V).column("id").to_pylist()) == ["a", "b", "c"]
    assert store.read(V, "20260101T000000Z").num_rows == 2 and store.prune(V, 1, 0) == ["20260101T000000Z"]
    assert store.verify(V) == [] and store.versions() == [V]


def test_the_documented_readers_see_the_live_rows(tmp_path, ray_local):
    """docs/REFRESH.md's readers: read_current, lance, Ray Data's read_lance, and DuckDB through Arrow."""
    import duckdb
    import lance

    from igpt_batch.store.refresh import read_current

    store = Store(str(tmp_path / "store"))
    store.create_version(V, {"model": "m", "created_at": "2026-01-01"})
    night(store, "20260101T000000Z", rows(["a", "b", "c"], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["c"], "20260102T000000Z", deleted=True))
    live = ["a", "b"]
    assert sorted(read_current(str(tmp_path / "store")).column("id").to_pylist()) == live
    ds = lance.dataset(store.table_url(V))
    arrow = ds.to_table(columns=["id", "embedding"], filter="deleted = false")
    assert sorted(arrow.column("id").to_pylist()) == live and arrow.schema.field("embedding").type.list_size == 4
    assert sorted(r[0] for r in duckdb.sql("select id from arrow").fetchall()) == live
    got = ray_local.data.read_lance(store.table_url(V)).filter(expr="deleted == False").take_all()
    assert sorted(r["id"] for r in got) == live
