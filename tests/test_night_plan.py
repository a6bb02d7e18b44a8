"""A night's plan (store/night_plan.py, store/decide.py): every manifest row decided against the current table, in
the driver or in two rounds of bucket tasks, with the same answer."""
import fsspec
import pyarrow as pa
import pytest
import test_refresh
from fsspec.implementations.local import LocalFileSystem
from test_refresh import _night3, cfg_for, manifest

from igpt_batch.store.decide import Bucket, Counts
from igpt_batch.store.layout import Store
from igpt_batch.store.night_plan import NightPlan, bucket_of

first_night, one_night = test_refresh.first_night, test_refresh.one_night  # the store after one night, per module


def test_step_plan_in_buckets_counts_as_in_one(one_night, ray_local):
    from igpt_batch.store.refresh import start_night

    o = one_night
    cfg = cfg_for(o["ckpt"], o["store"], _night3(o))
    nights = []
    for buckets, executor in ((None, "local"), (3, "local"), (3, "ray")):
        cfg.run.executor = executor
        if buckets:
            cfg.refresh.plan_bucket_rows = buckets  # 8 rows in 3 buckets of id
        nights.append(start_night(cfg, Store(str(o["store"])), o["version"], o["info"], [2]))
    for n in nights:
        s = n.summary
        assert (s["new"], s["changed"], s["unchanged"], s["deleted"], s["metadata_updates"]) == (1, 1, 6, 1, 1)
        assert sorted(n.plan.compute.column("id").to_pylist()) == ["coffee-small.png", "rocket-wide.png"]
        assert n.plan.touch.column("id").to_pylist() == ["chelsea.jpg"] and n.plan.gone.column("id").to_pylist() == ["rocket.jpg"]
    assert [len(n.plan.buckets) for n in nights] == [1, 3, 3]
    counts = [{k: v for k, v in n.summary.items() if k not in ("snapshot", "stat")} for n in nights]
    assert counts[0] == counts[1] == counts[2]  # the summary's counts do not depend on the buckets
    assert counts[0]["precheck"] == {"size_mtime": 5, "hashed": 2, "hash_unchanged": 1}
    assert not (o["store"] / o["version"] / "_planning").exists()  # the bucket files are removed


def test_step_plan_in_buckets_lists_each_folder_once(one_night):
    """Buckets of id would split a folder's rows between tasks (each listing it, or stat-ing rows one by one): the
    night's stat round is split by folder, so each folder is listed once, whatever the id buckets."""
    from igpt_batch.store.refresh import start_night

    o = one_night
    base = o["tmp"] / "folders"
    folders = [next(f for f in (f"f{k}" for k in range(50)) if bucket_of(pa.array([str(base / f)]), 2)[0] == b)
               for b in (0, 1)]  # one folder in each of the 2 stat buckets
    names = []
    for f in folders:
        (base / f).mkdir(parents=True)
        for i in range(5):
            (base / f / f"{i}.jpg").write_bytes(b"x" * (i + 1))
            names.append(f"{f}/{i}.jpg")
    cfg = cfg_for(o["ckpt"], o["store"], manifest(o["tmp"] / "mf.parquet", base, names), **{"refresh.plan_bucket_rows": 8})
    s = start_night(cfg, Store(str(o["store"])), o["version"], o["info"], [2]).summary
    assert (s["new"], s["deleted"], s["stat"]) == (10, 8, {"lists": 2, "heads": 0})


def test_bucket_of_is_a_stable_hash_mod_n():
    ids = pa.array(["a", "b", "", "é", "a" * 100, "a"])
    b = bucket_of(ids, 7)
    assert b.dtype.kind == "i" and ((0 <= b) & (b < 7)).all() and b[0] == b[5]
    assert (bucket_of(pa.chunked_array([ids[:3], ids[3:]]), 7) == b).all()  # chunks and slices hash alike
    assert (bucket_of(ids.slice(2), 7) == b[2:]).all() and (bucket_of(ids, 1) == 0).all()
    assert len(set(bucket_of(pa.array([f"id{i}" for i in range(1000)]), 4))) == 4


def test_a_night_plan_sums_its_buckets():
    def bucket(ids, gone, **counts):
        t = pa.table({"id": ids, "uri": ids, "size": [1] * len(ids), "mtime": ["1"] * len(ids), "etag": [None] * len(ids)})
        return Bucket(Counts(**counts), t, pa.table({"id": gone, "deleted": [g == "x" for g in gone]}),
                      pa.table({"id": pa.array([], pa.string())}))

    plan = NightPlan(pa.table({"id": ["n"]}), [bucket(["a"], ["x"], new=1, etag=2, hashed=0),
                                               bucket(["b", "c"], ["y", "z"], new=2, size_mtime=3, hashed=1)])
    assert plan.counts == Counts(new=3, etag=2, size_mtime=3, hashed=1)
    assert plan.counts.precheck() == {"etag": 2, "size_mtime": 3, "hashed": 1}  # hash_unchanged 0: left out
    assert Counts().precheck() == {"hashed": 0}
    assert plan.touch.column("id").to_pylist() == ["a", "b", "c"] and plan.gone.num_rows == 3
    assert plan.newly_deleted == 2  # "x" was marked deleted on an earlier night


# ----------------------------------------------------------------------------- planning in tasks (plan_tasks.py)

def _split_manifest(o, names: list[str], folder) -> str:
    """The manifest as a folder of three files: a Parquet file in row groups of 2, a CSV and a JSONL file."""
    import json

    import pyarrow.parquet as pq

    folder.mkdir()
    uris = [str(o["d"] / n) for n in names]
    pq.write_table(pa.table({"id": names[:5], "uri": uris[:5]}), folder / "a.parquet", row_group_size=2)
    (folder / "b.csv").write_text("id,uri\n" + "".join(f"{n},{u}\n" for n, u in zip(names[5:7], uris[5:7])))
    (folder / "c.jsonl").write_text("".join(json.dumps({"id": n, "uri": u}) + "\n"
                                            for n, u in zip(names[7:], uris[7:])))
    return str(folder)


def _plan(o, m: str, bucket_rows: int, executor: str = "local", **over):
    from igpt_batch.store.refresh import start_night

    over = {"refresh.plan_bucket_rows": bucket_rows, "run.executor": executor, **over}
    cfg = cfg_for(o["ckpt"], o["store"], m, **over)
    return start_night(cfg, Store(str(o["store"])), o["version"], o["info"], [2])


def test_a_night_in_buckets_equals_the_night_in_one_row_for_row(one_night, ray_local):
    """Night 3's changes, the manifest in three files of three formats: planned in one bucket here, and in 2 and 4
    buckets of tasks (Ray and local), every decision and every row to compute is the same, in manifest order."""
    o = one_night
    _night3(o)
    names = [n for n in o["names"] if n != "rocket.jpg"] + ["rocket-wide.png"]
    m = _split_manifest(o, names, o["tmp"] / "m3")
    nights = [_plan(o, m, 250_000), _plan(o, m, 4), _plan(o, m, 5, "ray")]  # 8 rows: each stat task in one slice
    assert len(nights[0].plan.buckets) == 1 and min(len(n.plan.buckets) for n in nights[1:]) > 1
    by = lambda t: t.sort_by("id")  # noqa: E731  (buckets concatenate in bucket order)
    one = nights[0].plan
    assert one.compute.column("id").to_pylist() == ["coffee-small.png", "rocket-wide.png"]  # in manifest order
    for n in nights[1:]:
        assert n.plan.compute.equals(one.compute)  # every column, the order keys too
        for part in ("touch", "gone", "failed"):
            assert by(getattr(n.plan, part)).equals(by(getattr(one, part))), part
        assert n.plan.counts == one.counts and n.plan.stat == one.stat
        assert {k: v for k, v in n.summary.items() if k != "snapshot"} == \
            {k: v for k, v in nights[0].summary.items() if k != "snapshot"}
    keys = one.compute.column("row").to_pylist()  # order keys: file index << 32 | row in the file, not dense
    assert keys == [3, 2 << 32]  # a.parquet's 4th row, c.jsonl's first
    assert not (o["store"] / o["version"] / "_planning").exists()


@pytest.mark.parametrize("bucket_rows, executor", [(250_000, "local"), (2, "local"), (2, "ray")])
def test_a_duplicate_id_in_two_manifest_files_is_refused_naming_it(one_night, bucket_rows, executor, request, capsys):
    from igpt_batch.errors import ManifestError

    if executor == "ray":
        request.getfixturevalue("ray_local")
    o = one_night
    names = o["names"]
    m = _split_manifest(o, names[:7] + ["chelsea.jpg", "rocket.jpg"], o["tmp"] / "dup")  # the JSONL repeats 2 ids
    with pytest.raises(ManifestError) as e:
        _plan(o, m, bucket_rows, executor)
    assert str(e.value) == f"manifest {m} has 2 duplicate ids (e.g. 'chelsea.jpg', 'rocket.jpg'); ids must be unique"
    if executor == "local":  # the command: exit 2, the message as it is
        from igpt_batch.cli import main

        (o["tmp"] / "night.yaml").write_text(f"refresh: {{plan_bucket_rows: {bucket_rows}}}\n")
        capsys.readouterr()
        assert main(["refresh", "--model", o["ckpt"], "--manifest", m, "--store", str(o["store"]), "--layer", "2",
                     "--executor", "local", "--config", str(o["tmp"] / "night.yaml")]) == 2
        assert str(e.value) in capsys.readouterr().err
    (o["tmp"] / "empty").mkdir()
    for f in ("a.csv", "b.csv", "c.csv"):  # each guessed to hold a row: 2 buckets of 2 rows
        (o["tmp"] / "empty" / f).write_text("id,uri\n")
    with pytest.raises(ManifestError, match="is empty: no rows to process"):
        _plan(o, str(o["tmp"] / "empty"), bucket_rows, executor)
    assert not (o["store"] / o["version"] / "_planning").exists()


class CountingFS(LocalFileSystem):
    """Local files, every open and listing recorded with the task running (a test's wrapper sets `task`); as on an
    object store, a file's folders need not be made first."""

    protocol = ("igptcount",)
    task: str | None = None
    seen: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **{**kw, "auto_mkdir": True})

    def _open(self, path, mode="rb", **kw):
        CountingFS.seen.append((CountingFS.task, "write" if "w" in mode else "read", self._strip_protocol(path)))
        return super()._open(path, mode, **kw)

    def ls(self, path, detail=False, **kw):
        CountingFS.seen.append((CountingFS.task, "list", self._strip_protocol(path)))
        return super().ls(path, detail=detail, **kw)


def test_no_planning_task_reads_another_buckets_files(one_night, monkeypatch):
    from igpt_batch.store import night_plan

    fsspec.register_implementation("igptcount", CountingFS, clobber=True)
    for name in ("split_manifest", "split_current", "stat_bucket", "decide_bucket"):
        def wrapped(*a, _fn=getattr(night_plan, name), _name=name):
            CountingFS.task = f"{_name}:{a[2].index if _name == 'split_manifest' else a[1]}"
            try:
                return _fn(*a)
            finally:
                CountingFS.task = None
        monkeypatch.setattr(night_plan, name, wrapped)
    o = one_night
    _night3(o)
    names = [n for n in o["names"] if n != "rocket.jpg"] + ["rocket-wide.png"]
    plan_dir = o["tmp"] / "plan"
    CountingFS.seen = []
    m = _split_manifest(o, names, o["tmp"] / "m3")
    s = _plan(o, m, 3, **{"refresh.planning_folder": f"igptcount://{plan_dir}"}).summary
    assert (s["new"], s["changed"], s["unchanged"]) == (1, 1, 6)
    seen = [(t, op, p[len(str(plan_dir)) + len("/_planning/"):]) for t, op, p in CountingFS.seen if t]
    assert {t.split(":")[0] for t, _, _ in seen} == {"split_manifest", "split_current", "stat_bucket", "decide_bucket"}
    for task, op, path in seen:
        kind, b = task.split(":")
        if kind.startswith("split"):  # writes its own parts, reads nothing of the planning folder
            assert op == "write" and path.startswith(("manifest/bucket=", "current/bucket=")), (task, op, path)
        elif op == "write":
            assert path.startswith("stat/bucket=") and f"/part-{int(b):06d}-" in path, (task, path)
        else:  # stat task b reads only manifest/bucket=b, decide task b only stat/bucket=b and current/bucket=b
            mine = ("manifest",) if kind == "stat_bucket" else ("stat", "current")
            assert path.split("/bucket=")[0] in mine and path.split("/")[1] == f"bucket={int(b):05d}", (task, op, path)
    written = [p for _, op, p in seen if op == "write"]
    assert len(written) == len(set(written)) and any(p.startswith("stat/") for p in written)  # each part one put
    assert not plan_dir.joinpath("_planning").exists()


def test_planning_in_tasks_on_s3(s3_server, tiny_ckpt, tmp_path, ray_local):
    """The store, the manifest (two files) and the images on SeaweedFS: a night planned in buckets of Ray tasks
    decides as the night in one; the planning files are in the bucket only while it plans."""
    from igpt_batch.store.refresh import read_current, refresh

    fs, names = test_refresh.photos_on_s3(s3_server, tmp_path / "img", "igpt-plan/images")
    csv = lambda ids: ("id,uri\n" + "".join(f"{n},s3://igpt-plan/images/{n}\n" for n in ids)).encode()  # noqa: E731
    fs.pipe_file("igpt-plan/m/a.csv", csv(names[:2]))
    fs.pipe_file("igpt-plan/m/b.csv", csv(names[2:]))
    so = s3_server.storage_options()
    cfg = cfg_for(tiny_ckpt, "s3://igpt-plan/store", "s3://igpt-plan/m", storage_options=so,
                  **{"refresh.plan_bucket_rows": 2, "run.executor": "ray"})  # CSVs: rows guessed, 4 buckets
    s1 = refresh(cfg)
    assert (s1["new"], s1["computed"]) == (4, 4)
    assert sorted(read_current("s3://igpt-plan/store", so).column("id").to_pylist()) == sorted(names)
    fs.pipe_file("igpt-plan/m/b.csv", csv(names[:1]))  # a duplicate of a.csv's first id
    from igpt_batch.errors import ManifestError

    with pytest.raises(ManifestError, match=f"has 1 duplicate ids \\(e.g. '{names[0]}'\\)"):
        refresh(cfg)
    fs.pipe_file("igpt-plan/m/b.csv", csv(names[2:]))
    s2 = refresh(cfg)
    assert (s2["unchanged"], s2["computed"], s2["precheck"], s2["stat"]) == (4, 0, {"etag": 4, "hashed": 0},
                                                                           {"lists": 1, "heads": 0})
    from igpt_batch.model import checkpoint
    from igpt_batch.store.refresh import start_night

    night = start_night(cfg, Store("s3://igpt-plan/store", so), s1["version"], checkpoint.read_info(tiny_ckpt), [2])
    assert len(night.plan.buckets) == 4 and night.summary["unchanged"] == 4  # 4 buckets: in tasks, not here
    fs.invalidate_cache()
    left = fs.find(f"igpt-plan/store/{s1['version']}/_planning", detail=True)
    assert [k for k, v in left.items() if v["type"] != "directory"] == []


def test_a_planning_task_that_fails_is_a_job_error_naming_why(one_night, ray_local):
    """Not a manifest error: the planning folder cannot be written (a file is in its way). The Ray task's error
    reaches the driver as a JobError with its type and message, not the task's traceback."""
    from igpt_batch.errors import JobError

    o = one_night
    (o["tmp"] / "in-the-way").write_text("a file, not a folder")
    m = _split_manifest(o, o["names"], o["tmp"] / "m")
    why = r"^refresh planning failed in a task \((NotADirectoryError|FileExistsError): "
    with pytest.raises(JobError, match=why) as e:
        _plan(o, m, 2, "ray", **{"refresh.planning_folder": str(o["tmp"] / "in-the-way")})
    assert "Traceback" not in str(e.value) and (o["tmp"] / "in-the-way").read_text() == "a file, not a folder"
