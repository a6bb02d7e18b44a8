"""igpt_batch.model.batching: explicit sizes pass through; `auto` probes the GPU, or sizes sampling from the KV cache."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_hf

from igpt_batch.model import batching
from igpt_batch.model.transformer import kv_cache_bytes


def fake_model(device: str = "cpu", dtype=torch.float32):
    return SimpleNamespace(device=torch.device(device), dtype=dtype, config=tiny_hf().config)


def test_explicit_sizes_pass_through():
    for device in ("cpu", "cuda"):
        assert batching.extract_batch_size(fake_model(device), [1], 7) == 7
        assert batching.sample_batch_size(fake_model(device), "12") == 12


def test_extract_auto_on_cpu_is_the_cpu_default():
    assert batching.extract_batch_size(fake_model(), [1], "auto") == batching.CPU_EXTRACT_BATCH


def test_extract_auto_on_gpu_is_the_largest_power_of_two_that_fits(monkeypatch):
    probed = []
    monkeypatch.setattr(batching, "_fits", lambda model, batch, layers: probed.append(batch) or batch <= 48)
    assert batching.extract_batch_size(fake_model("cuda"), [2], "auto") == 32
    assert probed == [1, 2, 4, 8, 16, 32, 64]  # stops at the first that does not fit


def test_sample_auto_on_cpu_is_the_best_batch_when_memory_allows(monkeypatch, caplog):
    monkeypatch.setattr(batching, "available_memory_bytes", lambda: 2**40)
    with caplog.at_level(logging.INFO, logger="igpt_batch"):
        assert batching.sample_batch_size(fake_model(), "auto") == batching.CPU_SAMPLE_BATCH
    per_sample = kv_cache_bytes(fake_model().config, torch.float32)
    assert f"KV cache: {per_sample / 2**20:.1f} MiB per sample" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_auto_on_cpu_halves_until_the_caches_fit(monkeypatch, dtype):
    per_sample = kv_cache_bytes(fake_model().config, dtype)
    monkeypatch.setattr(batching, "available_memory_bytes", lambda: 10 * per_sample)
    batch = batching.sample_batch_size(fake_model(dtype=dtype), "auto", headroom=0.5)
    assert batch == 4  # 4 caches fit in half of 10, 8 would not
    monkeypatch.setattr(batching, "available_memory_bytes", lambda: 0)
    assert batching.sample_batch_size(fake_model(dtype=dtype), "auto") == 1  # never 0


def test_sample_auto_on_gpu_fills_the_free_memory(monkeypatch):
    per_sample = kv_cache_bytes(fake_model().config, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * per_sample, 200 * per_sample))
    assert batching.sample_batch_size(fake_model("cuda", torch.bfloat16), "auto", headroom=0.7) == 70
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**15, 10**15))
    assert batching.sample_batch_size(fake_model("cuda"), "auto") == batching.MAX_BATCH


def test_available_memory_is_positive():
    assert batching.available_memory_bytes() > 0
