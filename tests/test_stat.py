"""igpt_batch.inputs.stat: sizes and times without reading bytes; shared folders listed once, the rest one by one."""
import os

import fsspec
import pyarrow as pa

from igpt_batch.inputs import stat


def test_prefixes_and_web_uris():
    uris = pa.array(["/d/a.png", "s3://b/p/q.png", "x.png", "http://h/i.png", "HTTPS://h/j.png"])
    assert stat.prefix_of(uris).to_pylist() == ["/d", "s3://b/p", "", "http://h", "HTTPS://h"]
    assert stat.is_web(uris).to_pylist() == [False, False, False, True, True]


def test_folders_of_many_rows_are_listed_once_and_the_rest_stat_ed(tmp_path):
    many, few = tmp_path / "many", tmp_path / "few"
    many.mkdir(), few.mkdir()
    for i in range(stat.LIST_MIN):
        (many / f"{i}.png").write_bytes(b"x" * (i + 1))
    (few / "one.png").write_bytes(b"abc")
    uris = [str(many / f"{i}.png") for i in range(stat.LIST_MIN)] + [str(few / "one.png"), str(few / "gone.png")]
    table, counts = stat.stat_table(pa.array(uris), {}, timeout=10)
    assert counts == {"lists": 1, "heads": 2}
    assert table.column("size").to_pylist() == [*range(1, stat.LIST_MIN + 1), 3, None]  # None: cannot say
    want = [stat.timestamp(os.stat(u).st_mtime_ns) for u in uris[:-1]] + [None]
    assert table.column("mtime").to_pylist() == want and table.column("etag").null_count == len(uris)


def test_object_store_entries_by_listing_and_by_head_agree():
    fs = fsspec.filesystem("memory")
    fs.pipe({f"/igpt-stat/p/{i}.png": b"y" * (10 + i) for i in range(stat.LIST_MIN)})
    try:
        uris = [f"memory://igpt-stat/p/{i}.png" for i in range(stat.LIST_MIN)]
        listed, counts = stat.stat_table(pa.array(uris), {}, timeout=10)
        assert counts == {"lists": 1, "heads": 0}
        one_by_one = [stat.stat_one(u, {}, timeout=10) for u in uris]
        assert listed.to_pylist() == one_by_one and [r["size"] for r in one_by_one] == [10 + i for i in range(stat.LIST_MIN)]
        assert stat.stat_one("memory://igpt-stat/p/missing.png", {}, timeout=10) is None
    finally:
        fs.rm("/igpt-stat", recursive=True)
