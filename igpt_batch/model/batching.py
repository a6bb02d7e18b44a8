"""Batch sizes: `auto` finds the largest extraction batch that fits, and sizes sampling batches from the KV cache."""
from __future__ import annotations

import logging

log = logging.getLogger("igpt_batch")
CPU_EXTRACT_BATCH = 32  # on CPU memory is not the limit; larger batches gain nothing
# On CPU a decode step's matmuls read every weight once per step, whatever the batch, while attention reads each
# sample's own KV cache: larger batches amortise the weights until attention dominates. 64 takes most of the gain
# measured up to 128 at half the memory (6.4 GB of KV caches for imagegpt-small; figures: docs/BENCHMARKS.md).
CPU_SAMPLE_BATCH = 64
MAX_BATCH = 1024


def _fits(model, batch: int, layers: list[int]) -> bool:
    import torch

    tokens = torch.zeros((batch, model.n_px * model.n_px), dtype=torch.int64, device=model.device)
    try:
        with torch.inference_mode():
            model.features(tokens, layers)
        torch.cuda.synchronize(model.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def extract_batch_size(model, layers: list[int], requested: int | str) -> int:
    """`requested` if it is a number; for `auto`, the largest power of two up to MAX_BATCH that runs the
    truncated forward without running out of GPU memory (probed once per actor), or CPU_EXTRACT_BATCH on CPU."""
    if requested != "auto":
        return int(requested)
    if model.device.type != "cuda":
        log.info("batch size auto: %d on CPU", CPU_EXTRACT_BATCH)
        return CPU_EXTRACT_BATCH
    best, batch = 1, 1
    while batch <= MAX_BATCH and _fits(model, batch, layers):
        best, batch = batch, batch * 2
    log.info("batch size auto: %d fits on %s (layers %s)", best, model.device, layers)
    return best


def sample_batch_size(model, requested: int | str, headroom: float = 0.7) -> int:
    """`requested`, or for `auto` as many samples as the free GPU memory holds KV caches for; on CPU the
    throughput-best batch (CPU_SAMPLE_BATCH), smaller only where the available memory cannot hold its caches.

    A sample's KV cache is exactly 2 * n_layer * n_positions * n_embd * bytes per element; `headroom`
    leaves the rest for activations and the allocator."""
    from igpt_batch.model.transformer import kv_cache_bytes

    per_sample = kv_cache_bytes(model.config, model.dtype)
    log.info("KV cache: %.1f MiB per sample (%s)", per_sample / 2**20, model.dtype)
    if requested != "auto":
        return int(requested)
    if model.device.type != "cuda":
        batch = _cpu_sample_batch(per_sample, headroom)
        log.info("batch size auto: %d on CPU (samples whose KV caches fit in available memory)", batch)
        return batch
    import torch

    free, _ = torch.cuda.mem_get_info(model.device)
    batch = max(1, min(MAX_BATCH, int(free * headroom // per_sample)))
    log.info("batch size auto: %d samples (%.1f GiB free on %s)", batch, free / 2**30, model.device)
    return batch


def available_memory_bytes() -> int:
    """What this process may still allocate: the container's cgroup room (memory.max or memory.limit_in_bytes
    minus usage) where it is below the host's MemAvailable."""
    from igpt_batch.model.limits import available_memory_bytes as available

    return available()


def _cpu_sample_batch(per_sample: int, headroom: float) -> int:
    """The throughput-best CPU batch (CPU_SAMPLE_BATCH), halved until its KV caches fit in the available memory."""
    budget = available_memory_bytes() * headroom
    batch = CPU_SAMPLE_BATCH
    while batch > 1 and batch * per_sample > budget:
        batch //= 2
    return batch
