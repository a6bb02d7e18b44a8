"""bench/bench_refresh_night.py --smoke: a Lance night writes about what changed; the full rewrite writes everything."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_refresh_night.py"


def test_bench_refresh_night_smoke():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {}
    for kind in ("lance", "rewrite"):
        m = re.search(rf"^rows 20000 dim 64 changed 0.1% {kind}: wall ([\d.]+) s, written ([\d.]+) MiB "
                      rf"\(([\d.]+)x the changed rows\), peak RSS (\d+) MiB$", proc.stdout, re.MULTILINE)
        assert m, proc.stdout
        got[kind] = float(m.group(3))
    assert got["lance"] <= 3 < 100 < got["rewrite"], got  # the issue's bound: at most 3x the changed rows' bytes
