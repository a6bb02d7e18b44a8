import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igpt_batch.errors import ManifestError
from igpt_batch.inputs import manifest as manifest_mod
from igpt_batch.inputs.manifest import plan_shards, read_manifest, scan_manifest, write_plan


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

    from igpt_batch.inputs.images import read_bytes

    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(b"bytes")
    (tmp_path / "plain name.png").write_bytes(b"other")
    uris = read_manifest(str(tmp_path)).column("uri").to_pylist()
    assert uris[0].startswith("file://") and uris[0].endswith("caf%E9.png") and uris[1] == str(tmp_path / "plain name.png")
    assert [read_bytes(u) for u in uris] == [b"bytes", b"other"]


def test_scan_and_plan_stream_in_batches(tmp_path, monkeypatch):
    from igpt_batch.inputs import units

    for mod in (manifest_mod, units):  # the scan's reads and the kept rows' writes
        monkeypatch.setattr(mod, "BATCH_ROWS", 7)  # force many small batches
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
    write_plan(manifest_mod.iter_manifest(str(tmp_path / "split")), [s for s in plan_shards(50, 12) if s.shard_id != 1],
               lambda s, t: got.__setitem__(s.shard_id, t.column("id").to_pylist()))
    assert sorted(got) == [0, 2, 3, 4] and got[0] == ids[:12] and got[3] == ids[36:48] and got[4] == ids[48:]


def test_jsonl_streams_in_blocks(tmp_path, monkeypatch):
    from igpt_batch.inputs import units

    monkeypatch.setattr(units, "JSON_BLOCK_BYTES", 1024)  # about 30 rows a block
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


# ----------------------------------------------------------------------------- ids are strings, exactly as written


def _ids(spec):
    return read_manifest(str(spec)).column("id").to_pylist()


def test_csv_ids_and_uris_are_the_strings_in_the_file(tmp_path):
    (tmp_path / "m.csv").write_text("id,uri,label\n007,/a.png,3\n7,/b.png,x\n1.0,/c.png,4\nFalse,/d.png,5\n"
                                    "12345678901234567890,/e.png,6\n 8 ,1.png,7\n")
    t = read_manifest(str(tmp_path / "m.csv"))  # "007" and "7" are two ids, not duplicates
    assert t.column("id").to_pylist() == ["007", "7", "1.0", "False", "12345678901234567890", " 8 "]
    assert t.column("uri").to_pylist()[-1] == str(tmp_path / "1.png")
    (tmp_path / "n.csv").write_text("id,uri\n007,/a.png\n7,/b.png\n")
    assert read_manifest(str(tmp_path / "n.csv")).column("id").to_pylist() == ["007", "7"]
    (tmp_path / "u.csv").write_text("uri\n0001.png\n")  # a uri that looks like a number stays a path
    assert read_manifest(str(tmp_path / "u.csv")).column("uri").to_pylist() == [str(tmp_path / "0001.png")]


def test_csv_other_columns_may_change_type_between_blocks(tmp_path):
    rows = [f"r{i},/{i}.png,{i}" for i in range(200_000)] + ["last,/z.png,cat"]
    (tmp_path / "m.csv").write_text("id,uri,label\n" + "\n".join(rows) + "\n")
    assert scan_manifest(str(tmp_path / "m.csv")).rows == 200_001


def test_jsonl_ids_keep_their_text(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "007", "uri": "/a.png"}\n{"id": "7", "uri": "/b.png"}\n\n'
                                      '{"uri": "/c.png", "id": "1.0", "extra": [1, {"x": 2.5}]}\n')
    assert _ids(tmp_path / "m.jsonl") == ["007", "7", "1.0"]
    (tmp_path / "n.jsonl").write_text('{"id": 12345678901234567890, "uri": "/a.png"}\n{"id": -3, "uri": "/b.png"}\n')
    assert _ids(tmp_path / "n.jsonl") == ["12345678901234567890", "-3"]


@pytest.mark.parametrize("line, match", [
    ('{"id": 1.5, "uri": "/a.png"}', r"line 2: 'id' must be a string or an integer, got a float"),
    ('{"id": [1], "uri": "/a.png"}', r"line 2: 'id' must be a string or an integer, got a list"),
    ('{"id": "b", "uri": 5}', r"line 2: 'uri' must be a string"),
    ('{"id": "b", "uri": "/a.png"', r"line 2 is not valid JSON"),
    ('["b", "/a.png"]', r"line 2 is not a JSON object"),
    ('{"uri": "/b.png"}', r"line 2 has no 'id'"),
])
def test_jsonl_bad_rows_are_named_by_line(tmp_path, line, match):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "uri": "/a.png"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=match):
        read_manifest(str(tmp_path / "m.jsonl"))


def test_parquet_integer_ids_become_decimal_strings(tmp_path):
    pq.write_table(pa.table({"id": pa.array([7, -1, 2**63 - 1], pa.int64()), "uri": ["/a", "/b", "/c"]}), tmp_path / "m.parquet")
    assert _ids(tmp_path / "m.parquet") == ["7", "-1", str(2**63 - 1)]
    pq.write_table(pa.table({"id": pa.array([7], pa.uint8()), "uri": pa.array(["/a"], pa.large_string())}), tmp_path / "u.parquet")
    assert _ids(tmp_path / "u.parquet") == ["7"]


@pytest.mark.parametrize("column, values, type_name", [
    ("id", pa.array([[1], [2]]), "list<"),
    ("id", pa.array([{"a": 1}, {"a": 2}]), "struct<a: int64>"),
    ("id", pa.array([1.0, 2.0]), "double"),
    ("uri", pa.array([1, 2]), "int64"),
])
def test_parquet_columns_of_other_types_are_refused(tmp_path, column, values, type_name):
    cols = {"id": pa.array(["a", "b"]), "uri": pa.array(["/a", "/b"])}
    cols[column] = values
    pq.write_table(pa.table(cols), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=rf"m\.parquet: column '{column}' has type {type_name}"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_parquet_uri_with_invalid_utf8_names_the_file_and_row(tmp_path):
    uris = pa.array([b"/ok.png", b"/also-ok.png", b"/caf\xe9.png"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"uri": uris}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet: row 2: 'uri' is not valid UTF-8") as e:
        read_manifest(str(tmp_path / "m.parquet"))
    str(e.value).encode("utf-8")  # printable


def test_empty_uri_and_id_strings_are_refused(tmp_path):
    (tmp_path / "m.csv").write_text("id,uri\na,/a.png\nb,\n")
    with pytest.raises(ManifestError, match="empty 'uri' or 'id'"):
        read_manifest(str(tmp_path / "m.csv"))


# ----------------------------------------------------------------------------- what a folder means


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not really")
    return path


def test_an_image_folder_never_reads_outputs_plans_or_hidden_folders(tmp_path):
    for name in ("a.png", "sub/b.jpg", "_plan/part-00000.png", ".cache/c.png", "old-out/embeddings/e.png"):
        _png(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "old-out" / "_job.json").write_text("{}")
    pq.write_table(pa.table({"id": ["x"], "uri": ["/x.png"]}), tmp_path / "imgs" / "old-out" / "embeddings.parquet")
    pq.write_table(pa.table({"id": ["y"], "uri": ["/y.png"]}), tmp_path / "imgs" / "sub" / "notes.parquet")
    t = read_manifest(str(tmp_path / "imgs"))
    assert t.column("id").to_pylist() == ["a.png", "sub/b.jpg"]  # relative to the folder
    assert t.column("uri").to_pylist() == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "sub" / "b.jpg")]


def test_image_ids_do_not_depend_on_where_the_folder_is_mounted(tmp_path):
    for name in ("a.png", "deep/er/b.png"):
        _png(tmp_path / "mnt1" / "photos" / name)
    first = _ids(tmp_path / "mnt1" / "photos")
    (tmp_path / "mnt1").rename(tmp_path / "mnt2")
    assert _ids(tmp_path / "mnt2" / "photos") == first == ["a.png", "deep/er/b.png"]
    assert _ids(tmp_path / "mnt2" / "photos" / "*.png") == ["a.png"]
    assert _ids(tmp_path / "mnt2" / "photos" / "**" / "*.png") == ["a.png", "deep/er/b.png"]
    assert _ids(tmp_path / "mnt2" / "photos" / "a.png") == ["a.png"]


def test_a_manifest_folder_reads_its_manifests_not_outputs_inside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "part-1.csv").write_text("id,uri\na,/a.png\n")
    (tmp_path / "m" / "_commits").mkdir()
    (tmp_path / "m" / "_commits" / "part-00000.jsonl").write_text('{"id": "c", "uri": "/c.png"}\n')
    (tmp_path / "m" / "out").mkdir()
    (tmp_path / "m" / "out" / "_job.json").write_text("{}")
    pq.write_table(pa.table({"id": ["e"], "uri": ["/e.png"]}), tmp_path / "m" / "out" / "part.parquet")
    assert _ids(tmp_path / "m") == ["a"]


def test_mixed_folders_are_refused_saying_how_to_choose(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("id,uri\na,a.png\n")
    with pytest.raises(ManifestError, match=r"both manifest files .*m\.csv.* and images .*a\.png") as e:
        read_manifest(str(tmp_path))
    assert "pass the manifest file itself" in str(e.value) and "glob of the images" in str(e.value)
    with pytest.raises(ManifestError, match="both manifest files"):
        read_manifest(str(tmp_path / "*"))
    assert _ids(tmp_path / "m.csv") == ["a"] and _ids(tmp_path / "*.png") == ["a.png"]


def test_an_output_folder_is_not_input(tmp_path):
    _png(tmp_path / "out" / "pngs" / "seed-000000000001.png")
    (tmp_path / "out" / "_job.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"igpt-batch output .*_job\.json"):
        read_manifest(str(tmp_path / "out"))


def test_storage_options_the_filesystem_rejects_are_a_manifest_error(tmp_path):
    so = {"nonsense_option": "zzz-secret-value", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    with pytest.raises(ManifestError, match="nonsense_option") as e:
        read_manifest("s3://bucket/m.csv", so)
    assert "zzz-secret-value" not in str(e.value) and "storage options" in str(e.value)


def test_kept_rows_a_killed_driver_left_are_swept_by_the_next_job(tmp_path, monkeypatch):
    """A driver keeps the manifest's rows (fetchable URLs) under TMPDIR until the plan files are written; one that
    was SIGKILLed leaves them there, and the next job's driver removes them. A live driver's are kept."""
    import subprocess
    import sys
    import tempfile

    from igpt_batch.inputs.manifest import Inputs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / "tmp" / f"igpt-inputs-{int(gone.stdout)}-abc"
    live = tmp_path / "tmp" / f"igpt-inputs-{os.getppid()}-def"
    for d in (killed, live):
        d.mkdir()
        (d / "rows.arrow").write_text("https://user:secret@host/a.jpg")
    m = tmp_path / "m.csv"
    m.write_text("id,uri\na,/x/a.jpg\n")
    with Inputs(str(m)) as inputs:
        assert inputs.scan.rows == 1
        assert not killed.exists() and live.exists()
        assert os.path.basename(inputs.folder).startswith(f"igpt-inputs-{os.getpid()}-")
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [live.name]


def test_units_cut_a_manifest_for_tasks_and_key_rows_in_manifest_order(tmp_path):
    """inputs/units.py: Parquet row groups gathered up to the target (a group never cut), a CSV whole with its rows
    guessed from its size, images in slices; every row's order key is file index << 32 | row in the file."""
    from igpt_batch.inputs.listing import list_inputs
    from igpt_batch.inputs.manifest_files import Columns
    from igpt_batch.inputs.units import FILE_SHIFT, unit_tables, units

    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(10)], "uri": [f"/x/{i}.png" for i in range(10)]}),
                   tmp_path / "m" / "a.parquet", row_group_size=3)
    (tmp_path / "m" / "b.csv").write_text("id,uri\n" + "".join(f"b{i},/y/{i}.png\n" for i in range(6)))
    listing = list_inputs(str(tmp_path / "m"), {})
    got = units(listing, 5)
    assert [(u.path.rsplit("/", 1)[1], u.groups, u.first_row, u.rows, u.guessed) for u in got] == [
        ("a.parquet", (0, 1), 0, 3, False), ("a.parquet", (1, 2), 3, 3, False), ("a.parquet", (2, 4), 6, 4, False),
        ("b.csv", None, 0, (7 + 6 * 12) // 24, True)]  # 79 bytes, at least 24 a row
    rows = [(key + i, id_) for u in got for key, t in unit_tables(listing, u, Columns(), False)
            for i, id_ in enumerate(t.column("id").to_pylist())]
    assert rows == [(i, f"a{i}") for i in range(10)] + [((1 << FILE_SHIFT) + i, f"b{i}") for i in range(6)]
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"x")
    images = list_inputs(str(tmp_path / "img"), {})
    assert [(u.key, len(u.files), u.rows) for u in units(images, 2)] == [(0, 2, 2), (2, 2, 2), (4, 1, 1)]


def test_images_inside_parquet_are_read_in_batches_sized_by_the_bytes_seen(tmp_path, monkeypatch):
    """A manifest carrying its images is read in 256-row batches until a row's bytes are known, then in batches of
    about BYTES_BATCH_BYTES (at most 8,192 rows): few batches for small images, few images at a time for big ones;
    the rows, their order and the row-place uris are the same whatever the batching."""
    from igpt_batch.inputs import manifest_files
    from igpt_batch.inputs.listing import list_inputs
    from igpt_batch.inputs.manifest_files import Columns, read_batches

    images = [bytes([i % 251]) * (100 + i % 7) for i in range(20_000)]  # about 103 bytes each, not all alike
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"i{i}" for i in range(20_000)], "image": images}), path, row_group_size=5_000)
    listing = list_inputs(str(path), {})

    def batches():
        return list(read_batches(listing.fs, str(path), columns=Columns(bytes="image")))

    sizes = [t.num_rows for t in batches()]
    assert sizes[:20] == [256] * 19 + [136] and sizes[20:] == [5_000] * 3  # the first group, then whole groups
    monkeypatch.setattr(manifest_files, "BYTES_BATCH_BYTES", 1_000)  # 1,000 bytes a batch: 8 rows of <= 106 bytes
    small = batches()  # (and 8 bytes of offset each)
    assert {t.num_rows for t in small[20:]} == {8}, [t.num_rows for t in small[20:30]]
    for got in (sizes, small):
        assert sum(got if got is sizes else [t.num_rows for t in got]) == 20_000
    table = pa.concat_tables(small)
    assert table.column("bytes").to_pylist() == images and table.column("id").to_pylist()[-1] == "i19999"
    uris = pa.concat_tables(manifest_mod.iter_manifest(str(path), columns=Columns(id="id", uri="uri", bytes="image")))
    assert uris.column("uri").to_pylist()[::4_999] == [f"{path}#{i}" for i in range(0, 20_000, 4_999)]
