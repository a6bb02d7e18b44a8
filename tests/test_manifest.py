import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igpt_batch import manifest as manifest_mod
from igpt_batch.manifest import ManifestError, Shard, plan_shards, read_manifest, scan_manifest, write_plan


def test_plan_shards_is_a_pure_row_range_split():
    shards = plan_shards(10, 4)
    assert [(s.shard_id, s.start, s.stop) for s in shards] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert shards == plan_shards(10, 4) and shards[2].name == "part-00002" and len(shards[2]) == 2
    assert [(s.start, s.stop) for s in plan_shards(5, 2, first=100)] == [(100, 102), (102, 104), (104, 105)]


def test_parquet_csv_jsonl_and_relative_uris(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "uri": ["x/a.png", "/abs/b.png"]}), tmp_path / "m.parquet")
    t = read_manifest(str(tmp_path / "m.parquet"))
    assert t.column("id").to_pylist() == ["a", "b"]
    assert t.column("uri").to_pylist() == [str(tmp_path / "x/a.png"), "/abs/b.png"]
    (tmp_path / "m.csv").write_text("uri,label\ns3://bkt/1.jpg,3\nhttp://h/2.jpg,4\n")
    t = read_manifest(str(tmp_path / "m.csv"))
    assert t.column("id").to_pylist() == ["s3://bkt/1.jpg", "http://h/2.jpg"]  # id derived from uri
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p1.jsonl").write_text("\n".join(json.dumps({"id": f"i{i}", "uri": f"/i{i}.png"}) for i in range(3)))
    (tmp_path / "d" / "p2.jsonl").write_text(json.dumps({"id": "i9", "uri": "/i9.png"}))
    assert read_manifest(str(tmp_path / "d")).column("id").to_pylist() == ["i0", "i1", "i2", "i9"]
    assert read_manifest(str(tmp_path / "d" / "p*.jsonl")).num_rows == 4


def test_folder_of_images(image_dir):
    t = read_manifest(str(image_dir))
    assert t.num_rows == 10 and all(u.startswith(str(image_dir)) for u in t.column("uri").to_pylist())
    assert read_manifest(str(image_dir / "*.png")).num_rows == 4


@pytest.mark.parametrize("content, match", [
    ("uri\n", "empty"),
    ("path,id\n/a.png,a\n", "no 'uri' column"),
    ("id,uri\na,/1.png\na,/2.png\nb,/3.png\n", "duplicate ids"),
])
def test_manifest_faults_fail_fast(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(str(tmp_path / "m.csv"))


def test_missing_and_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest or image files"):
        read_manifest(str(tmp_path / "empty"))


def test_image_folder_with_a_non_utf8_name(tmp_path):
    import os

    from igpt_batch.images import read_bytes

    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(b"bytes")
    (tmp_path / "plain name.png").write_bytes(b"other")
    uris = read_manifest(str(tmp_path)).column("uri").to_pylist()
    assert uris[0].startswith("file://") and uris[0].endswith("caf%E9.png") and uris[1] == str(tmp_path / "plain name.png")
    assert [read_bytes(u) for u in uris] == [b"bytes", b"other"]


def test_scan_and_plan_stream_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "BATCH_ROWS", 7)  # force many small batches
    ids = [f"r{i}" for i in range(50)]
    pq.write_table(pa.table({"id": ids, "uri": [f"/img/{i}.png" for i in range(50)]}), tmp_path / "one.parquet")
    (tmp_path / "split").mkdir()
    pq.write_table(pa.table({"id": ids[:20], "uri": [f"/img/{i}.png" for i in range(20)]}), tmp_path / "split" / "a.parquet")
    pq.write_table(pa.table({"id": ids[20:], "uri": [f"/img/{i}.png" for i in range(20, 50)]}), tmp_path / "split" / "b.parquet")
    one, split = scan_manifest(str(tmp_path / "one.parquet")), scan_manifest(str(tmp_path / "split"))
    assert one.rows == split.rows == 50 and one.fingerprint == split.fingerprint  # boundaries do not matter
    pq.write_table(pa.table({"id": ids, "uri": [f"/img/{i}.jpg" for i in range(50)]}), tmp_path / "other.parquet")
    assert scan_manifest(str(tmp_path / "other.parquet")).fingerprint != one.fingerprint
    got = {}
    write_plan(str(tmp_path / "split"), None, 12, [s for s in plan_shards(50, 12) if s.shard_id != 1],
               lambda s, t: got.__setitem__(s.shard_id, t.column("id").to_pylist()))
    assert sorted(got) == [0, 2, 3, 4] and got[0] == ids[:12] and got[3] == ids[36:48] and got[4] == ids[48:]


def test_jsonl_streams_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "JSON_BLOCK_BYTES", 1024)  # about 30 rows a block
    rows = [{"id": i, "uri": f"/img/{i}.png", "label": i % 10} for i in range(500)]  # numeric ids become strings
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = list(manifest_mod.iter_manifest(str(tmp_path / "m.jsonl")))
    assert len(batches) > 10 and max(b.num_rows for b in batches) < 100  # never the whole file at once
    t = pa.concat_tables(batches)
    assert t.column("id").to_pylist() == [str(i) for i in range(500)] and t.column("uri")[499].as_py() == "/img/499.png"
    pq.write_table(pa.table({"id": t.column("id"), "uri": t.column("uri")}), tmp_path / "same.parquet")
    assert scan_manifest(str(tmp_path / "m.jsonl")).fingerprint == scan_manifest(str(tmp_path / "same.parquet")).fingerprint
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "x", "uri": "/x.png"}\n')
    with pytest.raises(ManifestError, match="cannot read manifest .*mixed.jsonl"):  # ids that change type mid-file
        read_manifest(str(tmp_path / "mixed.jsonl"))
