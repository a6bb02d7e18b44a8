"""export: a snapshot of a refresh store's current table as plain Parquet parts, through the CLI."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store import V, night, rows

from igpt_batch.cli import main
from igpt_batch.errors import UsageError
from igpt_batch.store.export import export
from igpt_batch.store.layout import Store


def test_export_writes_a_night_as_parquet(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows(["a", "b"], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["b"], "20260102T000000Z", deleted=True))
    got = export(str(tmp_path / "store"), str(tmp_path / "out"))
    assert (got["rows"], got["parts"], got["snapshot"], got["version"]) == (1, 1, "20260102T000000Z", V)
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == ["a"]
    assert json.loads((tmp_path / "out" / "_export.json").read_text()) == got
    capsys.readouterr()
    assert main(["export", str(tmp_path / "store"), str(tmp_path / "old"), "--snapshot", "20260101T000000Z"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    assert sorted(pq.read_table(tmp_path / "old").column("id").to_pylist()) == ["a", "b"]
    assert main(["export", str(tmp_path / "store"), str(tmp_path / "all"), "--include-deleted"]) == 0
    assert pq.read_table(tmp_path / "all").to_pydict()["deleted"] == [False, True]


def test_export_streams_parts_of_export_rows(tmp_path, monkeypatch):
    import igpt_batch.store.export as E

    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows([f"id{i}" for i in range(5)], "20260101T000000Z"))
    monkeypatch.setattr(E, "EXPORT_ROWS", 2)
    got = export(str(tmp_path / "store"), str(tmp_path / "out"))
    assert (got["rows"], got["parts"]) == (5, 3)
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(tmp_path / "out" / p).num_rows for p in parts] == [2, 2, 1]
    assert sorted(pa.concat_tables([pq.read_table(tmp_path / "out" / p) for p in parts]).column("id").to_pylist()) == \
        [f"id{i}" for i in range(5)]


def test_export_of_a_store_without_a_table_exits_2(tmp_path, capsys):
    Store(str(tmp_path / "store")).create_version(V, {})
    assert main(["export", str(tmp_path / "store"), str(tmp_path / "out")]) == 2
    assert f"igpt-batch: error: {tmp_path / 'store'}/{V} has no current table: no refresh has finished there yet" in capsys.readouterr().err


def test_export_replaces_an_earlier_export_and_refuses_other_folders(tmp_path, capsys):
    """Issue 18 item 8: a second export into the same folder leaves no part of the first; a folder holding a user's
    own part-*.parquet (or anything not an export) is refused and left as it was."""
    import igpt_batch.store.export as E

    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows([f"id{i}" for i in range(5)], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["id0", "id1", "id2", "id3"], "20260102T000000Z", deleted=True))
    E.EXPORT_ROWS, saved = 2, E.EXPORT_ROWS
    try:
        first = export(str(tmp_path / "store"), str(tmp_path / "out"), snapshot="20260101T000000Z")
        assert first["parts"] == 3
        second = export(str(tmp_path / "store"), str(tmp_path / "out"))
    finally:
        E.EXPORT_ROWS = saved
    assert second["rows"] == 1 and second["parts"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_export.json", "part-00000.parquet"]
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == ["id4"]  # a reader counts one export
    assert json.loads((tmp_path / "out" / "_export.json").read_text())["files"] == ["part-00000.parquet"]
    mine = tmp_path / "mine"
    mine.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), mine / "part-00000.parquet")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "store"), str(mine)]) == 2
    assert "not an igpt-batch export (part-00000.parquet)" in capsys.readouterr().err
    assert pq.read_table(mine / "part-00000.parquet").to_pydict() == {"x": [1, 2]}  # untouched
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "store"), str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_export_to_s3_replaces_an_earlier_export(s3_server, tmp_path):
    store = Store(str(tmp_path / "store"))
    store.create_version(V, {})
    night(store, "20260101T000000Z", rows(["a", "b", "c"], "20260101T000000Z"))
    night(store, "20260102T000000Z", rows(["a", "b"], "20260102T000000Z", deleted=True))
    fs, so = s3_server.fs(), s3_server.storage_options()
    fs.mkdir("igpt-export")
    fs.pipe("igpt-export/user/part-00000.parquet", b"not ours")
    with pytest.raises(UsageError, match="not an igpt-batch export"):
        export(str(tmp_path / "store"), "s3://igpt-export/user", storage_options=so)
    assert fs.cat("igpt-export/user/part-00000.parquet") == b"not ours"
    import igpt_batch.store.export as E

    E.EXPORT_ROWS, saved = 1, E.EXPORT_ROWS
    try:
        assert export(str(tmp_path / "store"), "s3://igpt-export/x", "20260101T000000Z", storage_options=so)["parts"] == 3
        assert export(str(tmp_path / "store"), "s3://igpt-export/x", storage_options=so)["parts"] == 1
    finally:
        E.EXPORT_ROWS = saved
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("igpt-export/x")) == ["_export.json", "part-00000.parquet"]
