"""The capacity model: work per image from the model's shape, per-GPU ceilings and dollars (docs/CAPACITY.md).

Everything here is computed, nothing measured: FLOPs and bytes from the model shapes, divided by each GPU's
published peak. A ceiling is what no implementation can beat. `bench/capacity.py` prints the tables of
docs/CAPACITY.md from it; `--dry-run` (run/dry_run.py) prices a planned job with `estimate`.
"""
from __future__ import annotations

from dataclasses import dataclass

from igpt_batch.errors import UsageError


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
PLANNING_FRACTION = 0.5  # a budget's share of the ceiling: dense forwards usually reach 30-60% of peak (an assumption)


def gpu(name: str) -> GPU:
    """A GPU of GPUS by name (case-insensitive); ValueError naming the known ones."""
    for g in GPUS:
        if g.name.lower() == name.lower():
            return g
    raise UsageError(f"--gpu {name}: unknown GPU; the capacity model knows {', '.join(g.name for g in GPUS)}")


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


def estimate(m: Shape, g: GPU, task: str, outputs: int, gpus: int = 1, layer: int | None = None,
             price: float | None = None) -> dict:
    """Time and cost of `outputs` images (extract: images through `layer` blocks, the full depth when scoring;
    generate and complete: samples, complete priced as a whole sample, an upper bound) on `gpus` GPUs: at the
    ceiling, and at the planning figure (PLANNING_FRACTION of it)."""
    if task == "extract":
        rate = g.bf16_tflops * 1e12 / extract_flops(m, layer)
    else:
        rate = ceilings(m, g)["generate"]
    price = g.price if price is None else price
    hours = outputs / (rate * gpus * 3600)
    return {"gpu": g.name, "gpus": gpus, "price_per_gpu_hour": price, "outputs": outputs,
            "ceiling_per_gpu_per_s": round(rate, 1), "ceiling_hours": hours, "ceiling_dollars": hours * gpus * price,
            "planning_hours": hours / PLANNING_FRACTION, "planning_dollars": hours * gpus * price / PLANNING_FRACTION}
