import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder


def table(ids):
    return pa.table({"id": pa.array(ids, pa.string()), "x": pa.array([len(i) for i in ids], pa.int64())})


def test_only_committed_parts_are_read_and_retries_replace(output_url):
    url, so = output_url
    out = OutputFolder(url, so)
    f0 = out.write_part("embeddings", "part-00000", table(["a", "b"]))
    out.commit("part-00000", {"files": [f0], "rows": {"embeddings": 2}})
    out.write_part("embeddings", "part-00001", table(["c"]))  # data written, commit marker missing (a crash)
    assert sorted(read_output(url, "embeddings", so).column("id").to_pylist()) == ["a", "b"]
    assert set(out.committed()) == {"part-00000"}
    # the retry of shard 1 replaces its file under the same name, then commits
    f1 = out.write_part("embeddings", "part-00001", table(["c", "d"]))
    out.commit("part-00001", {"files": [f1], "rows": {"embeddings": 2}})
    assert sorted(read_output(url, "embeddings", so).column("id").to_pylist()) == ["a", "b", "c", "d"]
    # readable directly by pyarrow.dataset too, with no duplicates
    dataset = ds.dataset(out.path("embeddings"), filesystem=out.fs, format="parquet")
    assert sorted(dataset.to_table().column("id").to_pylist()) == ["a", "b", "c", "d"]
    assert read_output(url, "errors", so).num_rows == 0


def test_json_and_clear(output_url):
    url, so = output_url
    out = OutputFolder(url, so)
    assert out.read_json("_job.json") is None
    out.write_json("_job.json", {"a": 1})
    assert out.read_json("_job.json") == {"a": 1}
    out.write_bytes("pngs/x.png", b"123")
    out.clear()
    assert out.read_json("_job.json") is None and not out.exists("pngs/x.png")


def test_read_output_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        read_output(str(tmp_path), "pictures")


def test_output_dataset_streams_only_committed_files_with_columns_and_filter_pushed_down(output_url):
    import pyarrow.compute as pc

    from igpt_batch.run.readers import output_dataset, output_files

    url, so = output_url
    out = OutputFolder(url, so)
    for i, ids in enumerate([["a", "b"], ["c"], ["d", "e"]]):
        f = out.write_part("embeddings", f"part-0000{i}", table(ids))
        if i != 1:  # shard 1: data without a marker
            out.commit(f"part-0000{i}", {"files": [f], "rows": {"embeddings": len(ids)}})
    dataset = output_dataset(url, "embeddings", so)
    assert len(dataset.files) == 2 and dataset.count_rows() == 4
    batches = list(dataset.to_batches(columns=["id"], filter=pc.field("id") >= "b"))
    assert [b.schema.names for b in batches] == [["id"]] * len(batches)
    assert sorted(pa.Table.from_batches(batches).column("id").to_pylist()) == ["b", "d", "e"]
    assert read_output(url, "embeddings", so, columns=["x"], filter=pc.field("x") == 1).to_pylist() == [{"x": 1}] * 4
    assert [f.rsplit("/", 2)[-2:] for f in output_files(url, "embeddings", so)] == [
        ["embeddings", "part-00000.parquet"], ["embeddings", "part-00002.parquet"]]


def test_commit_records_v2_and_old_records_read_the_same_way(output_url):
    from igpt_batch.inputs.manifest import Shard
    from igpt_batch.run.lease import Fence
    from igpt_batch.run.records import make_record

    url, so = output_url
    out = OutputFolder(url, so)
    out.write_json("_commits/part-00000.json", {"shard": "part-00000", "start": 0, "stop": 2, "rows": {"embeddings": 2},
                                                "files": [{"path": "embeddings/part-00000.parquet", "rows": 2}]})
    errors = pa.table({"id": ["x"], "uri": ["u"], "stage": ["read"], "error": ["file not found: /a/b.jpg"]})
    rec = make_record(Shard(1, 2, 3), [], {"embeddings": table([]), "errors": errors}, fingerprint="f", started_at=1.5)
    with pytest.raises(Exception, match="lease on .* lost"):  # a fence that is not the output's lease: refused
        out.commit("part-00001", rec, lease=Fence("not-held", 1, 600.0))
    out.commit("part-00001", rec)
    old, new = out.committed()["part-00000"], out.committed()["part-00001"]
    assert old["v"] == new["v"] == 2 and old["errors_by_reason"] is None and old["started_at"] is None
    assert new["errors_by_reason"] == {"read: file not found": 1} and new["rows"] == {"embeddings": 0, "errors": 1}
    assert new["started_at"] == 1.5 <= new["ended_at"] and new["lease"] is None


def test_shard_names_sort_in_plan_order_at_any_count_and_five_digit_outputs_resume(output_url):
    from igpt_batch.inputs.manifest import plan_shards

    shards = plan_shards(100_001, 1)
    names = [s.name for s in shards]
    assert names[0] == "part-000000" and names[-1] == "part-100000" and sorted(names) == names
    assert plan_shards(10, 1)[9].name == "part-00009"  # up to 99,999 shards: the five-digit names of before
    url, so = output_url
    out = OutputFolder(url, so)
    out.write_json("_job.json", {"shards": 100_001})  # written before the width was recorded: :05d names
    for name in ("part-00007", "part-100000"):
        out.commit(name, {"files": [{"path": f"embeddings/{name}.parquet", "rows": 1}], "rows": {"embeddings": 1}})
    assert set(OutputFolder(url, so).committed()) == {"part-00007", "part-100000"}
    assert {"part-00007", "part-100000"} <= set(OutputFolder(url, so).planned_shards())
    out.start_job({"shards": 100_001})  # a resume: the plan's names are six digits now
    assert out.read_job()["shard_width"] == 6
    committed = out.committed()
    assert {names[7], names[100_000]} == set(committed)  # matched by shard id, so neither reruns
    assert out.committed_files("embeddings", committed) == ["embeddings/part-00007.parquet",
                                                              "embeddings/part-100000.parquet"]


def test_duckdb_scans_the_committed_dataset_without_loading_it(output_url):
    duckdb = pytest.importorskip("duckdb")
    from igpt_batch.run.readers import output_dataset

    url, so = output_url
    out = OutputFolder(url, so)
    for i, ids in enumerate([["a", "b"], ["c"]]):
        f = out.write_part("embeddings", f"part-0000{i}", table(ids))
        out.commit(f"part-0000{i}", {"files": [f], "rows": {"embeddings": len(ids)}})
    out.write_part("embeddings", "part-00002", table(["stale"]))  # not committed: never counted
    emb = output_dataset(url, "embeddings", so)  # noqa: F841  (DuckDB finds it by name)
    assert duckdb.sql("select count(*), sum(x) from emb where id <> 'a'").fetchall() == [(2, 2)]


def test_parts_are_written_in_row_groups_of_about_row_group_bytes(tmp_path, monkeypatch):
    """Row groups sized by bytes, not one per write: large enough for DuckDB, Spark and Ray Data readers."""
    import pyarrow.parquet as pq

    from igpt_batch.run import storage

    out = OutputFolder(str(tmp_path / "o"))
    table = pa.table({"x": pa.array(range(1000), pa.int64())})  # 8 bytes a row
    out.write_part("embeddings", "part-00000", table)
    assert pq.read_metadata(tmp_path / "o" / "embeddings" / "part-00000.parquet").num_row_groups == 1
    monkeypatch.setattr(storage, "ROW_GROUP_BYTES", 3000)  # 375 rows a group
    out.write_part("embeddings", "part-00001", table)
    meta = pq.read_metadata(tmp_path / "o" / "embeddings" / "part-00001.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [375, 375, 250]
    assert out.read_table("embeddings/part-00001.parquet").equals(table)
