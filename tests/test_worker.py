"""ShardWorker's own contracts, in-process: lazy model load, read-ahead order by input kind, the commit record."""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from igpt_batch import config
from igpt_batch.inputs.manifest import ManifestScan, Shard
from igpt_batch.model import checkpoint
from igpt_batch.model.resolve import ModelRef
from igpt_batch.run.context import STAGES, Stats
from igpt_batch.run.job import Job
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tasks import get
from igpt_batch.run.worker import ShardWorker


def make(ckpt, out, task="generate", kind="uri", **over):
    cfg = config.load(None, {"model.name": ckpt, "output.path": str(out), "generate.batch_size": 2,
                             "extract.batch_size": 2, "run.torch_threads": 1, **over})
    t = get(task)
    scan = ManifestScan(6, "f" * 16, kind=kind) if t.reads_manifest else None
    return ShardWorker(Job(cfg, t, t.resolve(cfg, checkpoint.read_info(ckpt)), t.plan(cfg, scan))), cfg


def test_a_generate_shard_is_written_then_committed_with_its_record(tiny_ckpt, tmp_path):
    worker, _ = make(tiny_ckpt, tmp_path / "o")
    assert worker.model is None  # nothing loads until the first shard (placement is probed before)
    rec = worker.run(Shard(3, 6, 9))
    assert worker.model is not None
    assert rec["shard"] == "part-00003" and (rec["start"], rec["stop"]) == (6, 9)
    assert rec["files"] == [{"path": "samples/part-00003.parquet", "rows": 3}] and rec["rows"] == {"samples": 3}
    assert set(rec["stats"]) == {*STAGES, "total_s"} and rec["stats"]["model_s"] > 0
    assert rec["http_retries"] == 0 and rec["stats"]["read_s"] == 0  # generate reads no input rows
    assert rec["stats"]["total_s"] >= rec["stats"]["model_s"] + rec["stats"]["write_s"]
    out = OutputFolder(str(tmp_path / "o"))
    assert out.commit_record("part-00003") == rec
    assert out.read_table("samples/part-00003.parquet").column("seed").to_pylist() == [6, 7, 8]


def test_reading_keeps_row_order_and_turns_failures_into_errors(tiny_ckpt, image_dir, tmp_path):
    worker, _ = make(tiny_ckpt, tmp_path / "o", "extract")
    worker.load()
    names = ["coffee.jpg", "text.jpg", "astronaut.jpg", "missing.jpg", "truncated.jpg", "rocket.jpg"]
    rows = pa.table({"id": [f"r{i}" for i in range(6)], "uri": [str(image_dir / n) for n in names]})
    stats = Stats()
    got = list(worker.reader.read(rows, stats, 2))  # a window smaller than the shard
    assert [g[0] for g in got] == [f"r{i}" for i in range(6)]
    kinds = [type(g[2]).__name__ for g in got]
    assert kinds == ["Loaded", "ImageError", "Loaded", "ImageError", "ImageError", "Loaded"]
    assert got[3][2].stage == "read" and got[1][2].stage == "decode"
    assert got[0][2].rgb.shape == (worker.model.n_px, worker.model.n_px, 3)
    assert stats.read_s > 0 and stats.http_retries == 0 and stats.model_s == 0  # reading only


def test_an_extract_shard_reads_its_plan_rows(tiny_ckpt, image_dir, tmp_path):
    worker, _ = make(tiny_ckpt, tmp_path / "o", "extract")
    out = OutputFolder(str(tmp_path / "o"))
    with out.plan_writer() as plan:
        plan.add(Shard(0, 0, 2), pa.table({"id": ["a", "b"], "uri": [str(image_dir / "coffee.jpg"), "nope.jpg"]}))
    rec = worker.run(Shard(0, 0, 2))
    assert rec["rows"] == {"embeddings": 1, "errors": 1}
    [(reason, n)] = rec["errors_by_reason"].items()  # by stage and class, as the summary counts them
    assert reason.startswith("read: ") and n == 1
    emb = out.read_table("embeddings/part-00000.parquet")
    assert emb.column("id").to_pylist() == ["a"] and emb.schema.metadata[b"layers"] == b"1"


def test_plan_files_hold_many_shards_and_a_shard_without_errors_writes_no_errors_part(tiny_ckpt, image_dir,
                                                                                      tmp_path, monkeypatch):
    """The driver's plan: a few files, each shard's rows in its own row groups, read back by shard in one ranged
    read; a shard whose rows all load commits no errors part (its record says 0 error rows)."""
    from igpt_batch.run import planfile
    from igpt_batch.run.readers import read_output

    monkeypatch.setattr(planfile, "PLAN_SHARDS_PER_FILE", 2)
    worker, _ = make(tiny_ckpt, tmp_path / "o", "extract")
    out = OutputFolder(str(tmp_path / "o"))
    shards = [Shard(0, 0, 1), Shard(2, 2, 4), Shard(3, 4, 5)]  # shard 1 is committed already: not in the plan
    coffee, rocket = str(image_dir / "coffee.jpg"), str(image_dir / "rocket.jpg")
    with out.plan_writer() as plan:
        for s, uris in zip(shards, [[coffee], [rocket, coffee], ["nope.jpg"]]):
            plan.add(s, pa.table({"id": [f"r{i}" for i in range(s.start, s.stop)], "uri": uris}))
    assert sorted(p.name for p in (tmp_path / "o" / "_plan").iterdir()) == [
        "plan-000000000000.parquet", "plan-000000000003.parquet"]  # two shards a file
    assert OutputFolder(str(tmp_path / "o")).read_plan(shards[1]).column("id").to_pylist() == ["r2", "r3"]
    recs = [worker.run(s) for s in shards]
    assert [r["rows"] for r in recs] == [{"embeddings": 1, "errors": 0}, {"embeddings": 2, "errors": 0},
                                         {"embeddings": 0, "errors": 1}]
    assert [f["path"] for f in recs[1]["files"]] == ["embeddings/part-00002.parquet"]  # no empty errors part
    assert recs[1]["errors_by_reason"] == {} and sum(recs[2]["errors_by_reason"].values()) == 1
    assert sorted(p.name for p in (tmp_path / "o" / "errors").iterdir()) == ["part-00003.parquet"]
    assert read_output(str(tmp_path / "o"), "errors").column("id").to_pylist() == ["r4"]
    assert read_output(str(tmp_path / "o"), "embeddings").column("id").to_pylist() == ["r0", "r2", "r3"]
    with pytest.raises(FileNotFoundError, match="part-00001"):
        OutputFolder(str(tmp_path / "o")).read_plan(Shard(1, 1, 2))


def test_a_model_that_cannot_load_fails_every_shard_with_the_same_error(tiny_ckpt, tmp_path):
    worker, _ = make(tiny_ckpt, tmp_path / "o")
    worker.resolved = dataclasses.replace(worker.resolved, info=dataclasses.replace(
        worker.resolved.info, path=str(tmp_path / "gone"), ref=ModelRef("folder", str(tmp_path / "gone"))))
    with pytest.raises(Exception) as first:
        worker.run(Shard(0, 0, 1))
    with pytest.raises(Exception) as second:
        worker.run(Shard(1, 1, 2))
    assert second.value is first.value  # cached: not reloaded per shard


def test_the_worker_reads_by_the_kind_it_is_told_not_by_column_names(tiny_ckpt, image_dir, tmp_path):
    """A plan row with a `bytes` column is still fetched by its uri when the driver said "uri", and decoded from
    its bytes when it said "bytes": the worker never guesses the kind from the columns."""
    good, bad = (image_dir / "coffee.jpg").read_bytes(), b"not an image"
    rows = pa.table({"id": ["a", "b"], "uri": [str(image_dir / "text.jpg"), str(image_dir / "coffee.jpg")],
                     "bytes": pa.array([good, bad], pa.binary())})
    by_bytes, _ = make(tiny_ckpt, tmp_path / "o", "extract", kind="bytes")
    by_uri, _ = make(tiny_ckpt, tmp_path / "p", "extract", kind="uri")
    got_bytes = [type(g[2]).__name__ for g in by_bytes.reader.read(rows, Stats(), 2)]
    got_uri = [type(g[2]).__name__ for g in by_uri.reader.read(rows, Stats(), 2)]
    assert got_bytes == ["Loaded", "ImageError"]  # coffee's bytes; then garbage
    assert got_uri == ["ImageError", "Loaded"]  # text.jpg is not an image; coffee.jpg is
    with pytest.raises(ValueError, match="input kind"):
        make(tiny_ckpt, tmp_path / "q", "extract", kind="member")


def test_stats_keep_seconds_apart_from_the_retry_count():
    a = Stats(read_s=1.5, model_s=2.0, total_s=4.0, http_retries=2)
    a.add_seconds({"model_s": 0.5, "preprocess_s": 0.25, "not_a_stage": 9.0})
    assert (a.model_s, a.preprocess_s) == (2.5, 0.25)
    record = {"stats": a.seconds(), "http_retries": a.http_retries}
    assert record["stats"] == {"read_s": 1.5, "wait_s": 0.0, "preprocess_s": 0.25, "model_s": 2.5, "write_s": 0.0,
                               "total_s": 4.0}
    both = Stats.of(record) + Stats.of({"stats": {"model_s": 1.0}, "http_retries": 3})
    assert (both.model_s, both.read_s, both.http_retries) == (3.5, 1.5, 5)
    assert isinstance(both.http_retries, int)
