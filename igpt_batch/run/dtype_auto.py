"""Resolve `--dtype auto` once per job, before it is planned: GPU workers bf16; CPU workers from the CPU flags the
first worker reports. The job then records and compares the resolved dtype (_job.json, compatibility keys), and
every worker checks its own hardware resolves the same (model/dtypes.check_worker) or refuses to start."""
from __future__ import annotations

import copy
import logging
import os

from igpt_batch.config import JobConfig
from igpt_batch.errors import JobError
from igpt_batch.model import dtypes

log = logging.getLogger("igpt_batch")


def resolve_job(cfg: JobConfig) -> JobConfig:
    """cfg itself unless model.dtype is auto; else a copy with the resolved dtype and model.dtype_auto_from set."""
    if cfg.model.dtype != "auto":
        return cfg
    report, where = worker_hardware(cfg)
    out = copy.deepcopy(cfg)
    out.model.dtype = dtypes.resolve("auto", report)
    flags = ",".join(report.get("cpu_flags") or []) or "none"
    out.model.dtype_auto_from = f"{where}: {report['device']}" + (f", bf16 CPU flags {flags}"
                                                                   if report["device"] == "cpu" else "")
    log.info("--dtype auto -> %s (%s)", out.model.dtype, out.model.dtype_auto_from)
    return out


def worker_hardware(cfg: JobConfig) -> tuple[dict, str]:
    """(the hardware report `auto` is resolved from, where it came from). In-process and on a local Ray the workers
    run on this machine; on a cluster GPU workers are bf16 and a CPU worker reports its flags (a probe task placed
    with a worker's CPUs)."""
    gpus = cfg.run.gpus_per_worker
    cluster = cfg.run.executor == "ray" and (cfg.run.address or os.environ.get("RAY_ADDRESS"))
    if not cluster:
        device = "cpu" if gpus == 0 and cfg.model.device == "auto" else cfg.model.device
        return dtypes.hardware(device), "this machine"
    import ray

    from igpt_batch.run.cluster import init_ray

    init_ray(cfg.run.address)
    if gpus is None:
        gpus = 1 if cfg.model.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
    if gpus > 0:
        return {"device": "cuda", "bf16": True, "cpu_flags": []}, "GPU workers"
    probe = ray.remote(num_cpus=cfg.run.cpus_per_worker, num_gpus=0)(dtypes.hardware)
    try:
        return ray.get(probe.remote("cpu"), timeout=cfg.run.actor_start_timeout), "first worker"
    except ray.exceptions.GetTimeoutError:
        raise JobError(f"--dtype auto: no CPU worker ({cfg.run.cpus_per_worker} CPUs) could be placed within "
                       f"run.actor_start_timeout={cfg.run.actor_start_timeout:.0f} s to report its CPU") from None
