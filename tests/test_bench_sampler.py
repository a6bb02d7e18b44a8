"""bench/bench_sampler.py --smoke runs end to end and prints a positive ratio."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sampler.py"


def test_bench_smoke_prints_positive_ratio():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"^ratio: ([0-9.]+)$", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    assert float(match.group(1)) > 0
    assert re.search(r"^igpt_batch: .* tokens/s", proc.stdout, re.MULTILINE)
    assert re.search(r"^hf_generate: .* tokens/s", proc.stdout, re.MULTILINE)


def test_sampler_goal_smoke_measures_both_sides_and_breaks_the_step_down(capsys):
    """bench/sampler_goal.py --smoke: HF's generate, `igpt-batch generate` end to end, the per-batch step
    breakdown for fp32 and bf16, and bf16's agreement with fp32 (in-process: one torch import)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("sampler_goal", BENCH.parent / "sampler_goal.py")
    goal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goal)
    threads = torch.get_num_threads()
    try:
        ratio = goal.main(["--smoke", "--threads", "1", "--batch", "2", "--hf-batches", "1", "--breakdown", "2",
                           "--dtypes", "bf16"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert ratio > 0 and re.search(r"^ratio: [0-9.]+ \(ours at batch 2", out, re.MULTILINE)
    assert re.search(r"^igpt-batch generate .* tokens/s end to end", out, re.MULTILINE)
    assert re.search(r"^\| 2 \| 8 \| [0-9.]+ \| [0-9.]+ \([0-9.]+ GB/s\) \| [0-9.]+ \([0-9.]+ GB/s\)", out, re.MULTILINE)
    assert re.search(r"^sampling bf16 batch 2: [0-9.]+ tokens/s .*x fp32$", out, re.MULTILINE)
    precision = re.search(r'^precision bf16: .*"feature_rel_error": ([0-9.e-]+)', out, re.MULTILINE)
    assert precision and float(precision.group(1)) < 2e-2
