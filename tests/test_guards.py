"""Trust at the edges, on the job's side: no user file deleted, no two writers, no unusable output, no stale status."""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_cfg, write_manifest

from igpt_batch import config
from igpt_batch.cli import main
from igpt_batch.errors import ConfigError, JobError
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import LEASE, OutputFolder

cfg_for = functools.partial(job_cfg, **{"run.executor": "local", "run.shard_size": 2, "generate.num_samples": 4})


def test_overwrite_removes_only_what_igpt_batch_wrote(tiny_ckpt, image_dir, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine")
    (out / "README.txt").write_text("also mine")
    run_job(cfg_for(tiny_ckpt, out, **{"output.write_png_files": True}), "generate")
    assert (out / "pngs").is_dir() and (out / "_SUCCESS").exists()
    run_job(cfg_for(tiny_ckpt, out, **{"output.overwrite": True, "generate.num_samples": 2}), "generate")
    assert (out / "notes" / "todo.txt").read_text() == "mine" and (out / "README.txt").read_text() == "also mine"
    assert not (out / "pngs").exists()  # ours, from the replaced run
    assert read_output(str(out), "samples").num_rows == 2


@pytest.mark.parametrize("where", ["manifest_inside", "images_inside", "output_inside_images", "same_as_images"])
def test_outputs_overlapping_the_inputs_are_refused_before_any_work(tiny_ckpt, image_dir, tmp_path, where, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes((image_dir / "coffee.jpg").read_bytes())
    out = {"manifest_inside": tmp_path / "o", "images_inside": tmp_path, "output_inside_images": images / "out",
           "same_as_images": images}[where]
    manifest = (tmp_path / "o" if where == "manifest_inside" else tmp_path) / "m.parquet"
    manifest.parent.mkdir(exist_ok=True)
    write_manifest(manifest, [str(images / "a.jpg")])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["extract", "--model", tiny_ckpt, "--manifest", str(manifest), "--output", str(out),
                 "--executor", "local", "--overwrite"]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


def test_an_output_that_is_a_file_or_not_writable_is_refused(tiny_ckpt, tmp_path, capsys, umount):
    (tmp_path / "f").write_text("x")
    assert main(["generate", "--model", tiny_ckpt, "--output", str(tmp_path / "f"), "--executor", "local"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    ro = _tmpfs(tmp_path / "ro", "ro,size=64k")
    umount(ro)
    assert main(["generate", "--model", tiny_ckpt, "--output", str(ro / "out"), "--executor", "local"]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def _tmpfs(path: Path, options: str) -> Path:
    """A real small or read-only filesystem (a tmpfs); root can mount one here and in CI."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode and os.geteuid() != 0:  # only without root; as root (here and in CI) a failed mount fails
        pytest.skip(f"cannot mount a tmpfs without root: {r.stderr.strip()}")
    assert r.returncode == 0, f"mount -t tmpfs failed as root: {r.stderr.strip()}"
    return path


@pytest.fixture
def umount():
    mounted = []
    yield mounted.append
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], check=False)


def test_disk_full_while_planning_is_a_message_and_leaves_no_temp_files(tiny_ckpt, image_dir, tmp_path, umount, capsys):
    uris = [str(image_dir / "coffee.jpg")] * 4000
    manifest = write_manifest(tmp_path / "m.parquet", uris, [f"row-{i:06d}-{os.urandom(12).hex()}" for i in range(4000)])
    small = _tmpfs(tmp_path / "small", "size=48k")
    umount(small)
    assert main(["extract", "--model", tiny_ckpt, "--manifest", str(manifest), "--output", str(small / "out"),
                 "--executor", "local", "--shard-size", "4000"]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "Traceback" not in err
    assert not [p for p in (small / "out").rglob(".*.tmp")]  # the failed write left no temp file


def test_temp_files_of_a_killed_writer_are_swept_by_the_next_run(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    run_job(cfg_for(tiny_ckpt, out), "generate")
    stray = out / "samples" / f".part-00009.parquet.{'ab' * 16}.tmp"
    stray.write_bytes(b"half a file")
    mine = out / "samples" / ".keep-me.tmp"  # not our temp-file pattern: not ours to remove
    mine.write_bytes(b"user")
    run_job(cfg_for(tiny_ckpt, out), "generate")
    assert not stray.exists() and mine.exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    live = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "started_at": time.time(),
            "refreshed_at": time.time()}
    (out / LEASE).write_text(json.dumps(live))
    with pytest.raises(JobError, match=rf"in use by another job \(host {socket.gethostname()}, pid {os.getpid()}"):
        run_job(cfg_for(tiny_ckpt, out), "generate")
    assert not (out / "_job.json").exists()
    # a lease whose owner process is gone (a killed job on this host) is taken over, and released at the end
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LEASE).write_text(json.dumps(live | {"pid": dead.pid}))
    run_job(cfg_for(tiny_ckpt, out), "generate")
    assert (out / "_SUCCESS").exists() and not (out / LEASE).exists()
    # so is a lease not refreshed for run.lease_timeout; --overwrite never takes a live one (tests/test_lease.py)
    (out / LEASE).write_text(json.dumps(live | {"refreshed_at": time.time() - 30}))
    run_job(cfg_for(tiny_ckpt, out, **{"run.lease_timeout": 10}), "generate")
    (out / LEASE).write_text(json.dumps(live))
    with pytest.raises(JobError, match="in use by another job"):
        run_job(cfg_for(tiny_ckpt, out, **{"output.overwrite": True}), "generate")
    assert (out / "_SUCCESS").exists()


def test_a_rerun_that_asks_for_pngs_is_refused_naming_the_flag(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    run_job(cfg_for(tiny_ckpt, out), "generate")
    with pytest.raises(JobError, match="write_png_files: False -> True"):
        run_job(cfg_for(tiny_ckpt, out, **{"output.write_png_files": True}), "generate")


def test_a_successful_rerun_removes_a_stale_failed_marker_and_groups_errors_without_paths(tiny_ckpt, image_dir, tmp_path):
    uris = [str(image_dir / n) for n in ("coffee.jpg", "text.jpg", "truncated.jpg")] + [str(tmp_path / "in" / "gone.jpg")]
    manifest = write_manifest(tmp_path / "m.parquet", uris)
    out = tmp_path / "o"
    with pytest.raises(JobError):
        run_job(cfg_for(tiny_ckpt, out, **{"input.manifest": str(manifest), "run.max_error_fraction": 0.1}), "extract")
    assert (out / "_FAILED").exists()
    summary = run_job(cfg_for(tiny_ckpt, out, **{"input.manifest": str(manifest)}), "extract")
    assert (out / "_SUCCESS").exists() and not (out / "_FAILED").exists()
    assert summary["errors"] == 3 and sum(summary["errors_by_reason"].values()) == 3
    assert not any(str(tmp_path) in reason or "/" in reason for reason in summary["errors_by_reason"]), summary


def test_uris_with_credentials_are_written_redacted(tiny_ckpt, tmp_path):
    secret = "http://user:hunter2@127.0.0.1:9/x.jpg?X-Amz-Signature=abc123&size=1"
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "uri": [secret]}), manifest)
    run_job(cfg_for(tiny_ckpt, tmp_path / "o", **{"input.manifest": str(manifest), "input.read_timeout": 5}), "extract")
    errors = read_output(str(tmp_path / "o"), "errors")
    text = json.dumps(errors.to_pylist()) + (tmp_path / "o" / "_SUCCESS").read_text() + \
        (tmp_path / "o" / "_job.json").read_text()
    assert errors.num_rows == 1 and "hunter2" not in text and "abc123" not in text
    assert errors.column("uri")[0].as_py().startswith("http://127.0.0.1:9/x.jpg?")


def test_guards_need_no_model(tmp_path):
    from igpt_batch.run.guards import check_not_inputs

    with pytest.raises(ConfigError, match="overlaps the input images in s3://b/imgs"):
        check_not_inputs("s3://b/imgs/out", "s3://b/m.parquet", [pa.table({"uri": ["s3://b/imgs/1.jpg"]})])
    check_not_inputs("s3://b/out", "s3://b/m.parquet", [pa.table({"uri": ["s3://b/imgs/1.jpg", "gs://b/out/x.jpg"]})])
    assert OutputFolder(str(tmp_path)).sweep_temp() == 0


def test_a_second_refresh_of_one_store_is_refused(tiny_ckpt, image_dir, tmp_path):
    from igpt_batch.store.refresh import refresh

    store = tmp_path / "store"
    store.mkdir()
    (store / LEASE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "other",
                                           "started_at": time.time(), "refreshed_at": time.time()}))
    manifest = write_manifest(tmp_path / "m.parquet", [str(image_dir / "coffee.jpg")])
    cfg = config.load(None, {"model.name": tiny_ckpt, "input.manifest": str(manifest), "refresh.store": str(store),
                             "run.executor": "local"})
    with pytest.raises(JobError, match="in use by another job"):
        refresh(cfg)
    assert sorted(p.name for p in store.iterdir()) == [LEASE]  # nothing planned, nothing written
