"""inspect OUTPUT: the text and --json reports of an output, and --verify's checks."""
from __future__ import annotations

import json

import pytest

from igpt_batch import config
from igpt_batch.inspector import inspect
from igpt_batch.run.driver import run_job


@pytest.fixture(scope="module")
def output(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("insp") / "g"
    run_job(config.load(None, {"model.name": tiny_ckpt, "output.path": str(out), "run.executor": "local",
                               "generate.num_samples": 5, "run.shard_size": 2, "output.contact_sheet": 4,
                               "run.torch_threads": 1}), "generate")
    return out


def test_json_report_of_a_finished_output(output):
    lines = []
    assert inspect(str(output), as_json=True, echo=lines.append) == 0
    (report,) = [json.loads(line) for line in lines]
    assert report["task"] == "generate" and report["status"] == "succeeded"
    assert (report["shards_committed"], report["shards_planned"]) == (3, 3)
    assert report["kinds"]["samples"]["rows"] == 5 and report["kinds"]["samples"]["files"] == 3
    assert report["kinds"]["samples"]["schema"]["seed"] == "int64"
    assert report["pictures"] == [f"{output}/contact_sheet.png"] and report["pngs"] is None
    assert report["summary"]["rows"] == {"samples": 5} and report["problems"] == []


def test_text_report_and_verify(output, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    lines = []
    assert inspect(str(copy), verify=True, echo=lines.append) == 0
    assert "status:      succeeded" in lines and lines[-1] == "verify: ok"
    (copy / "samples" / "part-00002.parquet").unlink()
    lines = []
    assert inspect(str(copy), verify=True, echo=lines.append) == 1
    assert "VERIFY FAILED  part-00002: samples/part-00002.parquet is missing" in lines


def test_neither_output_nor_store(tmp_path):
    lines = []
    assert inspect(str(tmp_path), echo=lines.append) == 1
    assert "not an igpt-batch output" in lines[0] and "not a refresh store" in lines[0]
