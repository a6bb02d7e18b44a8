"""igpt_batch.model.batching: explicit sizes pass through; `auto` probes the GPU, or sizes sampling from the KV cache."""

import logging
import os
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


# ---- limits from the container: a fake cgroup tree ----------------------------------------------------------------

def cgroup_tree(tmp_path, files: dict[str, str], self_cgroup: str):
    """A fake /sys/fs/cgroup holding `files` (relative path -> content) and a /proc/self/cgroup naming our place."""
    for rel, text in files.items():
        (tmp_path / "cg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / rel).write_text(text + "\n")
    (tmp_path / "self").write_text(self_cgroup)
    return str(tmp_path / "cg"), str(tmp_path / "self")


def test_cgroup_v2_limits_of_our_cgroup_and_its_ancestors(tmp_path):
    from igpt_batch.model import limits

    root, me = cgroup_tree(tmp_path, {
        "kubepods/memory.max": str(8 << 30), "kubepods/cpu.max": "max 100000",  # the parent's limit applies too
        "kubepods/pod1/memory.max": str(6 << 30), "kubepods/pod1/memory.current": str(1 << 30),
        "kubepods/pod1/cpu.max": "250000 100000",
    }, "0::/kubepods/pod1\n")
    assert limits.memory_available(root, me) == 5 << 30  # limit minus usage
    assert limits.cpu_quota(root, me) == 2.5 and limits.cpu_count(root, me) == min(2, len(os.sched_getaffinity(0)))
    assert limits.available_memory_bytes(root, me) == min(5 << 30, limits.host_available_memory())
    assert limits.torch_threads(0, 64, root, me) == limits.cpu_count(root, me) and limits.torch_threads(3, 64, root, me) == 3
    (tmp_path / "cg" / "kubepods" / "memory.max").write_text(str(2 << 30))  # a tighter ancestor wins
    assert limits.memory_available(root, me) == 2 << 30


def test_cgroup_v1_limits_and_no_limit(tmp_path):
    from igpt_batch.model import limits

    root, me = cgroup_tree(tmp_path, {
        "memory/docker/c1/memory.limit_in_bytes": str(3 << 30), "memory/docker/c1/memory.usage_in_bytes": str(1 << 30),
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000",
    }, "11:memory:/docker/c1\n4:cpu,cpuacct:/docker/c1\n")
    assert limits.memory_available(root, me) == 2 << 30
    assert limits.cpu_quota(root, me) == 0.5 and limits.cpu_count(root, me) == 1  # at least one thread
    root, me = cgroup_tree(tmp_path / "free", {"memory.max": "max", "cpu.max": "max 100000"}, "0::/\n")
    assert limits.memory_available(root, me) is None and limits.cpu_quota(root, me) is None
    assert limits.available_memory_bytes(root, me) == pytest.approx(limits.host_available_memory(), rel=0.2)
    assert limits.cpu_count(root, me) == len(os.sched_getaffinity(0))


def test_cpu_sample_batch_is_sized_from_the_containers_memory(tmp_path, monkeypatch):
    from igpt_batch.model import limits

    per_sample = kv_cache_bytes(fake_model().config, torch.float32)
    root, me = cgroup_tree(tmp_path, {"memory.max": str(20 * per_sample), "memory.current": str(4 * per_sample)},
                           "0::/\n")
    monkeypatch.setattr(limits, "CGROUP_ROOT", root)
    monkeypatch.setattr(limits, "SELF_CGROUP", me)
    # 16 caches of room, 70% of it usable: 8 samples, although the host has far more memory available
    assert batching.sample_batch_size(fake_model(), "auto") == 8
