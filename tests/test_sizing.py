"""run.shard_size: auto: small shards on CPU, parts of about 128 MiB on GPU, and the size an output recorded wins."""
from igpt_batch import config
from igpt_batch.run import sizing


def test_auto_size_is_small_on_cpu_and_sized_for_128_mib_parts_on_gpu():
    assert sizing.auto_size(6_400, gpu=False) == 1024
    rows = sizing.auto_size(4 * 1536 + 256, gpu=True)  # one 1,536-wide float32 layer a row, and its id, uri, sha
    assert rows == 20_480 and 120 << 20 <= rows * (4 * 1536 + 256) <= 128 << 20
    assert sizing.auto_size(10, gpu=True) == 1 << 20  # tiny rows: at most 1Mi rows a shard
    assert sizing.auto_size(10 << 20, gpu=True) == 1024  # huge rows: never under the CPU size


def test_resolve_uses_the_recorded_size_on_a_resume_whatever_the_hardware():
    cfg = config.load(None, {})
    assert cfg.run.shard_size == "auto"
    gpu_asked = []

    def gpu():
        gpu_asked.append(True)
        return True

    previous = {"task": "extract", "shard_size": 4096, "compat": {"shard_size": 4096}}
    got = sizing.resolve(cfg, "extract", 6_400, previous, gpu)
    assert got.run.shard_size == 4096 and not gpu_asked and cfg.run.shard_size == "auto"  # cfg is not changed
    old = {"task": "extract", "compat": {"shard_size": 1024}}  # an output from before shard_size: auto
    assert sizing.resolve(cfg, "extract", 6_400, old, gpu).run.shard_size == 1024
    assert sizing.resolve(cfg, "generate", 6_400, previous, gpu).run.shard_size == 20_480  # another task's output
    cfg.output.overwrite = True  # the previous output is replaced: sized afresh
    assert sizing.resolve(cfg, "extract", 6_400, previous, lambda: False).run.shard_size == 1024
    fixed = config.load(None, {"run.shard_size": 300})
    assert sizing.resolve(fixed, "extract", 6_400, previous, gpu).run.shard_size == 300


def test_shard_size_accepts_auto_or_a_positive_integer():
    import pytest

    from igpt_batch.errors import ConfigError

    assert config.load(None, {"run.shard_size": "64e3"}).run.shard_size == 64_000
    for bad in ("big", 0):
        with pytest.raises(ConfigError, match="run.shard_size"):
            config.load(None, {"run.shard_size": bad})
