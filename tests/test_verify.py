"""`igpt-batch inspect --verify` finds what is missing or unreadable, on local disk and SeaweedFS, naming the shard or
file: a deleted commit marker, a truncated part, invalid JSON in _job.json or a marker, a malformed _SUCCESS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from igpt_batch import config
from igpt_batch.run.driver import run_job
from igpt_batch.run.storage import Folder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["local", "s3"])
def good(request, tiny_ckpt, tmp_path_factory):
    """One finished generate output (3 shards) per backend: (url, storage options)."""
    if request.param == "local":
        url, so = str(tmp_path_factory.mktemp("verify") / "good"), {}
    else:
        s3 = request.getfixturevalue("s3_server")
        s3.fs().mkdir("verify-outputs")
        url, so = "s3://verify-outputs/good", s3.storage_options()
    run_job(config.load(None, {"model.name": tiny_ckpt, "output.path": url, "run.executor": "local",
                               "generate.num_samples": 5, "run.shard_size": 2, "output.contact_sheet": 0,
                               "run.torch_threads": 1, "storage_options": so}), "generate")
    return url, so


def copy_of(url: str, so: dict) -> Folder:
    src = Folder(url, so)
    dst = Folder(url.rsplit("/", 1)[0] + "/c-" + uuid.uuid4().hex[:8], so)
    for path in src.fs.find(src.root):
        dst.write_bytes(path[len(src.root) + 1:], src.fs.cat_file(path))
    return dst


def verify(folder: Folder, so: dict) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "igpt_batch.cli", "inspect", folder.url, "--verify",
                        "--storage-options", json.dumps(so)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return p.returncode, p.stdout + p.stderr


def test_a_good_output_verifies(good):
    code, text = verify(copy_of(*good), good[1])
    assert code == 0 and "verify: ok" in text, text


def test_a_deleted_commit_marker_of_a_planned_shard_fails_naming_it(good):
    out = copy_of(*good)
    out.fs.rm(out.path("_commits/part-00001.json"))
    code, text = verify(out, good[1])
    assert code == 1 and "VERIFY FAILED  part-00001: planned but not committed" in text, text
    assert "part-00000" not in text.split("VERIFY FAILED", 1)[1]


@pytest.mark.parametrize("damage, named", [
    (("samples/part-00002.parquet", "half"), "samples/part-00002.parquet cannot be read"),
    (("_commits/part-00000.json", b'{"files": [}'), "_commits/part-00000.json is not valid JSON"),
    (("_commits/part-00000.json", b'[1, 2]'), "_commits/part-00000.json is malformed"),
    (("_SUCCESS", b"[]"), "_SUCCESS is malformed"),
    (("_job.json", b"{not json"), "_job.json is not valid JSON"),
])
def test_unreadable_files_fail_with_a_message_naming_the_file(good, damage, named):
    out = copy_of(*good)
    rel, data = damage
    if data == "half":
        data = out.fs.cat_file(out.path(rel))[:-200]  # the footer gone: a part cut short
    out.write_bytes(rel, data)
    code, text = verify(out, good[1])
    assert code == 1 and named in text, text
    assert "Traceback" not in text, text
