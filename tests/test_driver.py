"""End-to-end jobs through the driver: in-process and on a real local Ray, resume, and config refusal."""
import functools

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import job_cfg, write_manifest

from igpt_batch.errors import JobError
from igpt_batch.inputs import images
from igpt_batch.model import palette
from igpt_batch.model.loading import load_model
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder

cfg_for = functools.partial(job_cfg, **{"run.shard_size": 4, "extract.batch_size": 3})  # (ckpt, out, **over)


@pytest.fixture(scope="module")
def manifest(image_dir, tmp_path_factory):
    uris = sorted(str(p) for p in image_dir.iterdir())  # 8 good images, 2 broken
    return str(write_manifest(tmp_path_factory.mktemp("m") / "m.parquet", uris, [f"img{i}" for i in range(len(uris))]))


def expected_features(ckpt, uris, layers):
    model = load_model(ckpt, "fp32", "cpu")
    rgb = np.stack([images.load_rgb(u, model.n_px)[0] for u in uris])
    with torch.inference_mode():
        return model.features(torch.from_numpy(palette.tokenize(rgb, model.clusters)), layers).numpy()


def test_extract_on_local_ray_with_errors_resume_and_readers(ray_local, tiny_ckpt, manifest, tmp_path):
    out = tmp_path / "out"
    cfg = cfg_for(tiny_ckpt, out, **{"input.manifest": manifest, "extract.layers": [1, 3], "run.workers": 2,
                                     "run.cpus_per_worker": 0.5, "output.preview": 3})
    summary = run_job(cfg, "extract")
    assert summary["shards"] == 3 and summary["shards_run"] == 3
    assert summary["rows"] == {"embeddings": 8, "errors": 2}
    assert sum(summary["errors_by_reason"].values()) == 2
    emb = read_output(str(out), "embeddings").sort_by("id")
    assert emb.num_rows == 8 and emb.schema.field("embedding").type.list_size == 2 * 32
    meta = emb.schema.metadata
    assert meta[b"layers"] == b"1,3" and meta[b"palette_hash"] and meta[b"weights_fingerprint"]
    want = expected_features(tiny_ckpt, emb.column("uri").to_pylist(), [1, 3])
    np.testing.assert_allclose(np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)), want, atol=1e-5)
    errs = read_output(str(out), "errors")
    assert sorted(p.rsplit("/", 1)[-1] for p in errs.column("uri").to_pylist()) == ["text.jpg", "truncated.jpg"]
    assert set(errs.column("stage").to_pylist()) == {"decode"}
    # sizes are of the source image
    sizes = dict(zip(emb.column("uri").to_pylist(), zip(emb.column("width").to_pylist(), emb.column("height").to_pylist())))
    assert sizes[[u for u in sizes if u.endswith("astronaut.jpg")][0]] == (512, 512)
    # standard readers see the same rows directly
    assert len(pd.read_parquet(out / "embeddings")) == 8
    assert duckdb.sql(f"select count(*) from '{out}/embeddings/*.parquet'").fetchall()[0][0] == 8
    assert (out / "_SUCCESS").exists() and (out / "preview.png").exists() and not (out / "_plan").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # a rerun recomputes nothing; removing one commit marker recomputes exactly that shard
    commits = OutputFolder(str(out)).committed()
    again = run_job(cfg, "extract")
    assert (again["shards_skipped"], again["shards_run"]) == (3, 0)
    (out / "_commits" / "part-00001.json").unlink()
    again = run_job(cfg, "extract")
    assert (again["shards_skipped"], again["shards_run"]) == (2, 1)
    after = OutputFolder(str(out)).committed()
    assert after["part-00000"] == commits["part-00000"] and after["part-00002"] == commits["part-00002"]
    assert read_output(str(out), "embeddings").num_rows == 8  # replaced, not appended

    # an incompatible rerun refuses, naming what changed; --overwrite replaces
    with pytest.raises(JobError, match="layers"):
        run_job(cfg_for(tiny_ckpt, out, **{"input.manifest": manifest, "extract.layers": [2], "run.executor": "local"}), "extract")
    s = run_job(cfg_for(tiny_ckpt, out, **{"input.manifest": manifest, "extract.layers": [2], "run.executor": "local",
                                             "output.overwrite": True}), "extract")
    assert s["shards_run"] == 3 and read_output(str(out), "embeddings").schema.metadata[b"layers"] == b"2"


def test_generate_same_seeds_same_images_across_workers_batches_and_shards(ray_local, tiny_ckpt, tmp_path):
    common = {"generate.num_samples": 10, "generate.seed": 100, "generate.temperature": 1.0, "generate.top_k": 8}
    a = run_job(cfg_for(tiny_ckpt, tmp_path / "a", **common, **{"run.executor": "local", "generate.batch_size": 3,
                                                                  "run.shard_size": 4, "output.contact_sheet": 6}), "generate")
    b = run_job(cfg_for(tiny_ckpt, tmp_path / "b", **common, **{"run.workers": 2, "run.cpus_per_worker": 0.5,
                                                                  "generate.batch_size": 8, "run.shard_size": 5,
                                                                  "output.write_png_files": True}), "generate")
    assert a["rows"]["samples"] == b["rows"]["samples"] == 10
    ta, tb = (read_output(str(tmp_path / x), "samples").sort_by("seed") for x in "ab")
    assert ta.column("seed").to_pylist() == list(range(100, 110))
    assert ta.column("tokens").to_pylist() == tb.column("tokens").to_pylist()
    assert ta.column("png").to_pylist() == tb.column("png").to_pylist()
    assert (tmp_path / "a" / "contact_sheet.png").exists()
    assert (tmp_path / "b" / "pngs" / "seed-000000000105.png").read_bytes() == tb.column("png")[5].as_py()
    tokens = np.array(ta.column("tokens").to_pylist())
    assert tokens.shape == (10, 64) and tokens.max() < 16 and len({tuple(t) for t in tokens}) > 1


def test_complete_keeps_the_prompt_rows(tiny_ckpt, image_dir, tmp_path):
    uris = [str(image_dir / n) for n in ("astronaut.jpg", "coffee-small.png", "text.jpg")]
    manifest = write_manifest(tmp_path / "m.parquet", uris, ["astro", "coffee", "bad"])
    cfg = cfg_for(tiny_ckpt, tmp_path / "c", **{"input.manifest": str(manifest), "run.executor": "local",
                                                 "generate.prompt_rows": 3, "generate.samples_per_image": 3,
                                                 "generate.batch_size": 4, "output.contact_sheet": 4})
    s = run_job(cfg, "complete")
    assert s["rows"] == {"samples": 6, "errors": 1}
    t = read_output(str(tmp_path / "c"), "samples")
    model = load_model(tiny_ckpt, "fp32", "cpu")
    for pid, uri in (("astro", uris[0]), ("coffee", uris[1])):
        prompt = palette.tokenize(images.load_rgb(uri, 8)[0], model.clusters)[:24]
        rows = [r for r in t.to_pylist() if r["prompt_id"] == pid]
        assert sorted(r["sample_index"] for r in rows) == [0, 1, 2]
        for r in rows:
            assert r["tokens"][:24] == prompt.tolist()
    assert len({r["seed"] for r in t.to_pylist()}) == 6
    assert (tmp_path / "c" / "contact_sheet.png").exists()


def test_bad_manifest_and_layers_fail_before_any_work(tiny_ckpt, tmp_path):
    from igpt_batch.errors import ConfigError, ManifestError

    (tmp_path / "m.csv").write_text("id,path\na,b\n")
    with pytest.raises(ManifestError, match="uri"):
        run_job(cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(tmp_path / "m.csv")}), "extract")
    with pytest.raises(ConfigError, match="extract.layers"):
        run_job(cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(tmp_path / "m.csv"), "extract.layers": [9]}), "extract")
    assert not (tmp_path / "o").exists()  # nothing written


def test_max_error_fraction_fails_but_keeps_commits(tiny_ckpt, image_dir, tmp_path):
    uris = [str(image_dir / n) for n in ("astronaut.jpg", "text.jpg", "truncated.jpg")]
    manifest = write_manifest(tmp_path / "m.parquet", uris)
    cfg = cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(manifest), "run.executor": "local",
                                                 "run.max_error_fraction": 0.5, "run.shard_size": 1})
    with pytest.raises(JobError, match="2 of 3 input rows failed"):
        run_job(cfg, "extract")
    assert read_output(str(tmp_path / "o"), "embeddings").num_rows == 1
    assert (tmp_path / "o" / "_FAILED").exists() and not (tmp_path / "o" / "_SUCCESS").exists()


def test_resumed_generation_gives_the_same_images(tiny_ckpt, tmp_path):
    cfg = cfg_for(tiny_ckpt, tmp_path / "g", **{"run.executor": "local", "generate.num_samples": 6, "run.shard_size": 2,
                                                "generate.top_p": 0.9})
    run_job(cfg, "generate")
    before = read_output(str(tmp_path / "g"), "samples").sort_by("seed")
    for rel in ("_commits/part-00001.json", "samples/part-00001.parquet", "_SUCCESS"):
        (tmp_path / "g" / rel).unlink()  # as if the job had died during shard 1
    s = run_job(cfg, "generate")
    assert (s["shards_skipped"], s["shards_run"]) == (2, 1)
    after = read_output(str(tmp_path / "g"), "samples").sort_by("seed")
    assert after.column("tokens").to_pylist() == before.column("tokens").to_pylist()


def test_progress_is_logged_off_a_tty_and_stats_are_recorded(tiny_ckpt, tmp_path, caplog):
    import logging

    from igpt_batch.run.driver import Progress

    caplog.set_level(logging.INFO, logger="igpt_batch")
    cfg = cfg_for(tiny_ckpt, tmp_path / "g", **{"run.executor": "local", "generate.num_samples": 4, "run.shard_size": 2,
                                                "generate.batch_size": "auto"})
    summary = run_job(cfg, "generate")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines and lines[-1].startswith("progress: 4/4 samples")
    assert any("KV cache: " in r.getMessage() for r in caplog.records)  # the exact per-sample cache size is logged
    from igpt_batch.model.batching import CPU_SAMPLE_BATCH

    assert any(f"batch size auto: {CPU_SAMPLE_BATCH} on CPU" in r.getMessage() for r in caplog.records)
    assert set(summary["stage_seconds"]) >= {"read_s", "preprocess_s", "model_s", "write_s", "total_s"}
    assert summary["stage_seconds"]["model_s"] > 0
    commit = OutputFolder(str(tmp_path / "g")).committed()["part-00000"]
    assert commit["rows"] == {"samples": 2} and commit["stats"]["model_s"] > 0
    assert summary["http_retries"] == 0 and commit["http_retries"] == 0  # a count, kept apart from the seconds
    assert summary["stage_seconds"]["total_s"] >= summary["stage_seconds"]["model_s"]
    # throughput over the shards' own span (first start to last commit): start-up and model load are left out
    records = OutputFolder(str(tmp_path / "g")).committed().values()
    span = max(r["ended_at"] for r in records) - min(r["started_at"] for r in records)
    assert summary["run_s"] == round(span, 3) and 0 < summary["run_s"] <= summary["wall_s"]
    assert summary["rows_per_s"] == round(4 / span, 3)
    # the periodic line carries rate and ETA
    p = Progress(total=10, done=2, unit="images", every_s=0)
    p.update(3)
    assert any("progress: 5/10 images" in r.getMessage() and "ETA" in r.getMessage() for r in caplog.records)


def test_prepare_builds_one_job_with_its_inputs_scan_and_plan(tiny_ckpt, manifest, tmp_path):
    import os
    from importlib.metadata import version

    from igpt_batch.inputs.manifest import scan_manifest
    from igpt_batch.run.driver import prepare
    from igpt_batch.run.tasks import get

    cfg = cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": manifest, "extract.layers": [1]})
    with prepare(cfg, get("extract")) as job:
        assert job.kind == "uri" and job.plan.rows == 10 and [len(s) for s in job.plan.shards] == [4, 4, 2]
        assert job.plan.scan == scan_manifest(manifest)  # the scan travels with the plan
        assert job.keys["manifest_fingerprint"] == job.plan.scan.fingerprint and job.keys["layers"] == [1]
        assert job.inputs.head.column("id").to_pylist() == [f"img{i}" for i in range(10)]
        assert [t.num_rows for t in job.inputs.tables()] == [10]  # the kept rows, read back without the source
        record = job.record()
        assert record["compat"] == job.keys and record["shards"] == 3 and record["layers"] == [1]
        assert record["versions"]["pylance"] == version("pylance") and record["versions"]["ray"] == version("ray")
        workers = job.for_workers()
        assert workers.inputs is None and workers.plan == job.plan and workers.kind == "uri"
        folder = job.inputs.folder
        assert os.path.isdir(folder)
    assert not os.path.exists(folder)  # the kept rows go with the job
    assert not (tmp_path / "o").exists()  # preparing writes nothing to the output


def test_one_job_lists_and_reads_its_inputs_once(tiny_ckpt, image_dir, tmp_path, monkeypatch):
    """A folder of two manifest files is listed once and each file read once, although the scan, the overlap guard,
    the plan files and the preview all use its rows; the kept rows are gone after the job."""
    import glob
    import tempfile
    from collections import Counter

    from igpt_batch.inputs import manifest as manifest_mod
    from igpt_batch.inputs import units

    calls = Counter()

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(manifest_mod, "list_inputs", counted("list", manifest_mod.list_inputs))
    monkeypatch.setattr(units, "read_batches", counted("read", units.read_batches))
    uris = [str(image_dir / n) for n in ("coffee.jpg", "astronaut.jpg", "text.jpg", "rocket.jpg")]
    (tmp_path / "m").mkdir()
    write_manifest(tmp_path / "m" / "a.parquet", uris[:2], ["a0", "a1"])
    write_manifest(tmp_path / "m" / "b.parquet", uris[2:], ["b0", "b1"])
    before = set(glob.glob(f"{tempfile.gettempdir()}/igpt-inputs-*"))
    s = run_job(cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(tmp_path / "m"), "run.executor": "local",
                                                      "run.shard_size": 3, "output.preview": 2}), "extract")
    assert calls == {"list": 1, "read": 2}
    assert s["rows"] == {"embeddings": 3, "errors": 1} and s["input_rows"] == 4 and s["http_retries"] == 0
    assert (tmp_path / "o" / "preview.png").exists()
    assert set(glob.glob(f"{tempfile.gettempdir()}/igpt-inputs-*")) <= before


def test_tars_are_streamed_once_by_the_driver_and_read_as_tars(tiny_ckpt, image_dir, tmp_path, monkeypatch):
    import io
    import tarfile

    from igpt_batch.inputs import tars

    def make_tar(path, samples):
        with tarfile.open(path, "w") as tf:
            for name, data in samples.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    jpg = {n: (image_dir / n).read_bytes() for n in ("coffee.jpg", "astronaut.jpg", "rocket.jpg")}
    (tmp_path / "shards").mkdir()
    make_tar(tmp_path / "shards" / "0.tar", {"k/coffee.jpg": jpg["coffee.jpg"], "k/astro.jpg": jpg["astronaut.jpg"]})
    make_tar(tmp_path / "shards" / "1.tar", {"k/rocket.jpg": jpg["rocket.jpg"]})
    streamed = []
    index_table = tars.index_table
    monkeypatch.setattr(tars, "index_table", lambda fs, path, digest=True: streamed.append(path) or
                        index_table(fs, path, digest))
    s = run_job(cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(tmp_path / "shards"),
                                                      "run.executor": "local", "run.shard_size": 2}), "extract")
    assert sorted(p.rsplit("/", 1)[-1] for p in streamed) == ["0.tar", "1.tar"]  # once each, by the scan
    assert s["shards"] == 2 and s["rows"] == {"embeddings": 3, "errors": 0}
    emb = read_output(str(tmp_path / "o"), "embeddings").sort_by("id")
    assert emb.column("id").to_pylist() == ["k/astro", "k/coffee", "k/rocket"]
    assert emb.column("uri").to_pylist()[0].endswith("0.tar#k/astro.jpg")
    plan = OutputFolder(str(tmp_path / "o")).read_job()
    assert plan["compat"]["manifest_fingerprint"] and plan["versions"]["pylance"]


def test_ray_starts_meanwhile_once_the_scan_has_read_enough_rows(monkeypatch):
    """The Ray executor's scan starts Ray in the background after EARLY_RAY_ROWS rows (a large scan overlaps Ray's
    start); a small input, a dry run's and the local executor's never do."""
    from igpt_batch import config
    from igpt_batch.run import cluster, driver

    calls = []
    monkeypatch.setattr(cluster, "start_ray_early", calls.append)
    cfg = config.load(None, {"run.address": "ray://head:10001"})
    on_rows = driver.ray_meanwhile(cfg)
    on_rows(driver.EARLY_RAY_ROWS - 1)
    assert calls == []
    on_rows(1)
    on_rows(500)
    assert calls == ["ray://head:10001"] * 2  # start_ray_early is a no-op once Ray is starting or up
    assert driver.ray_meanwhile(config.load(None, {"run.executor": "local"})) is None
