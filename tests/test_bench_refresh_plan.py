"""bench/bench_refresh_plan.py --smoke plans two real stores (every row unchanged) and prints its figures.
main() runs in-process; each store is set up and planned in a child process of its own (peak RSS is a figure)."""
import re

from conftest import bench_module


def test_bench_refresh_plan_smoke(capsys):
    bench_module("bench_refresh_plan").main(["--smoke", "--executor", "local"])
    out = capsys.readouterr().out
    peaks = {}
    for rows in (2000, 6000):  # the bench itself exits non-zero unless every row was found unchanged by size+mtime
        folders = rows // 1000  # planned in buckets of 1,000 rows: still one listing per folder, no HEAD
        m = re.search(rf"^rows {rows}: planning ([\d.]+) s, (\d+) rows/s, peak RSS (\d+) MiB, "
                      rf"precheck {{'size_mtime': {rows}, 'hashed': 0}}, {folders} folders, {folders} lists, 0 heads$",
                      out, re.MULTILINE)
        assert m, out
        peaks[rows] = int(m.group(3))
    per_row = re.search(r"^bytes_per_row: (-?\d+)$", out, re.MULTILINE)
    # bytes per row is the two peaks' difference over the 4,000 rows between them (to the MiB the lines print)
    assert per_row and abs(int(per_row.group(1)) - (peaks[6000] - peaks[2000]) * 2**20 / 4000) <= 2**20 / 4000 + 1, out
