"""output.format: lance, for real (in-process jobs over real photos, local disk and SeaweedFS): the same rows and
values as the Parquet output, the same readers and `inspect --verify`; a driver stopped before its Lance commit
resumes exactly once; a shard's first marker holds; verify names a fragment committed twice or of no shard.
The SIGKILL and node-loss tests of the Lance format are in test_faults.py and test_cluster.py."""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import time

import lance
import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import S3Server, job_cfg, wait_for, write_manifest

from igpt_batch.errors import ConfigError, JobError, OutputError
from igpt_batch.inspector import inspect
from igpt_batch.outliers import outliers
from igpt_batch.run import lance_output
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import output_dataset, output_files, read_output
from igpt_batch.run.report import embedding_map
from igpt_batch.run.storage import OutputFolder


@pytest.fixture(scope="module")
def manifest(image_dir, tmp_path_factory):
    """Seven real photos and a broken file, in shards of 2 (4 shards; one error row)."""
    photos = sorted(str(p) for p in image_dir.glob("*-small.png"))
    uris = (photos + photos)[:7] + [str(image_dir / "text.jpg")]
    return str(write_manifest(tmp_path_factory.mktemp("m") / "m.parquet", uris, [f"r{i}" for i in range(len(uris))]))


def extract_cfg(tiny_ckpt, manifest, url, so=None, fmt="lance", **over):
    return job_cfg(tiny_ckpt, url, storage_options=so or {},
                   **{"input.manifest": manifest, "run.shard_size": 2, "run.executor": "local",
                      "extract.layers": [1, 2], "extract.score": True, "run.torch_threads": 1, "output.format": fmt, "output.report": False,
                      **over})


@pytest.fixture(scope="module")
def parquet(tiny_ckpt, manifest, tmp_path_factory):
    """The oracle: the same job written as Parquet parts."""
    url = str(tmp_path_factory.mktemp("pq") / "o")
    run_job(extract_cfg(tiny_ckpt, manifest, url, fmt="parquet"), "extract")
    return read_output(url).sort_by("id")


def verified(url: str, so: dict | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    return inspect(url, verify=True, storage_options=so, echo=lines.append), lines


def test_a_lance_output_holds_the_parquet_rows_and_reads_and_verifies_the_same(tiny_ckpt, manifest, parquet,
                                                                               output_url):
    url, so = output_url
    s = run_job(extract_cfg(tiny_ckpt, manifest, url, so, **{"output.lance_commit_s": 0}), "extract")
    assert s["rows"] == {"embeddings": 7, "errors": 1} and s["shards_run"] == 4
    got = read_output(url, "embeddings", so).sort_by("id")
    assert got.schema == parquet.schema and got.schema.metadata[b"layers"] == b"1,2"  # columns, types, metadata
    assert got.column("id").to_pylist() == [f"r{i}" for i in range(7)]
    np.testing.assert_array_equal(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(parquet.column("embedding").to_numpy(zero_copy_only=False)))
    assert got.equals(parquet)  # every value, nll_bits included
    assert read_output(url, "errors", so).column("id").to_pylist() == ["r7"]  # errors stay Parquet parts
    # the same readers: columns and a filter pushed down; the dataset streams; its URL for other engines
    some = read_output(url, "embeddings", so, columns=["id", "width"], filter=pc.field("id") >= "r5")
    assert some.column_names == ["id", "width"] and sorted(some.column("id").to_pylist()) == ["r5", "r6"]
    ds = output_dataset(url, "embeddings", so)
    assert sum(b.num_rows for b in ds.to_batches(columns=["id"])) == 7
    (files,) = output_files(url, "embeddings", so)
    assert files.endswith("/embeddings.lance") and lance.dataset(
        files, storage_options=lance_output.lance_options(url, so)).count_rows() == 7
    # one Lance commit per arriving shard (lance_commit_s: 0) after the empty dataset's creation
    assert ds.version == 1 + 4 and len(ds.get_fragments()) == 4
    code, lines = verified(url, so)
    assert code == 0 and lines[-1] == "verify: ok", lines
    assert any("7 rows in 4 fragments of Lance version 5" in line for line in lines), lines
    top, _ = outliers(url, 3, so)  # the apps on top read it too: outliers, and the report's embedding map
    assert top.equals(parquet.select(["id", "uri", "nll_bits"]).sort_by(
        [("nll_bits", "descending"), ("id", "ascending")]).slice(0, 3))
    out = OutputFolder(url, so)
    assert "7 of the embeddings; PC1" in embedding_map(out, out.committed(), 8, so, thumbs=False)
    again = run_job(extract_cfg(tiny_ckpt, manifest, url, so), "extract")  # a rerun resumes: nothing to do
    assert again["shards_skipped"] == 4 and read_output(url, "embeddings", so).num_rows == 7


def test_a_driver_stopped_before_its_lance_commit_resumes_exactly_once(tiny_ckpt, manifest, parquet, tmp_path):
    """A driver killed after the markers but before its Lance commit leaves the dataset behind them: the state made
    here for real by restoring the dataset's empty version. An actor killed before its marker left data files."""
    url = str(tmp_path / "o")
    run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")
    out = OutputFolder(url)
    # an empty latest version over the same data files: the dataset as the driver made it before any worker
    lance.write_dataset(parquet.schema.empty_table(), lance_output.uri(out), mode="overwrite")
    assert read_output(url).num_rows == 0
    code, lines = verified(url)
    assert code == 1 and sum("not in the Lance dataset: a driver stopped before its Lance commit" in line
                             for line in lines) == 4, lines
    # an actor killed before its marker, long ago (older than run.lease_timeout), and one a moment ago (it may be a
    # previous driver's worker about to write its marker: kept until it is older)
    old, new = (lance_output.FragmentWriter(out).write(parquet.slice(i, 3)) for i in (0, 3))
    (orphan_file,), (young_file,) = ([f["path"] for frag in o for f in frag["files"]] for o in (old, new))
    data = tmp_path / "o" / "embeddings.lance" / "data"
    os.utime(data / orphan_file, (time.time() - 3600, time.time() - 3600))
    s = run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")
    assert s["shards_skipped"] == 4 and s["shards_run"] == 0
    assert read_output(url).sort_by("id").equals(parquet)  # every row once: the markers' fragments committed now
    assert orphan_file not in lance_output.present(lance_output.open_dataset(out))
    assert not (data / orphan_file).exists() and (data / young_file).exists()  # swept at the start if old
    run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")  # and again: nothing committed twice
    assert read_output(url).num_rows == 7 and verified(url)[0] == 0
    over = {"output.overwrite": True, "output.lance_commit_s": 3600}  # one Lance commit: at the end
    run_job(extract_cfg(tiny_ckpt, manifest, url, **over), "extract")  # the dataset is ours: replaced
    assert lance_output.open_dataset(out).version == 2 and read_output(url).sort_by("id").equals(parquet)
    with pytest.raises(JobError, match="format: 'lance' -> None"):  # a Parquet rerun is another config
        run_job(extract_cfg(tiny_ckpt, manifest, url, fmt="parquet"), "extract")


def test_a_shards_first_marker_holds_and_a_later_attempt_gets_it(output_url):
    url, so = output_url
    out = OutputFolder(url, so)
    first = lance_output.commit_marker_once(out, "part-00003", {"shard": "part-00003", "files": [], "fragments": [],
                                                                 "rows": {"embeddings": 0}}, None)
    later = lance_output.commit_marker_once(out, "part-00003", {"shard": "part-00003", "files": [], "fragments": [1],
                                                                 "rows": {"embeddings": 0}}, None)
    assert later["nonce"] == first["nonce"] and later["fragments"] == []
    assert out.commit_record("part-00003")["nonce"] == first["nonce"]


def test_verify_names_a_fragment_committed_twice_and_one_of_no_shard(tiny_ckpt, manifest, parquet, tmp_path):
    url = str(tmp_path / "o")
    run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")
    out = OutputFolder(url)
    rec = out.commit_record("part-00001")
    stray = lance_output.FragmentWriter(out).write(parquet.slice(0, 1).replace_schema_metadata(parquet.schema.metadata))
    frags = [lance.FragmentMetadata.from_json(json.dumps(f)) for f in rec["fragments"] + stray]
    ds = lance_output.open_dataset(out)
    lance.LanceDataset.commit(lance_output.uri(out), lance.LanceOperation.Append(frags), read_version=ds.version)
    code, lines = verified(url)
    text = "\n".join(lines)
    assert code == 1 and "part-00001: " in text and "is committed 2 times in the Lance dataset" in text, text
    assert "belongs to no committed shard" in text and "ids occur more than once (e.g. 'r0', 'r2'" in text, text
    with pytest.raises(OutputError, match="1 data files that no commit marker names"):  # a resume would not know
        run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")


def test_lance_is_refused_for_the_sampling_tasks_and_unknown_formats(tiny_ckpt):
    cfg = functools.partial(job_cfg, tiny_ckpt, "/tmp/igpt-never-written")
    with pytest.raises(ConfigError, match="output.format: lance is not written by generate, which writes parquet"):
        run_job(cfg(**{"output.format": "lance", "run.executor": "local"}), "generate")
    with pytest.raises(ConfigError, match="output.format"):
        cfg(**{"output.format": "csv"})


def test_a_commit_racing_another_writer_is_named_not_kept_silently(tiny_ckpt, manifest, parquet, tmp_path):
    """A driver past its lease appends between a new driver's read and its commit (Lance rebases appends): the new
    driver sees its version jump, finds the data files twice, and fails naming them."""
    url = str(tmp_path / "o")
    run_job(extract_cfg(tiny_ckpt, manifest, url), "extract")
    out = OutputFolder(url)
    lance.write_dataset(parquet.schema.empty_table(), lance_output.uri(out), mode="overwrite")  # markers ahead
    rec = out.commit_record("part-00000")
    c = lance_output.Committer(out, parquet.schema, None)
    c.ds = lance_output.open_dataset(out)  # this driver's view, read before the other writer's append
    frags = [lance.FragmentMetadata.from_json(json.dumps(f)) for f in rec["fragments"]]
    lance.LanceDataset.commit(lance_output.uri(out), lance.LanceOperation.Append(frags), read_version=c.ds.version)
    c.add(rec)
    with pytest.raises(OutputError, match="another writer .* 1 data files are in the dataset twice"):
        c.close()


def test_timed_commits_wait_for_their_share_of_shards_so_commits_stay_bounded(tmp_path):
    """A timed commit (every lance_commit_s; 0 here) takes at least timed_min records: a job of many shards makes at
    most about shards/timed_min + shards/batch Lance commits, whatever its hours; what is pending goes at the end."""
    import pyarrow as pa
    from lance.fragment import write_fragments

    c = lance_output.Committer(OutputFolder(str(tmp_path / "o")), pa.schema([("id", pa.string())]), None, every_s=0,
                               batch=100, timed_min=3)
    c.start({})
    for i in range(7):
        frags = [f.to_json() for f in write_fragments(pa.table({"id": [f"r{i}"]}), c.ds, mode="append")]
        c.add({"shard": f"part-{i:05d}", "fragments": frags})
    assert c.commits == 2 and sorted(c.ds.to_table().column("id").to_pylist()) == [f"r{i}" for i in range(6)]
    c.close()
    assert c.commits == 3 and sorted(lance_output.open_dataset(c.out).to_table().column("id").to_pylist()) == \
        [f"r{i}" for i in range(7)]


def s3_output(server: S3Server, bucket: str) -> OutputFolder:
    server.fs().mkdir(bucket)
    return OutputFolder(f"s3://{bucket}/o", server.storage_options())


def test_the_drivers_lance_commit_waits_out_a_store_outage(flaky_s3, parquet, caplog):
    """The store goes away before the driver's commit: the commit fails (Lance's client gives up within seconds),
    is retried with backoff once the store is back, on its latest version, and holds each fragment once."""
    out = s3_output(flaky_s3, "lance-outage-short")
    c = lance_output.Committer(out, parquet.schema, None, every_s=3600)
    c.start({})  # the empty dataset, version 1
    records = [{"fragments": lance_output.FragmentWriter(out).write(parquet.slice(i, 4))} for i in (0, 4)]
    for rec in records:
        c.add(rec)
    caplog.set_level(logging.WARNING, logger="igpt_batch.run.lance_output")
    flaky_s3.stop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        closing = pool.submit(c.close)  # the commit meets the outage ...
        try:
            wait_for(lambda: "Lance commit of 2 shards failed" in caplog.text or closing.done())
        finally:
            flaky_s3.start()  # ... which ends once a commit has failed
        closing.result(timeout=300)
    assert "Lance commit of 2 shards failed" in caplog.text  # it did meet the outage, and was retried
    ds = lance_output.open_dataset(out)
    assert ds.version == 2 and c.commits == 1 and ds.count_rows() == parquet.num_rows
    assert sorted(lance_output.present(ds)) == sorted(p for rec in records for p in lance_output.data_files(rec))


def test_a_lance_commit_outlasted_by_the_outage_fails_and_the_rerun_commits_once(
        flaky_s3, tiny_ckpt, manifest, parquet):
    """An outage longer than the commit's retries: the job's error names the commit, the dataset is as before (a
    commit is atomic), and a rerun once the store is back commits the shards' fragments exactly once."""
    out = s3_output(flaky_s3, "lance-outage-long")
    so = flaky_s3.storage_options()
    run_job(extract_cfg(tiny_ckpt, manifest, out.url, so), "extract")
    ds = lance.write_dataset(parquet.schema.empty_table(), lance_output.uri(out), mode="overwrite",
                             storage_options=lance_output._options(out))  # markers ahead of the dataset
    c = lance_output.Committer(out, parquet.schema, None, every_s=3600, retry_s=1.0)  # the outage outlasts it
    c.ds = ds
    for rec in out.committed().values():
        c.add(rec)
    flaky_s3.stop()
    try:
        with pytest.raises(OutputError, match=r"the Lance commit of 4 shards failed for 1 s \(.*\); their commit "
                                              r"markers are kept: rerun the job to commit them \(none twice\)"):
            c.close()
    finally:
        flaky_s3.start()
    c.close()  # a committer that gave up tries nothing more (the job's `finally`), the store back or not
    assert c.failed and lance_output.open_dataset(out).version == ds.version  # nothing committed, half or whole
    assert read_output(out.url, "embeddings", so).num_rows == 0
    s = run_job(extract_cfg(tiny_ckpt, manifest, out.url, so), "extract")  # the rerun
    assert s["shards_skipped"] == 4 and read_output(out.url, "embeddings", so).sort_by("id").equals(parquet)
    code, lines = verified(out.url, so)
    assert code == 0 and lines[-1] == "verify: ok", lines
