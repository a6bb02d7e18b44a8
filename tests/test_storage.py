import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from igpt_batch.run.storage import OutputFolder, read_output


def table(ids):
    return pa.table({"id": pa.array(ids, pa.string()), "x": pa.array([len(i) for i in ids], pa.int64())})


@pytest.fixture(params=["local", "s3"])
def out_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), {}
    s3 = request.getfixturevalue("s3_server")
    bucket = f"stor-{tmp_path.name[-20:].lower().replace('_', '-')}"
    s3.fs().mkdir(bucket)
    return f"s3://{bucket}/out", s3.storage_options()


def test_only_committed_parts_are_read_and_retries_replace(out_url):
    url, so = out_url
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


def test_json_and_clear(out_url):
    url, so = out_url
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
