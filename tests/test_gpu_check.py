"""bench/gpu_check.py --smoke, in-process: the GPU acceptance run, in its tiny CPU form, writes one complete, passing
JSON; bench/gpu_check.sh hands its arguments to it offline."""
import json
import os
import subprocess

import pytest
from conftest import REPO, bench_module

SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_smoke_writes_one_passing_json(tmp_path, torch_threads_kept, capsys):
    out = tmp_path / "gpu_check.json"
    returned = bench_module("gpu_check").main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))  # the file holds the whole report
    assert report["smoke"] and report["device"] == "cpu" and report["ok"] is True
    assert report["greedy_fp32_vs_hf"]["equal"] is True
    bucketed = report["bucketed_bf16_vs_eager"]
    assert bucketed["compiled"] and bucketed["buckets"] == 2 and bucketed["relative_error"] < 2e-2
    assert report["batch_size_auto"]["extract"] >= 1 and report["batch_size_auto"]["sample"] >= 1
    sampler, shape = report["sampler_bf16"], report["shape"]
    assert sampler["compiled"] and sampler["batch"] == 4
    # the KV bytes a whole sampling run needs: K and V, every layer, bf16, each step reads the positions so far
    positions = shape["n_positions"]
    per_position = sampler["batch"] * 2 * shape["n_layer"] * shape["n_embd"] * 2
    assert sampler["kv_bytes_needed"] == per_position * positions * (positions + 1) // 2
    # bucketing attends over no more than the whole cache, and at least the positions written
    assert sampler["kv_bytes_needed"] <= sampler["kv_bytes_attended"] <= per_position * positions * positions
    assert sampler["tokens_per_s"] == pytest.approx(sampler["images_per_s"] * positions)
    assert (report["extraction_bf16"]["batch"], report["extraction_bf16"]["layer"]) == (8, 1)
    assert not any("error" in v for v in report.values() if isinstance(v, dict))
    assert f"wrote {out} (ok=True" in capsys.readouterr().out


def test_gpu_check_sh_runs_gpu_check_py_offline_with_its_arguments(tmp_path):
    """The wrapper's contract, with a stand-in interpreter: offline, the arguments passed on, a time limit."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$HF_HUB_OFFLINE $TRANSFORMERS_OFFLINE $*"\n')
    fake.chmod(0o755)
    r = subprocess.run([str(SCRIPT), "--smoke", "--out", "x.json"], env={**os.environ, "PYTHON": str(fake)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"1 1 {SCRIPT.parent}/gpu_check.py --smoke --out x.json"
