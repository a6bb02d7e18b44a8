"""bench/bench_sampler.py and bench/sampler_goal.py --smoke, in-process (one torch import): both sides measured, and
the figures printed are the ones computed."""
import re

import pytest
from conftest import bench_module

POSITIONS = 16  # the smoke shape's n_positions: tokens per image


def test_bench_smoke_measures_both_sides(torch_threads_kept, capsys):
    bench_module("bench_sampler").main(["--smoke", "--threads", "1"])
    out = capsys.readouterr().out
    sides = {}
    for side in ("igpt_batch", "hf_generate"):
        m = re.search(rf"^{side}: ([0-9.]+) s, ([0-9.]+) tokens/s, ([0-9.]+) images/s", out, re.MULTILINE)
        assert m, out
        _, tokens_s, images_s = map(float, m.groups())
        assert tokens_s == pytest.approx(images_s * POSITIONS, rel=1e-2), out  # every image is 16 tokens
        sides[side] = tokens_s
    ratio = re.search(r"^ratio: ([0-9.]+)$", out, re.MULTILINE)  # HF's seconds over ours, for the same tokens
    assert ratio and float(ratio.group(1)) == pytest.approx(sides["igpt_batch"] / sides["hf_generate"], rel=0.02, abs=0.01)


def test_sampler_goal_smoke_measures_both_sides_and_breaks_the_step_down(torch_threads_kept, capsys):
    """bench/sampler_goal.py --smoke: HF's generate, `igpt-batch generate` end to end, the per-batch step
    breakdown for fp32 and bf16, and bf16's agreement with fp32."""
    ratio = bench_module("sampler_goal").main(["--smoke", "--threads", "1", "--batch", "2", "--hf-batches", "1",
                                               "--breakdown", "2", "--dtypes", "bf16"])
    out = capsys.readouterr().out
    printed = re.search(r"^ratio: ([0-9.]+) \(ours at batch 2", out, re.MULTILINE)
    assert printed and float(printed.group(1)) == pytest.approx(ratio, abs=0.005)
    assert re.search(r"^igpt-batch generate .* tokens/s end to end", out, re.MULTILINE)
    assert re.search(r"^\| 2 \| 8 \| [0-9.]+ \| [0-9.]+ \([0-9.]+ GB/s\) \| [0-9.]+ \([0-9.]+ GB/s\)", out, re.MULTILINE)
    assert re.search(r"^sampling bf16 batch 2: [0-9.]+ tokens/s .*x fp32$", out, re.MULTILINE)
    precision = re.search(r'^precision bf16: .*"feature_rel_error": ([0-9.e-]+)', out, re.MULTILINE)
    assert precision and float(precision.group(1)) < 2e-2
