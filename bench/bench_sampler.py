#!/usr/bin/env python
"""Sampler throughput: igpt_batch.model.sampling.generate (static KV cache, SDPA) vs transformers' generate.

Both run in this process on the same random ImageGPT, batch and image length, sampling from the full
distribution (temperature 1, no top-k/top-p). Examples:

    python bench/bench_sampler.py                       # CPU: imagegpt-small shape, 256 positions, batch 32
    python bench/bench_sampler.py --preset medium-gpu   # imagegpt-medium shape, 1024 positions, bf16, CUDA
    python bench/bench_sampler.py --smoke               # tiny model, a few seconds on CPU
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import copy_gbps, random_hf, timed, timed_cpu  # noqa: E402

from igpt_batch.model.loading import resolve_device  # noqa: E402
from igpt_batch.model.sampling import generate  # noqa: E402
from igpt_batch.model.transformer import DTYPES, IGPT, kv_cache_bytes  # noqa: E402

DEFAULTS = dict(device="cpu", dtype="fp32", positions=256, batch=32, n_embd=512, n_layer=24, n_head=8, vocab=513)
PRESETS = {
    "medium-gpu": dict(device="cuda", dtype="bf16", positions=1024, batch=64, n_embd=1024, n_layer=36, n_head=8,
                       hbm_gbps=3350.0),
    "smoke": dict(device="cpu", dtype="fp32", positions=16, batch=4, n_embd=32, n_layer=2, n_head=4, vocab=17),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["medium-gpu"], help="medium-gpu: n_embd 1024, 36 layers, 1024 positions, bf16")
    p.add_argument("--smoke", action="store_true", help="tiny model and few positions (seconds on CPU)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32")
    p.add_argument("--positions", type=int, help="n_positions = n_px*n_px (default 256)")
    p.add_argument("--batch", type=int, help="images per batch (default 32)")
    p.add_argument("--n-embd", dest="n_embd", type=int)
    p.add_argument("--n-layer", dest="n_layer", type=int)
    p.add_argument("--n-head", dest="n_head", type=int)
    p.add_argument("--vocab", type=int, help="vocab_size including SOS (default 513)")
    p.add_argument("--hbm-gbps", dest="hbm_gbps", type=float,
                   help="memory bandwidth for the KV-read floor (default: measured on CUDA)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="IGPT.compile_decode() (CUDA graphs via torch.compile)")
    p.add_argument("--no-hf", dest="no_hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternating; best is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS["smoke"] if args.smoke else PRESETS.get(args.preset, {})
    for key, value in {**DEFAULTS, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if math.isqrt(args.positions) ** 2 != args.positions:
        p.error(f"--positions must be a square (n_px*n_px), got {args.positions}")
    return args


def kv_read_bytes_per_image(hf, dtype: torch.dtype) -> int:
    """KV bytes one image's decode must read at least: position p attends over p+1 cached positions."""
    cfg = hf.config
    per_position = kv_cache_bytes(cfg, dtype) // cfg.n_positions
    positions_read = 1 + sum(p + 1 for p in range(1, cfg.n_positions))  # prefill [SOS], then decode 1..P-1
    return per_position * positions_read


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    hf = random_hf(dict(vocab_size=args.vocab, n_positions=args.positions, n_embd=args.n_embd, n_layer=args.n_layer,
                        n_head=args.n_head), DTYPES[args.dtype], device, args.seed)
    clusters = np.random.default_rng(args.seed).uniform(-1, 1, (args.vocab - 1, 3)).astype(np.float32)
    model = IGPT(hf, clusters)
    if args.compile:
        print(f"compile_decode: {model.compile_decode()}")
    batch, positions = args.batch, args.positions
    tokens = batch * positions
    seeds = list(range(args.seed * 1_000_003, args.seed * 1_000_003 + batch))
    print(f"config: n_embd={args.n_embd} n_layer={args.n_layer} n_head={args.n_head} vocab={args.vocab} "
          f"positions={positions} batch={batch} dtype={args.dtype} device={device} threads={torch.get_num_threads()}")

    sos = torch.full((batch, 1), model.sos_id, dtype=torch.long, device=device)

    def hf_generate(n_new: int):
        with torch.no_grad():
            return hf.generate(input_ids=sos, attention_mask=torch.ones_like(sos), max_new_tokens=n_new,
                               do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)

    def ours_warmup():
        cache = model.new_cache(batch)
        model.prefill(sos, cache)
        for pos in range(1, min(4, positions)):
            model.decode_one_token(sos, pos, cache)

    timed(ours_warmup, device)
    if not args.no_hf:
        timed(lambda: hf_generate(min(4, positions)), device)
    ours, hf_runs = [], []
    for _ in range(args.repeats):  # alternate, so both sides see the same background load
        ours.append(timed_cpu(lambda: generate(model, seeds, temperature=1.0), device))
        if not args.no_hf:
            hf_runs.append(timed_cpu(lambda: hf_generate(positions), device))
    ours_s, ours_cpu = min(r[0] for r in ours), min(r[1] for r in ours)
    cpu_note = device.type == "cpu"
    print(f"igpt_batch: {ours_s:.2f} s, {tokens / ours_s:.1f} tokens/s, {batch / ours_s:.3f} images/s"
          + (f" (process CPU {ours_cpu:.2f} s)" if cpu_note else ""))
    if hf_runs:
        hf_s, hf_cpu = min(r[0] for r in hf_runs), min(r[1] for r in hf_runs)
        print(f"hf_generate: {hf_s:.2f} s, {tokens / hf_s:.1f} tokens/s, {batch / hf_s:.3f} images/s"
              + (f" (process CPU {hf_cpu:.2f} s)" if cpu_note else ""))
        print(f"ratio: {hf_s / ours_s:.2f}")
        if cpu_note:
            print(f"cpu_time_ratio: {hf_cpu / ours_cpu:.2f}")

    if args.preset or args.hbm_gbps or device.type == "cuda":
        gbps = args.hbm_gbps or copy_gbps(device)
        source = "given" if args.hbm_gbps else "measured"
        per_image = kv_read_bytes_per_image(hf, DTYPES[args.dtype])
        floor_images_s = gbps * 1e9 / per_image
        print(f"images/s: {batch / ours_s:.3f}")
        print(f"kv_read_floor: {per_image / 1e6:.1f} MB KV read per image, {gbps:.0f} GB/s ({source}) -> "
              f"{floor_images_s:.3f} images/s at most; achieved {batch / ours_s / floor_images_s:.1%} of the floor")


if __name__ == "__main__":
    main()
