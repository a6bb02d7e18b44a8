"""Nightly refresh, for real: three nights over real photos, a version change, a SIGKILLed night, and a night on S3."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, S3Server, job_cfg, real_photos, write_manifest

from igpt_batch import config
from igpt_batch.cli import build_parser, config_from_args, main
from igpt_batch.inspector import inspect
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.layout import Store
from igpt_batch.store.refresh import read_current, refresh

IGPT = str(Path(sys.executable).parent / "igpt-batch")


def photos(d: Path, scale: int = 1, quality: int = 90) -> list[str]:
    """Eight real photos re-encoded at different sizes: <name>.jpg and <name>-small.png."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (name, arr) in enumerate(real_photos().items()):
        img = Image.fromarray(arr)
        img.resize(((96 + 16 * i) * scale, (72 + 8 * i) * scale)).save(d / f"{name}.jpg", quality=quality)
        img.resize(((48 + 8 * i) * scale, (40 + 4 * i) * scale)).save(d / f"{name}-small.png")
        names += [f"{name}.jpg", f"{name}-small.png"]
    return names


def manifest(path: Path, d: Path, names: list[str]) -> str:
    return str(write_manifest(path, [str(d / n) for n in names], names))


cfg_for = functools.partial(job_cfg, keys=("refresh.store", "input.manifest"),  # (ckpt, store, manifest, **over)
                            **{"run.executor": "local", "run.shard_size": 3, "extract.layers": [2]})


def by_id(t) -> dict:
    return {r["id"]: r for r in t.to_pylist()}


def one_version(store: Path) -> Path:
    (v,) = store.glob("v-*")
    return v


def table_of(store: Path):
    st = Store(str(store))
    return st.open(st.resolve(None))


def test_three_nights_new_changed_touched_deleted(tiny_ckpt, tmp_path):
    d = tmp_path / "img"
    names = photos(d)
    m1 = manifest(tmp_path / "m1.parquet", d, names)
    mark, drop = tmp_path / "store", tmp_path / "store-drop"

    # night 1: everything is new
    s1 = refresh(cfg_for(tiny_ckpt, mark, m1))
    assert set(s1["computed_ids"]) == set(names) and (s1["new"], s1["computed"], s1["errors"]) == (8, 8, 0)
    d1 = refresh(cfg_for(tiny_ckpt, drop, m1, **{"refresh.deleted": "drop"}))
    v = one_version(mark)
    cur1 = by_id(read_current(str(mark)))
    assert set(cur1) == set(names) and all(r["snapshot"] == s1["snapshot"] and not r["deleted"] for r in cur1.values())
    assert json.loads((v / "_version.json").read_text())["layers"] == [2]
    lance1 = table_of(mark).version
    assert set(table_of(mark).tags.list()) == {s1["snapshot"]} and Store(str(mark)).pending(v.name) is None

    # night 2: nothing touched -> nothing embedded, nothing written
    s2 = refresh(cfg_for(tiny_ckpt, mark, m1))
    assert s2["computed"] == 0 and s2["snapshot"] is None and s2["message"] == "nothing to embed: 8 rows unchanged"
    assert s2["precheck"] == {"size_mtime": 8, "hashed": 0} and s2["pruned"] == []
    assert table_of(mark).version == lance1 and len(list((v / "snapshots").iterdir())) == 1

    # night 3: 2 new rows, 1 new content, 1 rewritten with the same bytes (new mtime), 1 gone from the manifest
    from PIL import Image

    old = Image.open(d / "coffee-small.png")
    Image.fromarray(np.asarray(old)[::-1, ::-1].copy()).save(d / "coffee-small.png")  # different pixels, same size
    same = (d / "chelsea.jpg").read_bytes()
    (d / "chelsea.jpg").write_bytes(same)
    t = time.time() + 60
    os.utime(d / "chelsea.jpg", (t, t))
    Image.fromarray(real_photos()["astronaut"]).resize((40, 40)).save(d / "astronaut-tiny.jpg", quality=80)
    Image.fromarray(real_photos()["rocket"]).resize((90, 30)).save(d / "rocket-wide.png")
    names3 = [n for n in names if n != "rocket.jpg"] + ["astronaut-tiny.jpg", "rocket-wide.png"]
    m3 = manifest(tmp_path / "m3.parquet", d, names3)
    s3 = refresh(cfg_for(tiny_ckpt, mark, m3))
    assert set(s3["computed_ids"]) == {"astronaut-tiny.jpg", "rocket-wide.png", "coffee-small.png"}
    assert (s3["new"], s3["changed"], s3["unchanged"], s3["deleted"], s3["errors"]) == (2, 1, 6, 1, 0)
    assert s3["precheck"] == {"size_mtime": 5, "hashed": 2, "hash_unchanged": 1}  # chelsea: same sha, not recomputed
    assert s3["extract"]["shards"] == 1 and (v / "snapshots" / s3["snapshot"] / "_SUCCESS").exists()
    # one data commit a night (the tag's); the nightly index upkeep (store/index.py) is one more table version
    assert s3["snapshot"] > s1["snapshot"] and table_of(mark).tags.list()[s3["snapshot"]]["version"] == lance1 + 1
    assert table_of(mark).version == lance1 + 2
    cur3 = by_id(read_current(str(mark), include_deleted=True))
    assert cur3["rocket.jpg"]["deleted"] and "rocket.jpg" not in by_id(read_current(str(mark)))
    assert cur3["chelsea.jpg"]["snapshot"] == s1["snapshot"] and cur3["chelsea.jpg"]["mtime"] != cur1["chelsea.jpg"]["mtime"]
    assert {k: r["snapshot"] for k, r in cur3.items() if r["snapshot"] == s3["snapshot"]}.keys() == set(s3["computed_ids"])
    for k in set(names) - {"coffee-small.png"}:
        assert cur3[k]["embedding"] == cur1[k]["embedding"] and cur3[k]["sha256"] == cur1[k]["sha256"]  # bit-identical
    new_emb = np.asarray(cur3["coffee-small.png"]["embedding"], np.float32)
    assert not np.allclose(new_emb, cur1["coffee-small.png"]["embedding"], atol=1e-3)
    fresh = run_job(config.load(None, {"model.name": tiny_ckpt, "run.executor": "local", "extract.layers": [2],
                                       "input.manifest": manifest(tmp_path / "one.parquet", d, ["coffee-small.png"]),
                                       "output.path": str(tmp_path / "fresh")}), "extract")
    assert fresh["rows"]["embeddings"] == 1
    np.testing.assert_allclose(new_emb, read_output(str(tmp_path / "fresh")).column("embedding")[0].as_py(), rtol=1e-5, atol=1e-6)
    # time travel: night 1 as it was, by its snapshot id
    assert by_id(read_current(str(mark), snapshot=s1["snapshot"], include_deleted=True)) == cur1
    ds = table_of(mark)
    assert (ds.count_rows(), ds.count_rows("deleted = true"), s3["live_rows"]) == (10, 1, 9)
    meta = ds.schema.metadata
    assert meta[b"layers"] == b"2" and ds.schema.field("embedding").type.list_size == 32
    assert meta[b"version"] == v.name.encode() and meta[b"weights_fingerprint"] and meta[b"model"] == tiny_ckpt.encode()
    assert not (v / "_night").exists() and not (v / "manifests").exists()  # the night manifest held fetchable uris
    (rec,) = [r for r in Store(str(mark)).night_summaries(v.name) if (r.get("summary") or {}).get("snapshot") == s3["snapshot"]]
    assert rec["status"] == "ok" and rec["summary"]["computed"] == 3 and rec["started_at"] < rec["ended_at"]

    s3d = refresh(cfg_for(tiny_ckpt, drop, m3, **{"refresh.deleted": "drop"}))
    assert (s3d["deleted"], s3d["dropped"], s3d["computed"]) == (1, 1, 3)
    assert "rocket.jpg" not in by_id(read_current(str(drop), include_deleted=True)) and len(read_current(str(drop))) == 9

    # night 4: the deleted id comes back with the same bytes -> revived without the model
    names4 = names3 + ["rocket.jpg"]
    m4 = manifest(tmp_path / "m4.parquet", d, names4)
    s4 = refresh(cfg_for(tiny_ckpt, mark, m4))
    assert (s4["computed"], s4["revived"], s4["deleted"], s4["current_rows"], s4["live_rows"]) == (0, 1, 0, 10, 10)
    assert not (v / "snapshots" / s4["snapshot"]).exists()  # metadata-only night: no model run
    cur4 = by_id(read_current(str(mark)))
    assert not cur4["rocket.jpg"]["deleted"] and cur4["rocket.jpg"]["embedding"] == cur1["rocket.jpg"]["embedding"]

    # night 5: a known image becomes unreadable and a new one is broken: the old row stays (stale), the new one is
    # absent, both are reported and recorded; night 6 does not retry them (their sources did not change) unless
    # --retry-errors (night 7)
    (d / "astronaut.jpg").write_bytes((d / "astronaut.jpg").read_bytes()[:300])
    (d / "text.jpg").write_text("not an image")
    m5 = manifest(tmp_path / "m5.parquet", d, names4 + ["text.jpg"])
    s5 = refresh(cfg_for(tiny_ckpt, mark, m5))
    assert set(s5["computed_ids"]) == set(s5["failed_ids"]) == {"astronaut.jpg", "text.jpg"} and s5["errors"] == 2
    cur5 = by_id(read_current(str(mark)))
    assert "text.jpg" not in cur5 and cur5["astronaut.jpg"] == cur1["astronaut.jpg"]  # stale but present
    failed = Store(str(mark)).read_failed(v.name).to_pylist()
    assert {(r["id"], r["first_night"], r["last_night"]) for r in failed} == {(i, s5["snapshot"], s5["snapshot"]) for i in ("astronaut.jpg", "text.jpg")}
    assert all(r["size"] and r["mtime"] and r["stage"] and r["reason"] for r in failed)
    s6 = refresh(cfg_for(tiny_ckpt, mark, m5))
    assert (s6["computed"], s6["failed_unchanged"], s6["snapshot"]) == (0, 2, None)
    assert s6["message"] == "nothing to embed: 9 rows unchanged"
    cfg7 = cfg_for(tiny_ckpt, mark, m5)
    cfg7.refresh.retry_errors = True
    s7 = refresh(cfg7)
    assert set(s7["failed_ids"]) == {"astronaut.jpg", "text.jpg"}
    failed = Store(str(mark)).read_failed(v.name).to_pylist()
    assert {(r["first_night"], r["last_night"]) for r in failed} == {(s5["snapshot"], s7["snapshot"])}

    # retention (refresh.keep_current = 3): each night past the third drops the oldest night's tag and Lance removes
    # what only it used; the snapshots of what was computed all stay
    assert [s["pruned"] for s in (s1, s3, s4, s5, s7)] == [[], [], [], [s1["snapshot"]], [s3["snapshot"]]]
    assert sorted(table_of(mark).tags.list()) == [s4["snapshot"], s5["snapshot"], s7["snapshot"]]
    with pytest.raises(Exception):
        read_current(str(mark), snapshot=s1["snapshot"])
    assert sorted(p.name for p in (v / "snapshots").iterdir()) == sorted([s1["snapshot"], s3["snapshot"], s5["snapshot"], s7["snapshot"]])
    # `igpt-batch inspect STORE` says the same, and --verify checks the table's files and kept nights
    lines = []
    assert inspect(str(mark), verify=True, echo=lines.append) == 0
    text = "\n".join(lines)
    assert f"latest:      {v.name}  snapshot {s7['snapshot']}" in text
    assert f"current:   {s7['snapshot']}: 10 rows, 10 live, 0 deleted" in text
    assert f"nights:    3 kept as tags ({s4['snapshot']}, {s5['snapshot']}, {s7['snapshot']})" in text
    assert "snapshots: 4, newest" in text and "failed:    2 rows not embedded" in text and lines[-1] == "verify: ok"
    (data,) = [f for f in (v / "current.lance" / "data").iterdir() if f.name.startswith(table_of(mark).get_fragments()[0].data_files()[0].path)]
    data.unlink()
    assert main(["inspect", str(mark), "--verify"]) == 1
    # keep_current = 1 keeps only the last night
    s3k = refresh(cfg_for(tiny_ckpt, drop, m4, **{"refresh.deleted": "drop", "refresh.keep_current": 1}))
    assert s3k["pruned"] == [d1["snapshot"], s3d["snapshot"]] and list(table_of(drop).tags.list()) == [s3k["snapshot"]]
    assert len(read_current(str(drop))) == 10


def test_changing_layers_starts_a_new_version(tiny_ckpt, tmp_path):
    d = tmp_path / "img"
    names = photos(d)[:4]
    m = manifest(tmp_path / "m.parquet", d, names)
    store = tmp_path / "store"
    s1 = refresh(cfg_for(tiny_ckpt, store, m))
    old = one_version(store)
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    s2 = refresh(cfg_for(tiny_ckpt, store, m, **{"extract.layers": [1, 3]}))
    assert s2["version"] != s1["version"] and s2["computed"] == 4 and set(s2["computed_ids"]) == set(names)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before  # the old version is untouched
    latest, first = read_current(str(store)), read_current(str(store), version=s1["version"])
    assert latest.schema.metadata[b"layers"] == b"1,3" and latest.schema.field("embedding").type.list_size == 64
    assert first.schema.metadata[b"layers"] == b"2" and first.num_rows == latest.num_rows == 4
    assert json.loads((store / "_LATEST.json").read_text())["version"] == s2["version"]


def test_killed_night_resumes_the_same_snapshot(tiny_ckpt, tmp_path, capsys):
    d = tmp_path / "img"
    files = photos(d, scale=20)  # big sources: each one-row shard takes a while to decode
    names = [f"{k}/{n}" for k in range(3) for n in files]  # 24 rows (ids unique, each file listed 3 times)
    m = str(write_manifest(tmp_path / "m.parquet", [str(d / n.split("/", 1)[1]) for n in names], names))
    store = tmp_path / "store"
    args = ["refresh", "--model", tiny_ckpt, "--manifest", m, "--store", str(store), "--layer", "2", "--shard-size", "1",
            "--batch-size", "1", "--executor", "local"]
    proc = subprocess.Popen([IGPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(store.glob("v-*/snapshots/*/_commits/*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    v = one_version(store)
    pending = Store(str(store)).pending(v.name)["snapshot"]
    snap = OutputFolder(str(v / "snapshots" / pending))
    before = snap.committed()
    assert 1 <= len(before) < 24 and not (v / "current.lance").exists()  # readers see no half-written night
    crashed = tmp_path / "crashed"
    shutil.copytree(store, crashed)  # the killed state, for the second half below
    lines = []
    assert inspect(str(store), echo=lines.append) == 0
    assert "  current:   none yet (no night has finished)" in lines
    assert f"  in flight: snapshot {pending} (24 rows to embed); a rerun resumes it" in lines
    capsys.readouterr()
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["snapshot"] == pending and s["computed"] == 24 and Store(str(store)).pending(v.name) is None
    done = json.loads((v / "snapshots" / pending / "_SUCCESS").read_text())
    assert done["shards_skipped"] == len(before) > 0 and done["shards_run"] == 24 - len(before)
    assert all(snap.committed()[k] == rec for k, rec in before.items())  # committed shards were not recomputed
    assert sorted(read_current(str(store)).column("id").to_pylist()) == sorted(names)  # exactly the manifest's ids
    # the same killed night, rerun after the manifest changed (7 rows): the snapshot cannot be resumed and is
    # recomputed from scratch under the same id, and the table holds exactly the new manifest's ids
    m7 = str(write_manifest(tmp_path / "m7.parquet", [str(d / n) for n in files[:7]], names[:7]))
    s = refresh(cfg_for(tiny_ckpt, crashed, m7, **{"run.shard_size": 1}))
    assert s["snapshot"] == pending and s["extract"]["shards_skipped"] == 0 and s["extract"]["shards_run"] == 7
    assert sorted(read_current(str(crashed), include_deleted=True).column("id").to_pylist()) == sorted(names[:7])


def photos_on_s3(s3_server: S3Server, d: Path, folder: str) -> tuple[object, list[str]]:
    """Four of the photos, uploaded to s3://<folder>/<name> (the bucket made first): (the filesystem, names)."""
    fs = s3_server.fs()
    fs.mkdir(folder.split("/")[0])
    names = photos(d)[:4]
    for n in names:
        fs.put_file(str(d / n), f"{folder}/{n}")
    return fs, names


def test_s3_second_night_is_decided_by_etag(s3_server: S3Server, tiny_ckpt, tmp_path):
    d = tmp_path / "img"
    fs, names = photos_on_s3(s3_server, d, "igpt-refresh/images")
    fs.pipe_file("igpt-refresh/manifest.csv", ("id,uri\n" + "".join(f"{n},images/{n}\n" for n in names)).encode())
    so = s3_server.storage_options()
    cfg = cfg_for(tiny_ckpt, "s3://igpt-refresh/store", "s3://igpt-refresh/manifest.csv", storage_options=so)
    s1 = refresh(cfg)
    assert s1["computed"] == 4 and s1["precheck"] == {"hashed": 0}
    current = read_current("s3://igpt-refresh/store", so)
    assert set(current.column("id").to_pylist()) == set(names) and all(e for e in current.column("etag").to_pylist())
    lance1 = table_of_url("s3://igpt-refresh/store", so).version
    s2 = refresh(cfg)
    assert (s2["computed"], s2["snapshot"], s2["precheck"]) == (0, None, {"etag": 4, "hashed": 0})  # no bytes read
    assert s2["stat"] == {"lists": 1, "heads": 0}  # one LIST for the prefix, no HEAD per row
    cfg.refresh.plan_bucket_rows = 2  # the same night planned in 2 buckets, through planning files in the bucket
    s2b = refresh(cfg)
    assert (s2b["computed"], s2b["snapshot"], s2b["precheck"]) == (0, None, {"etag": 4, "hashed": 0})
    fs.invalidate_cache()
    left = fs.find(f"igpt-refresh/store/{s1['version']}/_planning", detail=True)
    assert [k for k, v in left.items() if v["type"] != "directory"] == []  # planning files removed
    cfg.refresh.plan_bucket_rows = 250_000
    assert table_of_url("s3://igpt-refresh/store", so).version == lance1
    time.sleep(1.1)
    fs.put_file(str(d / names[0]), f"igpt-refresh/images/{names[0]}")  # same bytes: new LastModified, same ETag
    cfg.refresh.keep_current = 1
    s3 = refresh(cfg)
    assert (s3["computed"], s3["metadata_updates"], s3["precheck"]) == (0, 1, {"etag": 4, "hashed": 0})
    assert s3["pruned"] == [s1["snapshot"]]  # the first night's tag, and what only it used, removed from the bucket
    assert list(table_of_url("s3://igpt-refresh/store", so).tags.list()) == [s3["snapshot"]]
    vprefix = f"igpt-refresh/store/{s1['version']}"
    fs.invalidate_cache()
    assert fs.exists(f"{vprefix}/snapshots/{s1['snapshot']}/_SUCCESS")
    assert not fs.exists(f"{vprefix}/snapshots/{s3['snapshot']}")  # no model run
    after = read_current("s3://igpt-refresh/store", so)
    emb = lambda t: {r["id"]: r["embedding"] for r in t.select(["id", "embedding"]).to_pylist()}  # noqa: E731
    assert emb(after) == emb(current)
    lines = []
    assert inspect("s3://igpt-refresh/store", verify=True, storage_options=so, echo=lines.append) == 0, lines


def table_of_url(url, so):
    st = Store(url, so)
    return st.open(st.resolve(None))


def test_cli_flags_config_and_k8s_manifest():
    args = build_parser().parse_args(["refresh", "--manifest", "m.csv", "--store", "s3://b/store", "--deleted", "drop",
                                      "--layer", "18", "--batch-size", "8", "--dtype", "bf16"])
    cfg = config_from_args(args, "refresh")
    assert (cfg.refresh.store, cfg.refresh.deleted, cfg.extract.layers, cfg.extract.batch_size) == ("s3://b/store", "drop", [18], 8)
    with pytest.raises(config.ConfigError, match="refresh.deleted"):
        config.load(None, {"refresh.deleted": "purge"})
    cfg = config.load(str(REPO / "configs" / "nightly-refresh.yaml"))
    assert cfg.refresh.store.startswith("s3://") and cfg.model.name == "openai/imagegpt-medium"
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "rayjob-nightly-refresh.yaml").read_text()))
    kinds = [doc["kind"] for doc in docs if doc]
    assert "CronJob" in kinds
    cron = next(doc for doc in docs if doc and doc["kind"] == "CronJob")
    assert cron["spec"]["schedule"] == "0 3 * * *"
    cm = next(doc for doc in docs if doc and doc["kind"] == "ConfigMap")
    rayjob = yaml.safe_load(cm["data"]["rayjob.yaml"])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    (gpu,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "jobs/nightly_refresh.py" in rayjob["spec"]["entrypoint"] and "runtimeEnvYAML" not in rayjob["spec"]  # the image has it all
    text = json.dumps(docs)
    assert "/igpt-batch:0.1.0-gpu" in text and "jobs/nightly_refresh.py" in text and "RAY_AUTH_MODE" in text


def test_snapshot_ids_sort_after_the_previous_night_even_with_a_clock_behind(tmp_path, monkeypatch):
    import datetime as dt

    import igpt_batch.store.refresh as R

    class Kept(Store):
        last = {}

        def kept_snapshots(self, version):
            return self.last

    store = Kept(str(tmp_path))
    monkeypatch.setattr(R, "_now", lambda: dt.datetime(2026, 11, 27, 3, 15, tzinfo=dt.timezone.utc))
    assert R._snapshot_id(store, "v-x") == "20261127T031500Z"
    store.last = {"20261127T031459Z": 1}
    assert R._snapshot_id(store, "v-x") == "20261127T031500Z"
    (tmp_path / "v-x" / "snapshots" / "20261127T031500Z").mkdir(parents=True)  # taken by a killed attempt
    assert R._snapshot_id(store, "v-x") == "20261127T031501Z"
    # the previous night ran on a clock three years ahead: the next id follows it at once, no walk through time
    store.last = {"20291231T235959Z": 1}
    assert R._snapshot_id(store, "v-x") == "20300101T000000Z"


# -- the five steps, one by one -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_night(tiny_ckpt, tmp_path_factory):
    """One night over 8 real photos, run once per module: img/ (restored from pristine/ for each test) and store/."""
    from igpt_batch.model import checkpoint
    from igpt_batch.store.refresh import version_of

    base = tmp_path_factory.mktemp("one-night")
    names = photos(base / "pristine")
    shutil.copytree(base / "pristine", base / "img")  # copy2: the same mtimes, to the nanosecond
    refresh(cfg_for(tiny_ckpt, base / "store", manifest(base / "m1.parquet", base / "img", names)))
    info = checkpoint.read_info(tiny_ckpt)
    version, _ = version_of(cfg_for(tiny_ckpt, base / "store", "m"), info)
    return {"base": base, "names": names, "info": info, "version": version, "ckpt": tiny_ckpt}


@pytest.fixture
def one_night(first_night, tmp_path):
    """A copy of the store after the first night, its photos as that night saw them, and the pieces a step needs.
    The table records the photos' paths, so they are restored in place (a test may change them); the store is
    copied (its paths are relative)."""
    o = dict(first_night)
    d = o["base"] / "img"
    shutil.rmtree(d)
    shutil.copytree(o["base"] / "pristine", d)
    shutil.copytree(o["base"] / "store", tmp_path / "store")
    return o | {"d": d, "store": tmp_path / "store", "tmp": tmp_path}


def _night3(o):
    """Night 3's changes of the end-to-end test: one new content, one gone, two new, one touched."""
    from PIL import Image

    d = o["d"]
    Image.fromarray(np.asarray(Image.open(d / "coffee-small.png"))[::-1].copy()).save(d / "coffee-small.png")
    t = time.time() + 60
    os.utime(d / "chelsea.jpg", (t, t))
    Image.fromarray(real_photos()["rocket"]).resize((90, 30)).save(d / "rocket-wide.png")
    names = [n for n in o["names"] if n != "rocket.jpg"] + ["rocket-wide.png"]
    return manifest(o["tmp"] / "m3.parquet", d, names)


def test_step_run_extract_counts_errors_against_the_whole_manifest(one_night):
    from igpt_batch.errors import JobError
    from igpt_batch.store.refresh import run_extract, start_night

    o = one_night
    (o["d"] / "broken.jpg").write_text("not an image")
    m = manifest(o["tmp"] / "m2.parquet", o["d"], o["names"] + ["broken.jpg"])
    store = Store(str(o["store"]))
    night = start_night(cfg_for(o["ckpt"], o["store"], m), store, o["version"], o["info"], [2])
    run_extract(cfg_for(o["ckpt"], o["store"], m, **{"run.max_error_fraction": 0.2}), night)  # 1 of 9 rows: fine
    assert night.errors.column("id").to_pylist() == ["broken.jpg"]
    with pytest.raises(JobError, match="1 of 9 manifest rows failed"):
        run_extract(cfg_for(o["ckpt"], o["store"], m, **{"run.max_error_fraction": 0.1}), night)


def test_steps_merge_publish_prune(one_night):
    from igpt_batch.store.merge import merge
    from igpt_batch.store.refresh import prune, publish, run_extract, start_night

    o = one_night
    cfg = cfg_for(o["ckpt"], o["store"], _night3(o), **{"refresh.keep_current": 1})
    store = Store(str(o["store"]))
    before = by_id(read_current(str(o["store"])))
    night = start_night(cfg, store, o["version"], o["info"], [2])
    run_extract(cfg, night)
    reader, drop_ids = merge(cfg, night)
    rows = by_id(reader.read_all())
    assert drop_ids is None and sorted(rows) == ["chelsea.jpg", "coffee-small.png", "rocket-wide.png", "rocket.jpg"]
    assert rows["rocket.jpg"]["deleted"] and rows["rocket.jpg"]["embedding"] == before["rocket.jpg"]["embedding"]
    assert rows["chelsea.jpg"]["mtime"] != before["chelsea.jpg"]["mtime"] and rows["chelsea.jpg"]["sha256"] == before["chelsea.jpg"]["sha256"]
    assert rows["rocket-wide.png"]["snapshot"] == night.snapshot
    first = list(store.kept_snapshots(o["version"]))
    publish(cfg, night, *merge(cfg, night))
    assert list(store.kept_snapshots(o["version"])) == first + [night.snapshot] and night.summary["live_rows"] == 8
    prune(cfg, night)
    assert night.summary["pruned"] == first and list(store.kept_snapshots(o["version"])) == [night.snapshot]
