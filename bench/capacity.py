"""Capacity from formulas: work per image, per-GPU ceilings and dollars per million images (docs/CAPACITY.md).

    python bench/capacity.py [--price H100=6.88 ...] [--images 10e6] [--gpus 8]

The model (shapes, GPUs, formulas) lives in igpt_batch/run/capacity.py, which `--dry-run` also uses; this script
prints its tables. Everything is computed, nothing measured: FLOPs and bytes from the model shapes, divided by each GPU's
published peak. A ceiling is what no implementation can beat; measured figures live in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igpt_batch.run.capacity import (  # noqa: E402,F401 - the model's one owner; re-exported for tests and users
    GPU,
    GPUS,
    MODELS,
    Shape,
    ceilings,
    dollars_per_million,
    extract_flops,
    generate_batch,
    generate_flops,
    kv_cache_bytes,
    kv_read_bytes,
)


def report(gpus: list[GPU], images: float, n_gpus: int) -> str:
    out = ["## Work per image (computed)", "",
           "| model | layers | width | params | extract layer | extract GFLOP | generate GFLOP | KV cache / sample | KV read / sample |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        out.append(f"| {m.name} | {m.n_layer} | {m.n_embd} | {m.params / 1e6:.0f} M | {m.n_layer // 2} | "
                   f"{extract_flops(m) / 1e9:,.1f} | {generate_flops(m) / 1e9:,.1f} | {kv_cache_bytes(m) / 1e6:,.1f} MB | "
                   f"{kv_read_bytes(m) / 1e9:,.1f} GB |")
    out += ["", "## Per-GPU ceilings (computed from published peaks; bf16, dense)", "",
            "| GPU | bf16 TFLOP/s | GB/s | memory | $/GPU-h (assumed) | priced as | peaks from |", "|---|---|---|---|---|---|---|"]
    for g in gpus:
        out.append(f"| {g.name} | {g.bf16_tflops:g} | {g.mem_gbps:g} | {g.mem_gb:g} GB | {g.price:.3f} | {g.instance} | {g.source} |")
    out += ["", "| model | task | GPU | images/s | images/hour | $ per million images | "
                f"{images / 1e6:g}M images on {n_gpus} GPUs | bound |", "|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        for task in ("extract", "generate"):
            for g in gpus:
                c = ceilings(m, g)
                rate = c[task]
                hours = images / (rate * 3600 * n_gpus)
                bound = "compute" if task == "extract" else f"{c['generate_bound']}, batch {c['batch']}"
                out.append(f"| {m.name} | {task} | {g.name} | {rate:,.1f} | {rate * 3600:,.0f} | "
                           f"{dollars_per_million(rate, g.price):,.2f} | {hours:,.2f} h | {bound} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--price", action="append", default=[], metavar="GPU=$/h", help="override a GPU's $/GPU-hour")
    p.add_argument("--images", type=float, default=10e6, help="images for the 'how long' column (default 10M)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the 'how long' column (default 8)")
    args = p.parse_args(argv)
    prices = dict(kv.split("=") for kv in args.price)
    gpus = [GPU(**{**g.__dict__, "price": float(prices.get(g.name, g.price))}) for g in GPUS]
    print(report(gpus, args.images, args.gpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
