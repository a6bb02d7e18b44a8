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
