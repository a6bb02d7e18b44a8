"""What the bench scripts share: result lines, timing that waits for the device, copy bandwidth, a random ImageGPT."""
from __future__ import annotations

import time

import numpy as np
import torch


def say(name: str, value) -> None:
    """One result line: `name: value` (floats with 4 significant digits)."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_cpu(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds incl. system time) of fn(), the device's queue drained."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def timed(fn, device: torch.device) -> float:
    return timed_cpu(fn, device)[0]


def copy_gbps(device: torch.device, cpu_mib: int = 256, repeats: int = 5) -> float:
    """Device-to-device copy of 1 GiB (CUDA) / `cpu_mib` MiB (CPU), best of `repeats`: read + write bytes per second."""
    n = (1 << 30 if device.type == "cuda" else cpu_mib << 20) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * n * 4 / seconds / 1e9


def random_hf(shape: dict, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """A randomly initialised HF ImageGPT of `shape` (ImageGPTConfig fields), without dropout, in eval mode."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    cfg = ImageGPTConfig(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device(device):
        hf = ImageGPTForCausalImageModeling(cfg)
    return hf.to(dtype).eval().requires_grad_(False)


def random_clusters(vocab_size: int, seed: int = 0) -> np.ndarray:
    """A random palette for a vocabulary of `vocab_size` (its last id is SOS)."""
    return np.random.default_rng(seed).uniform(-1, 1, (vocab_size - 1, 3)).astype(np.float32)
