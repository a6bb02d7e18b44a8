"""The driver: plan shards, skip committed ones, run them in-process or on a Ray actor pool with retries, summarise."""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter

import pyarrow as pa

from . import __version__, checkpoint
from .config import ConfigError, JobConfig
from .manifest import Shard, iter_manifest, plan_shards, scan_manifest, write_plan
from .storage import OutputFolder, errors_by_reason, read_output

log = logging.getLogger("igpt_batch")


class JobError(RuntimeError):
    """The job cannot start or did not finish; committed shards stay committed."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"igpt-batch": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "ray", "pyarrow", "numpy", "pillow", "fsspec"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def compat_keys(cfg: JobConfig, task: str, info: checkpoint.CheckpointInfo, layers: list[int], n: int, mf: str | None) -> dict:
    """Everything that decides what a shard contains; a rerun must match these to reuse committed shards."""
    g = cfg.generate
    keys = {"task": task, "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash,
            "dtype": cfg.model.dtype, "shard_size": cfg.run.shard_size, "rows": n, "manifest_fingerprint": mf}
    if task in ("extract", "complete"):  # these decide which rows decode and to what pixels
        keys |= {"draft": cfg.input.draft, "max_pixels": cfg.input.max_pixels, "max_bytes": cfg.input.max_bytes}
    if task == "extract":
        keys["layers"] = layers
    else:
        keys |= {"seed": g.seed, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p}
    if task == "complete":
        keys |= {"prompt_rows": g.prompt_rows, "samples_per_image": g.samples_per_image}
    return keys


def prepare(cfg: JobConfig, task: str):
    """Everything that can fail fast before a model is loaded: output, checkpoint files, manifest, plan."""
    if not cfg.output.path:
        raise ConfigError("output.path is required (--output)")
    info = checkpoint.read_info(cfg.model.name)
    layers = checkpoint.resolve_layers(cfg.extract.layers, info.n_layer) if task == "extract" else []
    fingerprint = None
    if task in ("extract", "complete"):
        if not cfg.input.manifest:
            raise ConfigError("input.manifest is required (--manifest)")
        scan = scan_manifest(cfg.input.manifest, cfg.storage_options)  # streams: memory stays ~8 bytes a row
        n, fingerprint = scan.rows, scan.fingerprint
        shards = plan_shards(n, cfg.run.shard_size)
    else:
        n = cfg.generate.num_samples
        shards = plan_shards(n, cfg.run.shard_size, first=cfg.generate.seed)
    if task == "complete" and not 0 <= cfg.generate.prompt_rows < info.n_px:
        raise ConfigError(f"generate.prompt_rows must be in [0, {info.n_px}) for this {info.n_px}x{info.n_px} model")
    return info, layers, shards, compat_keys(cfg, task, info, layers, n, fingerprint)


def open_output(cfg: JobConfig, keys: dict, job: dict) -> OutputFolder:
    """Check a previous run's _job.json against this one; refuse a mismatch unless overwrite."""
    out = OutputFolder(cfg.output.path, cfg.storage_options)
    try:
        previous = out.read_json("_job.json")
    except PermissionError:
        # the message never carries storage options: they hold the keys
        raise JobError(f"access denied to output {cfg.output.path}: check the storage credentials") from None
    if previous is not None and cfg.output.overwrite:
        log.info("--overwrite: removing the previous output at %s", cfg.output.path)
        out.clear()
    elif previous is not None:
        old = previous.get("compat", {})
        diff = sorted(k for k in set(old) | set(keys) if old.get(k) != keys.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {keys.get(k)!r}" for k in diff)
            raise JobError(f"output {cfg.output.path} was written with a different config ({detail}). "
                           "Use a new output, or --overwrite to replace it.")
    if out.exists("_SUCCESS"):
        out.fs.rm(out.path("_SUCCESS"))
    out.write_json("_job.json", job)
    return out


class Progress:
    """tqdm bar on a TTY; periodic log lines otherwise."""

    def __init__(self, total: int, done: int, unit: str, every_s: float = 10.0):
        from tqdm import tqdm

        self.total, self.done, self.unit, self.every_s = total, done, unit, every_s
        self.t0 = self.last = time.monotonic()
        self.start_done = done
        self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("progress: %d/%d %s (%.1f %s/s, ETA %.0fs)", self.done, self.total, self.unit, rate, self.unit, eta)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_job(cfg: JobConfig, task: str) -> dict:
    """Run one job end to end; returns the _SUCCESS summary. Raises JobError if shards fail or too many rows are bad."""
    t0 = time.time()
    info, layers, shards, keys = prepare(cfg, task)
    job = {"task": task, "config": cfg.to_dict(redact=True), "compat": keys, "model": cfg.model.name,
           "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash, "layers": layers,
           "n_px": info.n_px, "shards": len(shards), "versions": _versions()}
    out = open_output(cfg, keys, job)
    committed = out.committed()
    todo = [s for s in shards if s.name not in committed]
    log.info("%s: %d shards planned, %d already committed, %d to run -> %s", task, len(shards),
             len(shards) - len(todo), len(todo), cfg.output.path)
    meta = {"model": cfg.model.name, "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash,
            "dtype": cfg.model.dtype, "task": task}

    if cfg.input.manifest and task != "generate":  # each shard's input rows, for its worker to read
        write_plan(cfg.input.manifest, cfg.storage_options, cfg.run.shard_size, todo,
                   lambda s, rows: out.write_part("_plan", s.name, rows))
    unit = "images" if task == "extract" else "samples"
    per_row = cfg.generate.samples_per_image if task == "complete" else 1
    progress = Progress(sum(len(s) for s in shards) * per_row, sum(len(s) for s in shards if s.name in committed) * per_row, unit)
    records: dict[str, dict] = {}

    def done(rec: dict) -> None:
        records[rec["shard"]] = rec
        progress.update((rec["stop"] - rec["start"]) * per_row)

    try:
        from .executors import execute

        failed = execute(cfg, task, meta, todo, done)
    finally:
        progress.close()
    if failed:
        raise JobError(f"{len(failed)} shard(s) failed after {cfg.run.max_retries} retries: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    summary = summarise(out, task, shards, committed, records, time.time() - t0)
    _pictures(cfg, task, info, out)
    n_rows = summary["input_rows"]
    if n_rows and summary["errors"] / n_rows > cfg.run.max_error_fraction:
        out.write_json("_FAILED", summary)
        raise JobError(f"{summary['errors']} of {n_rows} input rows failed, over run.max_error_fraction="
                       f"{cfg.run.max_error_fraction}; committed shards are kept. Errors by reason: {summary['errors_by_reason']}")
    out.remove("_plan")  # inputs of committed shards; a rerun skips them anyway
    out.write_json("_SUCCESS", summary)
    log.info("done: %s", {k: v for k, v in summary.items() if k != "errors_by_reason"})
    return summary


def summarise(out: OutputFolder, task: str, shards: list[Shard], before: dict, records: dict, wall_s: float) -> dict:
    rows = Counter()
    for rec in {**before, **records}.values():  # every committed shard: earlier runs' and this run's
        rows.update(rec.get("rows", {}))
    errors = read_output(out.url, "errors", out.fs.storage_options) if rows.get("errors") else None
    by_reason = errors_by_reason(errors) if errors is not None else Counter()
    stage_s = Counter()
    for rec in records.values():
        stage_s.update(rec["stats"])
    new_rows = sum(r["stop"] - r["start"] for r in records.values())
    return {
        "task": task, "shards": len(shards), "shards_skipped": len(before), "shards_run": len(records),
        "input_rows": sum(len(s) for s in shards) if task != "generate" else 0,
        "rows": dict(rows), "errors": rows.get("errors", 0), "errors_by_reason": dict(by_reason.most_common()),
        "wall_s": round(wall_s, 3), "rows_per_s": round(new_rows / wall_s, 3) if wall_s else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_s.items()},
    }


def _pictures(cfg: JobConfig, task: str, info: checkpoint.CheckpointInfo, out: OutputFolder) -> None:
    from . import pictures

    def clusters_and_head():  # the palette, and the manifest's first rows (the ones pictured)
        return checkpoint.read_clusters(info.path), next(iter_manifest(cfg.input.manifest, cfg.storage_options))

    if task == "generate" and cfg.output.contact_sheet:
        pictures.write_contact_sheet(out, cfg.output.contact_sheet)
    elif task == "complete" and cfg.output.contact_sheet:
        pictures.write_completion_sheet(out, cfg, *clusters_and_head(), info.n_px, cfg.output.contact_sheet)
    elif task == "extract" and cfg.output.preview:
        pictures.write_preview(out, cfg, *clusters_and_head(), info.n_px, cfg.output.preview)
