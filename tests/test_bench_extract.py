"""bench/bench_extract.py --smoke, in-process: every section runs end to end and prints what it computed."""
import math
import re

from conftest import bench_module

RATIOS = ("pipeline_efficiency", "bf16_over_fp32", "truncation_ratio", "tokenize_speedup", "preprocess_full_speedup",
          "scaling_ratio", "gpu_smoke_cpu_layer2_mfu", "gpu_smoke_cpu_layer4_mfu")
RATES = ("extract_tiny_random_images_per_s", "bare_model_images_per_s", "pipeline_images_per_s",
         "tokenize_ours_images_per_s", "tokenize_hf_images_per_s", "ray_1_actor_images_per_s",
         "ray_2_actors_images_per_s", "gpu_smoke_cpu_layer4_images_per_s")


def test_bench_extract_smoke_runs_every_section(ray_local, torch_threads_kept, capsys):
    bench_module("bench_extract").main(["--smoke", "--threads", "1"])
    out = capsys.readouterr().out
    values = dict(re.findall(r"^([a-z0-9_]+): (\S.*)$", out, re.MULTILINE))
    for name in RATIOS + RATES:
        assert name in values and math.isfinite(float(values[name])), (name, out)
    assert values["tokens_equal"] == "equal", out  # our tokens are the HF processor's, resized and full-size
    # the scaling section really ran 2 actors of 1 torch thread, 1 CPU each
    assert re.search(r"^# scaling: .*torch threads per actor \[1, 1\], num_cpus=1 per actor", out, re.MULTILINE), out
    # the pipeline and the bare model saw the same images: pipeline_images_per_s / bare = pipeline_efficiency
    bare, e2e = float(values["bare_model_images_per_s"]), float(values["pipeline_images_per_s"])
    assert math.isclose(e2e / bare, float(values["pipeline_efficiency"]), rel_tol=2e-3), values
    assert values["dtype_auto_cpu"] in ("fp32", "bf16") and values["cpu_flags"], out
