"""--dtype auto: bf16 where the hardware computes it natively, resolved once per job, checked by every worker.
CPU flags are injected through a cpuinfo file, never taken from the machine running the tests."""
import json

import pytest
from conftest import write_manifest

from igpt_batch import config
from igpt_batch.cli import build_parser, config_from_args
from igpt_batch.errors import ConfigError, JobError
from igpt_batch.model import dtypes
from igpt_batch.run import dtype_auto
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 {extra}\nbogomips\t: 4000\n\n" \
      "processor\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    """cpu(extra flags): this process's /proc/cpuinfo now shows them."""
    def set_flags(extra: str) -> None:
        path = tmp_path / f"cpuinfo-{len(extra)}-{abs(hash(extra))}"
        path.write_text(X86.format(extra=extra))
        monkeypatch.setattr(dtypes, "CPUINFO", str(path))
    return set_flags


def test_cpu_flags_and_resolution(cpu):
    assert dtypes.cpu_flags(X86.format(extra="amx_bf16 amx_tile")) >= {"avx2", "amx_bf16", "amx_tile"}
    assert dtypes.cpu_flags("Features\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}  # arm64 spells it so
    assert dtypes.cpu_flags("no flags here") == frozenset()
    for extra, want in (("", "fp32"), ("avx512f avx512_vnni", "fp32"), ("avx512_bf16", "bf16"), ("amx_bf16", "bf16")):
        cpu(extra)
        report = dtypes.hardware("cpu")
        assert report["device"] == "cpu" and dtypes.resolve("auto", report) == want, extra
        assert report["cpu_flags"] == sorted(set(extra.split()) & dtypes.BF16_CPU_FLAGS)
    assert dtypes.resolve("fp16", {"bf16": True}) == "fp16" and dtypes.resolve("fp32", {"bf16": True}) == "fp32"
    cpu("avx512_bf16")
    from igpt_batch.model.loading import load_model

    assert str(load_model("demo", "auto", "cpu").dtype) == "torch.bfloat16"
    cpu("")
    assert str(load_model("demo", "auto", "cpu").dtype) == "torch.float32"


@pytest.fixture
def manifest(tmp_path):
    from PIL import Image
    from skimage import data

    (tmp_path / "in").mkdir()
    uris = []
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / "in" / f"{name}.png")
        uris.append(str(tmp_path / "in" / f"{name}.png"))
    return str(write_manifest(tmp_path / "m.parquet", uris))


def job_cfg(manifest, out, **over):
    return config.load(None, {"input.manifest": manifest, "output.path": str(out), "run.executor": "local",
                              "model.device": "cpu", "run.shard_size": 2, "output.report": False, **over})


@pytest.mark.parametrize("extra,want", [("avx512_bf16", "bf16"), ("", "fp32")])
def test_auto_job_records_and_compares_the_resolved_dtype(cpu, manifest, tmp_path, extra, want):
    cpu(extra)
    out = tmp_path / "out"
    cfg = job_cfg(manifest, out, **{"model.dtype": "auto"})
    summary = run_job(cfg, "extract")
    assert summary["rows"]["embeddings"] == 3 and cfg.model.dtype == "auto"  # the caller's config is left as given
    job = json.loads((out / "_job.json").read_text())
    assert job["compat"]["dtype"] == want and job["config"]["model"]["dtype"] == want
    assert job["config"]["model"]["dtype_auto_from"] == "this machine: cpu, bf16 CPU flags " + (extra or "none")
    assert read_output(str(out), "embeddings").schema.metadata[b"dtype"] == want.encode()
    # naming the resolved dtype resumes the same output; naming the other one is refused, naming dtype
    again = run_job(job_cfg(manifest, out, **{"model.dtype": want}), "extract")
    assert (again["shards_skipped"], again["shards_run"]) == (2, 0)
    with pytest.raises(JobError, match="dtype"):
        run_job(job_cfg(manifest, out, **{"model.dtype": "fp32" if want == "bf16" else "bf16"}), "extract")


def test_a_worker_that_resolves_differently_refuses_to_start(cpu, manifest, tmp_path):
    cpu("")  # this worker: no native bf16; the job was resolved to bf16 where the first worker had AMX
    cfg = job_cfg(manifest, tmp_path / "out", **{"model.dtype": "bf16", "run.max_retries": 0,
                                                   "model.dtype_auto_from": "first worker: cpu, bf16 CPU flags amx_bf16"})
    with pytest.raises(JobError, match="refusing to start") as e:
        run_job(cfg, "extract")
    assert "resolved to bf16 for this job" in str(e.value) and "to fp32 on this worker" in str(e.value)
    assert read_output(str(tmp_path / "out"), "embeddings").num_rows == 0
    cpu("amx_bf16")  # alike hardware starts
    assert run_job(cfg, "extract")["rows"]["embeddings"] == 3


def test_first_ray_worker_reports_its_cpu(ray_local):
    """On a cluster a probe placed like a CPU worker reports its flags (here the real machine's, in a Ray worker)."""
    address = ray_local.get_runtime_context().gcs_address
    cfg = config.load(None, {"model.dtype": "auto", "run.address": address, "model.device": "cpu",
                             "run.cpus_per_worker": 0.5})
    report, where = dtype_auto.worker_hardware(cfg)
    assert where == "first worker" and report == dtypes.hardware("cpu")
    resolved = dtype_auto.resolve_job(cfg)
    assert resolved.model.dtype == dtypes.resolve("auto", report) and resolved.model.dtype_auto_from.startswith("first")


def test_config_and_cli(capsys):
    assert config.load(None, {"model.dtype": "auto"}).model.dtype == "auto"
    with pytest.raises(ConfigError, match="fp32, bf16, fp16 or auto"):
        config.load(None, {"model.dtype": "bf17"})
    args = build_parser().parse_args(["refresh", "--manifest", "m.parquet", "--store", "s", "--dtype", "auto"])
    assert config_from_args(args, "refresh").model.dtype == "auto"  # refresh takes auto (below)


def test_refresh_auto_keeps_the_dtype_the_store_was_created_with(cpu, tiny_ckpt, tmp_path):
    from test_refresh import cfg_for, manifest, photos

    from igpt_batch.store.layout import Store
    from igpt_batch.store.refresh import read_current, refresh

    d = tmp_path / "img"
    names = photos(d)[:4]
    store = tmp_path / "store"
    auto = {"model.dtype": "auto", "model.device": "cpu"}
    cpu("avx512_bf16")  # the first night resolves from the hardware and records it in the version
    s1 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m1.parquet", d, names[:3]), **auto))
    info = Store(str(store)).version_info(s1["version"])
    assert info["dtype"] == "bf16" and info["dtype_auto_from"] == "this machine: cpu, bf16 CPU flags avx512_bf16"
    assert read_current(str(store)).schema.metadata[b"dtype"] == b"bf16"
    cpu("")  # a later night on a CPU without native bf16: the store's dtype, the same version
    s2 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m2.parquet", d, names), **auto))
    assert (s2["version"], s2["computed"]) == (s1["version"], 1) and Store(str(store)).versions() == [s1["version"]]
    assert read_current(str(store)).schema.metadata[b"dtype"] == b"bf16"
    # naming fp32 is another version; a new store with auto on this CPU resolves to fp32
    s3 = refresh(cfg_for(tiny_ckpt, store, tmp_path / "m2.parquet", **{"model.dtype": "fp32"}))
    assert s3["version"] != s1["version"] and s3["computed"] == 4
    s4 = refresh(cfg_for(tiny_ckpt, tmp_path / "store2", tmp_path / "m2.parquet", **auto))
    assert Store(str(tmp_path / "store2")).version_info(s4["version"])["dtype"] == "fp32" and s4["version"] == s3["version"]
