"""--dry-run: plans as a run would (rows, shards, committed, what would run, the capacity model's estimate), leaves
the output folder and the store byte-identical (sizes and mtimes, folders included), removes its scratch and starts
no Ray actor, while the real run that follows does what the dry run said."""
import functools
import json
import os
import tempfile

import pytest
from conftest import job_cfg, write_manifest
from test_refresh import cfg_for, manifest, photos

from igpt_batch.cli import main
from igpt_batch.errors import JobError
from igpt_batch.run import capacity
from igpt_batch.run.driver import run_job
from igpt_batch.run.dry_run import dry_run
from igpt_batch.store.dry_run import dry_night
from igpt_batch.store.refresh import refresh

cfg = functools.partial(job_cfg, keys=("input.manifest", "output.path"), **{"run.shard_size": 3})


def listing(root) -> dict:
    """Every file and folder under root (root included): (size, mtime_ns); files also their bytes."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            p = os.path.join(d, name) if name else d
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns,
                                             open(p, "rb").read() if os.path.isfile(p) else None)
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """TMPDIR for this test: planning scratch lands here and must be gone after."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def actors(head) -> int:
    """Actors the session's Ray head has seen, dead ones included (its state API)."""
    from ray.util.state import list_actors

    return len(list_actors(address=head.dashboard, limit=10_000, raise_on_missing_output=False))


def test_extract_dry_run_writes_nothing_and_starts_no_actor(ray_local, ray_head, tiny_ckpt, image_dir, tmp_path, scratch):
    names = sorted(p.name for p in image_dir.iterdir())  # 8 photos and 2 broken files: 10 rows
    m = write_manifest(tmp_path / "m.parquet", [str(image_dir / n) for n in names], names)
    out = tmp_path / "out"
    c = cfg(tiny_ckpt, m, out, **{"run.executor": "ray", "run.cpus_per_worker": 0.5})
    before = actors(ray_head)
    r = dry_run(c, "extract", "H100")
    assert (r["rows"], r["shards"], r["shards_committed"], r["shards_to_run"], r["rows_to_run"]) == (10, 4, 0, 4, 10)
    assert r["output_state"] == "new output" and not out.exists() and list(scratch.iterdir()) == []
    # the estimate is the capacity model's: 10 images through layer n_layer // 2 = 1 of the tiny 3-layer model
    shape = capacity.Shape("x", 3, 32, 64, 17)
    assert r["estimate"]["layer"] == 1 and r["estimate"]["gpus"] == 1
    assert r["estimate"]["ceiling_hours"] == pytest.approx(10 * capacity.extract_flops(shape, 1) / 989.4e12 / 3600, rel=1e-5)
    assert r["estimate"]["planning_dollars"] == pytest.approx(2 * r["estimate"]["ceiling_hours"] * 6.88, rel=1e-5)
    assert actors(ray_head) == before  # no model worker
    summary = run_job(c, "extract")  # the real run: its actors are counted, so the check above could fail
    assert summary["shards_run"] == 4 and actors(ray_head) > before
    (out / "_commits" / "part-00001.json").unlink()  # one shard lost its commit: a rerun redoes it
    before, seen = listing(out), actors(ray_head)
    r = dry_run(c, "extract", "a100", price=1.5)
    assert (r["shards_committed"], r["shards_to_run"], r["rows_to_run"]) == (3, 1, 3)
    assert r["output_state"] == "resumes the previous output" and r["estimate"]["price_per_gpu_hour"] == 1.5
    assert listing(out) == before and actors(ray_head) == seen and list(scratch.iterdir()) == []
    # another shard size: the run would be refused, and the dry run says so; --overwrite would redo all of it
    with pytest.raises(JobError, match=r"dry run: the run would be refused.*shard_size: 3 -> 2"):
        dry_run(cfg(tiny_ckpt, m, out, **{"run.shard_size": 2}), "extract")
    r = dry_run(cfg(tiny_ckpt, m, out, **{"run.shard_size": 2, "output.overwrite": True}), "extract")
    assert (r["shards"], r["shards_to_run"]) == (5, 5) and "--overwrite" in r["output_state"]
    assert listing(out) == before and list(scratch.iterdir()) == []


def test_generate_and_complete_dry_runs_on_the_command_line(tiny_ckpt, image_dir, tmp_path, scratch, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--model", tiny_ckpt, "--output", str(out), "--num-samples", "10", "--shard-size", "4",
                 "--dry-run", "--gpu", "L40S", "--workers", "8"]) == 0
    text = capsys.readouterr().out.splitlines()
    r = json.loads(text[-1])
    assert (r["task"], r["rows"], r["shards"], r["outputs_to_run"], r["unit"]) == ("generate", 10, 3, 10, "samples")
    assert r["estimate"]["gpus"] == 8 and "on 8 x L40S" in "\n".join(text) and not out.exists()
    m = write_manifest(tmp_path / "m.parquet", [str(image_dir / "coffee.jpg"), str(image_dir / "rocket.jpg")])
    assert main(["complete", "--model", tiny_ckpt, "--manifest", str(m), "--output", str(out), "--samples-per-image",
                 "3", "--prompt-rows", "2", "--dry-run"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (r["rows"], r["outputs_to_run"], r["shards"]) == (2, 6, 1) and "estimate" not in r and not out.exists()
    assert main(["generate", "--model", tiny_ckpt, "--output", str(out), "--gpu", "H100"]) == 2  # --gpu needs --dry-run
    assert main(["generate", "--model", tiny_ckpt, "--output", str(out), "--dry-run", "--gpu", "V100"]) == 2
    assert "unknown GPU; the capacity model knows A10G, L40S, A100, H100" in capsys.readouterr().err
    assert not out.exists() and list(scratch.iterdir()) == []


def test_refresh_dry_run_plans_the_night_and_leaves_the_store_alone(tiny_ckpt, tmp_path, scratch):
    from PIL import Image

    d = tmp_path / "img"
    names = photos(d)
    store = tmp_path / "store"
    refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m1.parquet", d, names[:6])))
    Image.open(d / names[0]).save(d / names[0], quality=40)  # changed bytes
    m2 = manifest(tmp_path / "m2.parquet", d, [names[0], *names[2:8]])  # 2 new, 1 gone, 1 changed
    # planned in buckets of 2 rows: through planning files, which go to the scratch folder, not the store
    night = cfg_for(tiny_ckpt, store, m2, **{"refresh.plan_bucket_rows": 2})
    before = listing(store)
    r = dry_night(night, "H100")
    assert listing(store) == before and list(scratch.iterdir()) == []
    assert (r["new"], r["changed"], r["deleted"], r["unchanged"]) == (2, 1, 1, 4)
    assert (r["to_embed"], r["shards"], r["shards_to_run"], r["rows"]) == (3, 1, 1, 7)  # refresh shards of 3
    assert r["output_state"] == "existing version" and r["estimate"]["outputs"] == 3
    s = refresh(night)  # the night itself does what the dry run said
    assert (s["new"], s["changed"], s["deleted"], s["unchanged"], s["computed"]) == (2, 1, 1, 4, 3)
    assert listing(store) != before
