"""A real `ray job submit` of jobs/generate.py and jobs/extract.py against the session's Ray head."""
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, write_manifest

from igpt_batch.run.readers import read_output

RAY = str(Path(sys.executable).parent / "ray")


def submit(head, entrypoint: list[str]) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO), "--", sys.executable, *entrypoint]
    deadline = time.time() + 90
    while True:
        r = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=300)
        # a fresh head answers before its job agent is up: Ray says to try again later
        if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
            return r
        time.sleep(2)


def test_ray_job_submit_generate_and_extract(ray_head, tiny_ckpt, image_dir, tmp_path):
    r = submit(ray_head, ["jobs/generate.py", "--model", tiny_ckpt, "--output", str(tmp_path / "gen"),
                          "--num-samples", "5", "--shard-size", "2", "--workers", "2", "--cpus-per-worker", "0.5"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    t = read_output(str(tmp_path / "gen"), "samples")
    assert sorted(t.column("seed").to_pylist()) == [0, 1, 2, 3, 4]
    manifest = write_manifest(tmp_path / "m.parquet", [str(image_dir / "astronaut.jpg"), str(image_dir / "text.jpg")])
    r = submit(ray_head, ["jobs/extract.py", "--model", tiny_ckpt, "--manifest", str(manifest),
                          "--output", str(tmp_path / "ext"), "--layer", "1"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert read_output(str(tmp_path / "ext"), "embeddings").num_rows == 1
    assert read_output(str(tmp_path / "ext"), "errors").num_rows == 1
    # a bad flag fails the job with a message naming it, and the job is reported as failed
    r = submit(ray_head, ["jobs/generate.py", "--model", tiny_ckpt, "--output", str(tmp_path / "bad"), "--top-p", "7"])
    assert r.returncode != 0 and "top_p" in (r.stdout + r.stderr)
