"""`--dtype auto`: bf16 where the hardware computes it natively, fp32 elsewhere.

Native bf16: a CUDA device with bf16 arithmetic (Ampere and later), or a CPU with AMX (amx_bf16) or AVX512-BF16
(avx512_bf16) in /proc/cpuinfo's flags. Elsewhere bf16 is emulated and slower than fp32 (docs/BENCHMARKS.md).
A job resolves `auto` once (run/dtype_auto.py); each worker checks that its own hardware agrees (`check_worker`).
"""
from __future__ import annotations

BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the first `flags` line of /proc/cpuinfo (or of the text given); empty if none."""
    if cpuinfo is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def cuda_bf16() -> bool:
    """Whether this process's CUDA device computes bf16 natively (no emulation)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return bool(torch.cuda.is_bf16_supported())


def hardware(device: str) -> dict:
    """What `auto` is resolved from in this process: {"device": "cuda"|"cpu", "bf16": bool, "cpu_flags": [...]}
    (the bf16-relevant CPU flags only, so it stays short in logs and _job.json)."""
    import torch

    spec = str(device).strip().lower()
    kind = "cuda" if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()) else "cpu"
    flags = cpu_flags()
    bf16 = cuda_bf16() if kind == "cuda" else bool(flags & BF16_CPU_FLAGS)
    return {"device": kind, "bf16": bf16, "cpu_flags": sorted(flags & BF16_CPU_FLAGS)}


def resolve(requested: str, report: dict) -> str:
    """`requested` unless it is auto; then bf16 where `report` (from `hardware`) says bf16 is native, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if report.get("bf16") else "fp32"


def check_worker(model_cfg) -> dict | None:
    """In a worker of a job whose dtype was `auto` (model.dtype_auto_from set, model.dtype the job's resolution):
    refuse to start, with a clear message, on hardware where `auto` resolves differently. Returns this worker's
    hardware report (None when the job named its dtype)."""
    if not model_cfg.dtype_auto_from:
        return None
    report = hardware(model_cfg.device)
    mine = resolve("auto", report)
    if mine != model_cfg.dtype:
        why = "bf16 is native here" if report["bf16"] else f"no native bf16 on this {report['device']}"
        raise RuntimeError(
            f"--dtype auto resolved to {model_cfg.dtype} for this job ({model_cfg.dtype_auto_from}), but to {mine} on "
            f"this worker ({why}; bf16 CPU flags {','.join(report['cpu_flags']) or 'none'}): refusing to start, so "
            "the output keeps one dtype. Run the job's workers on alike hardware, or pass --dtype fp32 or bf16.")
    return report
