"""bench/bench_extract.py --smoke runs every section end to end and prints positive ratios."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_extract.py"
RATIOS = ("pipeline_efficiency", "bf16_over_fp32", "truncation_ratio", "tokenize_speedup", "preprocess_full_speedup", "scaling_ratio",
          "gpu_smoke_cpu_layer2_mfu", "gpu_smoke_cpu_layer4_mfu")


def test_bench_extract_smoke_prints_positive_ratios():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    values = dict(re.findall(r"^([a-z0-9_]+): (\S.*)$", proc.stdout, re.MULTILINE))
    for name in RATIOS:
        assert name in values, (name, proc.stdout)
        assert float(values[name]) > 0, (name, values[name])
    for name in ("extract_tiny_random_images_per_s", "bare_model_images_per_s", "pipeline_images_per_s",
                 "tokenize_ours_images_per_s", "tokenize_hf_images_per_s", "ray_1_actor_images_per_s",
                 "ray_2_actors_images_per_s", "gpu_smoke_cpu_layer4_images_per_s"):
        assert float(values[name]) > 0, (name, proc.stdout)
    assert values["tokens_equal"] == "equal", proc.stdout
    assert values["dtype_auto_cpu"] in ("fp32", "bf16") and values["cpu_flags"], proc.stdout
    assert float(values["dtype_tiny_random_fp32_images_per_s"]) > 0 and float(values["dtype_tiny_random_bf16_images_per_s"]) > 0
