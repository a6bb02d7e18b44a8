"""bench/bench_refresh_plan.py --smoke plans two real stores (every row unchanged) and prints its figures."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_refresh_plan.py"


def test_bench_refresh_plan_smoke():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--executor", "local"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rows in (2000, 6000):  # the bench itself exits non-zero unless every row was found unchanged by size+mtime
        folders = rows // 1000  # planned in buckets of 1,000 rows: still one listing per folder, no HEAD
        m = re.search(rf"^rows {rows}: planning ([\d.]+) s, \d+ rows/s, peak RSS (\d+) MiB, "
                      rf"precheck {{'size_mtime': {rows}, 'hashed': 0}}, {folders} folders, {folders} lists, 0 heads$",
                      proc.stdout, re.MULTILINE)
        assert m and float(m.group(1)) > 0 and int(m.group(2)) > 0, proc.stdout
    assert re.search(r"^bytes_per_row: -?\d+$", proc.stdout, re.MULTILINE), proc.stdout
