"""End to end against a real S3 server (SeaweedFS): images and manifest on S3, output on S3, through Ray."""
import json
import logging

import numpy as np
import pytest
from conftest import S3Server

from igpt_batch import config
from igpt_batch.errors import JobError
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output


def test_extract_and_generate_on_s3(ray_local, s3_server: S3Server, tiny_ckpt, image_dir, caplog):
    fs = s3_server.fs()
    fs.mkdir("igpt-e2e")
    names = ["astronaut.jpg", "coffee-small.png", "chelsea.jpg", "text.jpg"]
    for n in names:
        fs.put_file(str(image_dir / n), f"igpt-e2e/images/{n}")
    fs.pipe_file("igpt-e2e/manifest.csv", ("id,uri\n" + "".join(f"{n},images/{n}\n" for n in names)).encode())
    so = s3_server.storage_options()
    caplog.set_level(logging.INFO)
    cfg = config.load(None, {"model.name": tiny_ckpt, "input.manifest": "s3://igpt-e2e/manifest.csv",
                             "output.path": "s3://igpt-e2e/out", "storage_options": so, "run.shard_size": 2,
                             "extract.layers": [2], "run.cpus_per_worker": 0.5})
    s = run_job(cfg, "extract")
    assert s["rows"] == {"embeddings": 3, "errors": 1}
    emb = read_output("s3://igpt-e2e/out", "embeddings", so)
    assert sorted(emb.column("id").to_pylist()) == ["astronaut.jpg", "chelsea.jpg", "coffee-small.png"]
    assert np.isfinite(np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))).all()
    assert fs.exists("igpt-e2e/out/_SUCCESS") and fs.exists("igpt-e2e/out/_commits/part-00001.json")
    job = fs.cat_file("igpt-e2e/out/_job.json").decode()
    assert s3_server.secret not in job and s3_server.key not in job and json.loads(job)["config"]["storage_options"]["secret"] == "***"
    assert s3_server.secret not in caplog.text

    gen = config.load(None, {"model.name": tiny_ckpt, "output.path": "s3://igpt-e2e/gen", "storage_options": so,
                             "generate.num_samples": 6, "run.shard_size": 4, "run.executor": "local",
                             "output.contact_sheet": 6, "output.write_png_files": True})
    assert run_job(gen, "generate")["rows"] == {"samples": 6}
    assert read_output("s3://igpt-e2e/gen", "samples", so).num_rows == 6
    assert fs.exists("igpt-e2e/gen/contact_sheet.png") and fs.exists("igpt-e2e/gen/pngs/seed-000000000005.png")


def test_wrong_credentials_fail_fast_without_leaking_the_secret(s3_server: S3Server, tiny_ckpt):
    s3_server.fs().mkdir("igpt-creds")
    wrong = "wrong-secret-do-not-print"
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": "s3://igpt-creds/out", "generate.num_samples": 2,
                             "storage_options": s3_server.storage_options(secret=wrong), "run.executor": "local"})
    with pytest.raises(JobError) as e:
        run_job(cfg, "generate")
    assert "access denied" in str(e.value) and wrong not in str(e.value) and s3_server.key not in str(e.value)
    from igpt_batch.errors import ManifestError

    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": "s3://igpt-creds/out", "input.manifest": "s3://igpt-creds/m.csv",
                             "storage_options": s3_server.storage_options(secret=wrong), "run.executor": "local"})
    with pytest.raises(ManifestError) as e:  # the input side fails fast the same way
        run_job(cfg, "extract")
    assert "access denied to manifest" in str(e.value) and wrong not in str(e.value)
