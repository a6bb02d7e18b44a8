"""bench/bench_refresh_night.py --smoke: a Lance night writes about what changed; the full rewrite writes everything.
main() runs in-process; its measured nights run in child processes of their own (their peak RSS is a figure)."""
import re

from conftest import bench_module


def test_bench_refresh_night_smoke(capsys):
    bench_module("bench_refresh_night").main(["--smoke"])
    out = capsys.readouterr().out
    got = {}
    for kind in ("lance", "rewrite"):
        m = re.search(rf"^rows 20000 dim 64 changed 0.1% {kind}: wall ([\d.]+) s, written ([\d.]+) MiB "
                      rf"\(([\d.]+)x the changed rows\), peak RSS (\d+) MiB$", out, re.MULTILINE)
        assert m, out
        got[kind] = float(m.group(3))
    assert got["lance"] <= 3 < 100 < got["rewrite"], got  # the issue's bound: at most 3x the changed rows' bytes
