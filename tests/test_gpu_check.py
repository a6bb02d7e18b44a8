"""bench/gpu_check.sh --smoke: the GPU acceptance run, in its tiny CPU form, writes one complete, passing JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_gpu_check_smoke_writes_one_passing_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"] == "cpu" and report["ok"] is True
    assert report["greedy_fp32_vs_hf"]["equal"] is True
    bucketed = report["bucketed_bf16_vs_eager"]
    assert bucketed["compiled"] and bucketed["buckets"] == 2 and bucketed["relative_error"] < 2e-2
    assert report["batch_size_auto"]["extract"] >= 1 and report["batch_size_auto"]["sample"] >= 1
    sampler = report["sampler_bf16"]
    assert sampler["compiled"] and sampler["images_per_s"] > 0
    # bucketing attends over no more than the whole cache, and at least the positions written
    positions = report["shape"]["n_positions"]
    whole = sampler["kv_bytes_needed"] * positions * positions / (positions * (positions + 1) // 2)
    assert sampler["kv_bytes_needed"] <= sampler["kv_bytes_attended"] <= whole
    assert report["extraction_bf16"]["images_per_s"] > 0
    assert not any("error" in v for v in report.values() if isinstance(v, dict))
