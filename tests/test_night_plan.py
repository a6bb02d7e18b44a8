"""A night's plan (store/night_plan.py, store/decide.py): every manifest row decided against the current table, in
the driver or in two rounds of bucket tasks, with the same answer."""
import pyarrow as pa
import test_refresh
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
