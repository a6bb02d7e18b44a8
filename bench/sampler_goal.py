#!/usr/bin/env python
"""The CPU sampler goal, measured in one run: `igpt-batch generate` end to end at our batch against transformers'
`generate` at its best batch, on an imagegpt-small-shaped random checkpoint at 1024 positions.

    python bench/sampler_goal.py --threads 2                  # HF at batches 1, 4, 16; ours at its default batch
    python bench/sampler_goal.py --threads 2 --breakdown 16,32 --dtypes fp32,bf16
    python bench/sampler_goal.py --smoke                      # tiny shape, seconds

Prints one line per measurement and a final `ratio:` line (ours end to end / HF's best, tokens/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import sampler_breakdown  # noqa: E402
import torch  # noqa: E402
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

from igpt_batch.model.transformer import DTYPES, IGPT  # noqa: E402

SMALL = dict(n_embd=512, n_layer=24, n_head=8, n_positions=1024, vocab_size=513)
SMOKE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=17)
CLI = Path(sys.executable).parent / "igpt-batch"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=0,
                   help="ours: --batch-size for igpt-batch generate (default: none, so its default, auto)")
    p.add_argument("--num-samples", type=int, default=64, help="ours: samples generated (default 64, the CLI's)")
    p.add_argument("--hf-batches", default="1,4,16", help="transformers' generate batches; its best counts")
    p.add_argument("--breakdown", default="", help="batches for the decode-step breakdown, e.g. 16,32")
    p.add_argument("--dtypes", default="fp32", help="dtypes for the breakdown, e.g. fp32,bf16")
    return p.parse_args(argv)


def save_checkpoint(shape: dict, path: Path) -> ImageGPTForCausalImageModeling:
    torch.manual_seed(0)
    hf = ImageGPTForCausalImageModeling(ImageGPTConfig(**shape)).eval().requires_grad_(False)
    hf.save_pretrained(path, safe_serialization=True)
    clusters = np.random.default_rng(0).uniform(-1, 1, (shape["vocab_size"] - 1, 3)).round(4)
    (path / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
    return hf


def hf_tokens_per_s(hf, batch: int) -> float:
    P = hf.config.n_positions
    sos = torch.full((batch, 1), hf.config.vocab_size - 1, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_new_tokens=P, do_sample=True, top_k=0,
                    top_p=1.0, temperature=1.0, pad_token_id=0)
    return batch * P / (time.perf_counter() - start)


def ours_end_to_end(ckpt: Path, out: Path, samples: int, batch: int, threads: int, positions: int) -> dict:
    """`igpt-batch generate` in a fresh process, one shard of `samples` samples (at `batch`, or with no
    --batch-size at all when 0): wall-clock tokens/s, and the batch it ran at (from its log)."""
    cmd = [str(CLI), "generate", "--model", str(ckpt), "--output", str(out), "--num-samples", str(samples),
           *(["--batch-size", str(batch)] if batch else []), "--executor", "local", "--torch-threads", str(threads),
           "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    success = json.loads((out / "_SUCCESS").read_text())
    auto = re.search(r"batch size auto: (\d+)", proc.stderr)
    return {"command": " ".join(cmd[1:]), "batch": batch or (int(auto.group(1)) if auto else None), "wall_s": wall,
            "tokens_per_s": samples * positions / wall,
            "model_s": success.get("stage_seconds", {}).get("model_s"), "job_wall_s": success.get("wall_s")}


def breakdown_and_precision(hf, args, P: int) -> None:
    """Per dtype and batch, the decode step at the mean position (P/2) split into matmuls and attention; then each
    reduced precision against fp32: feature error, greedy agreement, extraction speed."""
    clusters = np.zeros((hf.config.vocab_size - 1, 3), np.float32)
    models = {d: IGPT(copy.deepcopy(hf).to(DTYPES[d]), clusters) for d in ["fp32", *args.dtypes.split(",")] if d}
    steps = {}
    for dtype, model in models.items():
        print(f"breakdown {dtype}:\n{sampler_breakdown.HEADER}")
        for batch in [int(b) for b in args.breakdown.split(",")]:
            row = sampler_breakdown.step_breakdown(model, batch, P // 2)
            steps[dtype, batch] = batch / row["step_ms"] * 1e3
            print(sampler_breakdown.format_row(row), flush=True)
    for (dtype, batch), tokens_s in steps.items():
        print(f"sampling {dtype} batch {batch}: {tokens_s:.1f} tokens/s at the mean position, "
              f"{tokens_s / steps['fp32', batch]:.2f}x fp32", flush=True)
    layer = hf.config.n_layer // 2
    fp32 = sampler_breakdown.precision_row(models["fp32"], models["fp32"], 8, 64, layer)
    print(f"extract fp32 layer {layer} batch 8: {fp32['extract_images_per_s']:.2f} images/s")
    for dtype, model in models.items():
        if dtype != "fp32":
            row = sampler_breakdown.precision_row(models["fp32"], model, 8, 64, layer)
            print(f"precision {dtype}: {json.dumps(row)}; extraction "
                  f"{row['extract_images_per_s'] / fp32['extract_images_per_s']:.2f}x fp32", flush=True)


def main(argv=None) -> float:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else SMALL
    P = shape["n_positions"]
    print(f"shape: {shape}, threads {args.threads}, load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        hf = save_checkpoint(shape, ckpt)
        print(f"streaming read: {sampler_breakdown.streaming_gbps(torch.device('cpu')):.1f} GB/s", flush=True)
        if args.breakdown:
            breakdown_and_precision(hf, args, P)
        hf_runs = {}
        for batch in [int(b) for b in args.hf_batches.split(",")]:
            hf_runs[batch] = hf_tokens_per_s(hf, batch)
            print(f"hf_generate batch {batch}: {hf_runs[batch]:.1f} tokens/s", flush=True)
        samples = (args.batch or 2) if args.smoke else args.num_samples
        ours = ours_end_to_end(ckpt, Path(tmp) / "out", samples, args.batch, args.threads, P)
        print(f"igpt-batch {ours['command']}: {ours['wall_s']:.1f} s wall, {ours['tokens_per_s']:.1f} tokens/s "
              f"end to end (job {ours['job_wall_s']} s, model {ours['model_s']} s)", flush=True)
    best = max(hf_runs, key=hf_runs.get)
    ratio = ours["tokens_per_s"] / hf_runs[best]
    print(f"ratio: {ratio:.2f} (ours at batch {ours['batch']} end to end / transformers at its best batch {best}; "
          f"load average now {os.getloadavg()})")
    return ratio


if __name__ == "__main__":
    main()
