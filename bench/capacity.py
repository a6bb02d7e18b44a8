"""Capacity from formulas: work per image, per-GPU ceilings and dollars per million images (docs/CAPACITY.md).

    python bench/capacity.py [--price H100=6.88 ...] [--images 10e6] [--gpus 8]

Everything here is computed, nothing measured: FLOPs and bytes from the model shapes, divided by each GPU's
published peak. A ceiling is what no implementation can beat; measured figures live in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """An ImageGPT checkpoint's shape (openai/imagegpt-*: 32x32 pixels, 512 colour clusters + SOS)."""
    name: str
    n_layer: int
    n_embd: int
    n_positions: int = 1024  # 32 x 32 pixels, one token each
    vocab: int = 513         # 512 clusters + SOS

    @property
    def params(self) -> int:
        """Weights: 12 d^2 per block (QKV 3d^2, projection d^2, MLP 2 x 4d^2), plus token and position embeddings
        (the LM head is a separate vocab x d matrix in ImageGPT). Biases and layer norms are left out (< 0.1%)."""
        d = self.n_embd
        return 12 * d * d * self.n_layer + self.vocab * d + self.n_positions * d + self.vocab * d


MODELS = [Shape("imagegpt-small", 24, 512), Shape("imagegpt-medium", 36, 1024), Shape("imagegpt-large", 48, 1536)]


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak, from the datasheet
    mem_gbps: float     # memory bandwidth, GB/s
    mem_gb: float
    price: float        # assumed on-demand $/GPU-hour: the instance's list price / its GPUs (us-east-1, Linux)
    instance: str
    source: str


GPUS = [
    GPU("A10G", 125.0, 600.0, 24, 1.006, "g5.xlarge", "NVIDIA A10 datasheet (AWS publishes no A10G peak; A10G may be lower)"),
    GPU("L40S", 362.05, 864.0, 48, 1.861, "g6e.xlarge", "NVIDIA L40S datasheet"),
    GPU("A100", 312.0, 1555.0, 40, 2.745, "p4d.24xlarge / 8", "NVIDIA A100 40GB SXM datasheet"),
    GPU("H100", 989.4, 3352.0, 80, 6.88, "p5.48xlarge / 8", "NVIDIA H100 SXM datasheet"),
]

BF16 = 2  # bytes per weight / cache element


def extract_flops(m: Shape, layer: int | None = None) -> float:
    """One image through the first `layer` blocks (default n_layer // 2; the forward stops there).
    Per block: 24 d^2 T for the matmuls (2 FLOPs per multiply-add over 12 d^2 weights) and 2 T^2 d for causal
    attention (QK^T and AV, each 2 T^2 d in full, half of that under the causal mask)."""
    layer = m.n_layer // 2 if layer is None else layer
    d, t = m.n_embd, m.n_positions
    return layer * (24 * d * d * t + 2 * t * t * d)


def generate_flops(m: Shape) -> float:
    """One sample of T tokens, one decode step each, all blocks plus the LM head. Step t attends over t + 1
    cached positions (4 (t + 1) d FLOPs per block): summed, 2 T (T + 1) d per block."""
    d, t = m.n_embd, m.n_positions
    return m.n_layer * (24 * d * d * t + 2 * t * (t + 1) * d) + 2 * d * m.vocab * t


def kv_cache_bytes(m: Shape) -> int:
    """The KV cache one sample holds at the end (bf16): K and V, every block, every position."""
    return 2 * m.n_layer * m.n_positions * m.n_embd * BF16


def kv_read_bytes(m: Shape) -> float:
    """KV cache read over one sample's decode steps: step t reads t cached positions of K and V in every block
    (sum over t: T (T - 1) / 2). A decode step that attends over the whole static cache reads twice this."""
    t = m.n_positions
    return 2 * m.n_layer * m.n_embd * BF16 * t * (t - 1) / 2


def generate_batch(m: Shape, g: GPU, cap: int = 512) -> int:
    """Samples per decode batch: as many KV caches as fit in 90% of the GPU beside the weights (capped)."""
    free = 0.9 * g.mem_gb * 1e9 - m.params * BF16
    return max(1, min(cap, int(free // kv_cache_bytes(m))))


def ceilings(m: Shape, g: GPU) -> dict:
    """Images per second that the GPU's peak allows. Extraction is compute-bound; generation is the slower of
    compute and memory traffic (the KV reads, plus the weights read once per decode step for the whole batch)."""
    peak = g.bf16_tflops * 1e12
    b = generate_batch(m, g)
    gen_bytes = kv_read_bytes(m) + m.n_positions * m.params * BF16 / b
    gen_compute, gen_memory = peak / generate_flops(m), g.mem_gbps * 1e9 / gen_bytes
    return {"extract": peak / extract_flops(m), "generate": min(gen_compute, gen_memory), "batch": b,
            "generate_bound": "memory" if gen_memory < gen_compute else "compute"}


def dollars_per_million(images_per_s: float, price_per_hour: float) -> float:
    return price_per_hour / (images_per_s * 3600) * 1e6


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
