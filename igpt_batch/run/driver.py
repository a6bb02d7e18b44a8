"""The driver: plan shards, skip committed ones, run them in-process or on a Ray actor pool with retries, summarise."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import time
from collections import Counter

from igpt_batch import __version__
from igpt_batch.config import JobConfig
from igpt_batch.errors import ConfigError, ExecutorError, JobError, LeaseError
from igpt_batch.inputs.manifest import Columns, iter_manifest, write_plan
from igpt_batch.model import checkpoint
from igpt_batch.run import guards, tasks
from igpt_batch.run.storage import Lease, OutputFolder, errors_by_reason, read_output
from igpt_batch.run.tasks import Plan, Resolved, Task

log = logging.getLogger("igpt_batch")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"igpt-batch": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "ray", "pyarrow", "numpy", "pillow", "fsspec"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def prepare(cfg: JobConfig, task: Task, info: checkpoint.CheckpointInfo | None = None) -> tuple[Resolved, Plan, dict]:
    """Everything that can fail fast before a model is loaded: output, checkpoint files, manifest, plan.
    `info` is a checkpoint already read by the caller (refresh reads, and so hashes, the weights once a night)."""
    if not cfg.output.path:
        raise ConfigError("output.path is required (--output)")
    if task.reads_manifest and not cfg.input.manifest:
        raise ConfigError("input.manifest is required (--manifest)")
    guards.check_output_usable(cfg.output.path)
    info = info or checkpoint.read_info(cfg.model.name)
    task.check(cfg, info)
    resolved = task.resolve(cfg, info)
    plan = task.plan(cfg)
    if task.reads_manifest:  # after the scan: the manifest is known to be readable
        # images inside the manifest (a bytes column, tar shards) live where the manifest is: its check is enough
        inside = cfg.input.bytes_column or cfg.input.manifest.rstrip("/").endswith((".tar", "}"))
        guards.check_not_inputs(cfg.output.path, cfg.input.manifest, [] if inside else iter_manifest(
            cfg.input.manifest, cfg.storage_options, Columns(cfg.input.id_column, cfg.input.uri_column)))
    return resolved, plan, task.compat_keys(cfg, resolved, plan)


def open_output(cfg: JobConfig, keys: dict, job: dict, on_mismatch: str) -> OutputFolder:
    """Check a previous run's job against this one. With cfg.output.overwrite the previous output is replaced;
    otherwise a mismatch is refused (on_mismatch="refuse") or replaced ("overwrite"), and a match resumes."""
    out = OutputFolder(cfg.output.path, cfg.storage_options)
    previous = out.read_job()
    old = (previous or {}).get("compat", {})
    diff = sorted(k for k in set(old) | set(keys) if old.get(k) != json.loads(json.dumps(keys)).get(k))
    if previous is not None and (cfg.output.overwrite or (diff and on_mismatch == "overwrite")):
        log.info("removing the previous output at %s (%s)", cfg.output.path,
                 "--overwrite" if cfg.output.overwrite else "planned differently")
        out.clear()
    elif previous is not None and diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {keys.get(k)!r}" for k in diff)
        raise JobError(f"output {cfg.output.path} was written with a different config ({detail}). "
                       "Use a new output, or --overwrite to replace it.")
    out.sweep()  # h-output: a killed run's temp and plan files
    out.start_job(job)
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


def run_job(cfg: JobConfig, task: "Task | str", *, info: checkpoint.CheckpointInfo | None = None,
            on_mismatch: str = "refuse") -> dict:
    """Run one job end to end; returns the _SUCCESS summary. Raises JobError if shards fail or too many rows are bad."""
    t0 = time.time()
    task = tasks.get(task)
    resolved, plan, keys = prepare(cfg, task, info)
    info = resolved.info
    job = {"task": task.name, "config": cfg.to_dict(redact=True), "compat": keys, "model": cfg.model.name,
           "weights_fingerprint": info.weights_fingerprint, "palette_hash": info.palette_hash,
           "layers": list(resolved.layers), "n_px": info.n_px, "shards": len(plan.shards), "versions": _versions()}
    lease = Lease(OutputFolder(cfg.output.path, cfg.storage_options), cfg.run.lease_timeout)  # h-output: never a live one
    try:
        with lease:
            resolved = dataclasses.replace(resolved, lease=lease.fence)  # h-output: workers fence their commits with it
            try:
                return _run(cfg, task, resolved, plan, keys, job, on_mismatch, t0)
            finally:
                lease.folder.end_job(lease.fence)  # h-output: plan files (fetchable URLs) go however the job ends
    except LeaseError as e:
        raise JobError(str(e)) from None
    except PermissionError:  # the message never carries storage options: they hold the keys
        raise JobError(f"access denied to output {cfg.output.path}: check the storage credentials") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise JobError(f"no space left on the disk of {cfg.output.path}; committed shards are kept, free some space "
                       "and rerun to resume") from None


def _run(cfg: JobConfig, task: Task, resolved: Resolved, plan: Plan, keys: dict, job: dict, on_mismatch: str,
         t0: float) -> dict:
    out = open_output(cfg, keys, job, on_mismatch)
    committed = out.committed()
    todo = [s for s in plan.shards if s.name not in committed]
    log.info("%s: %d shards planned, %d already committed, %d to run -> %s", task.name, len(plan.shards),
             len(plan.shards) - len(todo), len(todo), cfg.output.path)
    if task.reads_manifest:  # each shard's input rows, for its worker to read
        try:
            write_plan(cfg.input.manifest, cfg.storage_options, cfg.run.shard_size, todo,
                       lambda s, rows: out.write_plan(s.name, rows), columns=Columns.of(cfg.input))
        except OSError as e:
            raise JobError(guards.plan_write_error(e, cfg.output.path)) from None
    per_row = task.outputs_per_row(cfg)
    progress = Progress(sum(len(s) for s in plan.shards) * per_row,
                        sum(len(s) for s in plan.shards if s.name in committed) * per_row, task.unit)
    records: dict[str, dict] = {}

    def done(rec: dict) -> None:
        records[rec["shard"]] = rec
        progress.update((rec["stop"] - rec["start"]) * per_row)

    from igpt_batch.run.executors import execute

    try:
        failed = execute(cfg, task, resolved, todo, done)
    except ExecutorError as e:
        raise JobError(str(e)) from None
    finally:
        progress.close()
    if failed:
        raise JobError(f"{len(failed)} shard(s) failed after {cfg.run.max_retries} retries: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    summary = summarise(out, task, plan, committed, records, time.time() - t0)
    try:
        task.pictures(cfg, resolved, out)
    except Exception as e:  # a picture is a convenience: it never fails a job whose shards are all committed
        log.warning("could not draw the %s pictures (%s: %s); the output is complete", task.name, type(e).__name__, e)
    n_rows = summary["input_rows"]
    if n_rows and summary["errors"] / n_rows > cfg.run.max_error_fraction:
        out.finish(summary, ok=False, lease=resolved.lease)  # h-output
        raise JobError(f"{summary['errors']} of {n_rows} input rows failed, over run.max_error_fraction="
                       f"{cfg.run.max_error_fraction}; committed shards are kept. Errors by reason: {summary['errors_by_reason']}")
    out.finish(summary, ok=True, lease=resolved.lease)  # h-output
    log.info("done: %d shards (%d skipped), rows %s, %d errors, %.1f s", summary["shards"], summary["shards_skipped"],
             summary["rows"], summary["errors"], summary["wall_s"])
    return summary


def summarise(out: OutputFolder, task: Task, plan: Plan, before: dict, records: dict, wall_s: float) -> dict:
    rows = Counter()
    for rec in {**before, **records}.values():  # every committed shard: earlier runs' and this run's
        rows.update(rec.get("rows", {}))
    errors = read_output(out.url, "errors", out.fs.storage_options) if rows.get("errors") else None
    by_reason = errors_by_reason(errors) if errors is not None else Counter()
    stage_s = Counter()
    for rec in records.values():
        stage_s.update(rec["stats"])
    retries = int(stage_s.pop("retries", 0))
    new_rows = sum(r["stop"] - r["start"] for r in records.values())
    return {
        "task": task.name, "shards": len(plan.shards), "shards_skipped": len(before), "shards_run": len(records),
        "input_rows": plan.rows if task.reads_manifest else 0,
        "rows": dict(rows), "errors": rows.get("errors", 0), "errors_by_reason": dict(by_reason.most_common()),
        "wall_s": round(wall_s, 3), "rows_per_s": round(new_rows / wall_s, 3) if wall_s else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_s.items()}, "http_retries": retries,
    }
