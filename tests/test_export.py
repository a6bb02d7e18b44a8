"""export: a snapshot of a refresh store's current table as plain Parquet parts, through the CLI."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
from test_store import V, night, rows

from igpt_batch.cli import main
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
    assert f"igpt-batch: error: {tmp_path / 'store'}/{V} has no current table yet" in capsys.readouterr().err
