"""The driver: build the job once, skip committed shards, run the rest in-process or on a Ray actor pool, summarise."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import time
from collections import Counter
from typing import Callable

from igpt_batch.config import JobConfig
from igpt_batch.errors import ConfigError, ExecutorError, JobError, LeaseError
from igpt_batch.inputs.manifest import Columns, Inputs, write_plan
from igpt_batch.model import checkpoint
from igpt_batch.run import dtype_auto, guards, lance_output, report, sizing, tasks
from igpt_batch.run.job import Job
from igpt_batch.run.storage import Lease, OutputFolder, errors_by_reason
from igpt_batch.run.tally import Tally
from igpt_batch.run.tasks import Plan, Task

log = logging.getLogger("igpt_batch")
EARLY_RAY_ROWS = 65_536  # rows scanned before the driver starts Ray in the background (the Ray executor)


def prepare(cfg: JobConfig, task: Task, info: checkpoint.CheckpointInfo | None = None, dry_run: bool = False) -> Job:
    """The job, with everything that can fail fast checked before a model is loaded: output, checkpoint files,
    inputs (listed and read once), plan, and an output that overlaps the inputs. `info` is a checkpoint already read
    by the caller (refresh reads, and so hashes, the weights once a night). Close the job (`with`) when done.
    `dry_run` (run/dry_run.py): the output is checked without writing into it."""
    if not cfg.output.path:
        raise ConfigError("output.path is required (--output)")
    if task.reads_manifest and not cfg.input.manifest:
        raise ConfigError("input.manifest is required (--manifest)")
    guards.check_output_usable(cfg.output.path, write_probe=not dry_run)
    info = info or checkpoint.read_info(cfg.model.name, cfg.storage_options)
    task.check(cfg, info)
    if cfg.output.format not in task.formats:
        raise ConfigError(f"output.format: {cfg.output.format} is not written by {task.name}, which writes "
                          f"{' or '.join(task.formats)}")
    resolved = task.resolve(cfg, info)
    if not task.reads_manifest:
        cfg = sized(cfg, task, info)
        return Job(cfg, task, resolved, task.plan(cfg, None))
    inputs = Inputs(cfg.input.manifest, cfg.storage_options, Columns.of(cfg.input),
                    on_rows=None if dry_run else ray_meanwhile(cfg))
    try:
        cfg = sized(cfg, task, info)
        job = Job(cfg, task, resolved, task.plan(cfg, inputs.scan), inputs)
        # images inside the inputs (a bytes column, tar members) live where the manifest is: its check is enough
        guards.check_not_inputs(cfg.output.path, cfg.input.manifest, inputs.tables() if job.kind == "uri" else [])
    except BaseException:
        inputs.close()
        raise
    return job


def ray_meanwhile(cfg: JobConfig) -> Callable[[int], None] | None:
    """For the Ray executor, the scan's row counter: once it has read EARLY_RAY_ROWS rows (a scan of seconds),
    Ray starts in the background, so that its start overlaps the rest of the planning (small inputs never do)."""
    if cfg.run.executor != "ray":
        return None
    seen = [0]

    def on_rows(n: int) -> None:
        from igpt_batch.run.cluster import start_ray_early

        seen[0] += n
        if seen[0] >= EARLY_RAY_ROWS:
            start_ray_early(cfg.run.address)  # once: a no-op while it starts and after
    return on_rows


def sized(cfg: JobConfig, task: Task, info: checkpoint.CheckpointInfo) -> JobConfig:
    """cfg with run.shard_size: auto resolved, once per output: a resume reads the size from _job.json."""
    if cfg.run.shard_size != "auto":
        return cfg

    def gpu() -> bool:
        from igpt_batch.run.cluster import worker_gpus  # asks the Ray cluster (starting Ray) when it must

        return worker_gpus(cfg) > 0

    previous = None
    if cfg.output.path and not cfg.output.overwrite:  # --overwrite replaces the output: sized afresh
        try:
            previous = OutputFolder(cfg.output.path, cfg.storage_options).read_job()
        except PermissionError:
            raise access_denied(cfg) from None
    return sizing.resolve(cfg, task.name, task.part_row_bytes(cfg, info), previous, gpu)


def access_denied(cfg: JobConfig) -> JobError:
    """The message never carries storage options: they hold the keys."""
    return JobError(f"access denied to output {cfg.output.path}: check the storage credentials")


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
    out.sweep()  # a killed run's temp and plan files
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
    cfg = dtype_auto.resolve_job(cfg)  # --dtype auto: resolved once, recorded and compared as resolved
    with prepare(cfg, tasks.get(task), info) as job:
        lease = Lease(OutputFolder(cfg.output.path, cfg.storage_options), cfg.run.lease_timeout)  # never a live one
        try:
            with lease:
                job = dataclasses.replace(job, resolved=dataclasses.replace(job.resolved, lease=lease.fence))  # fences commits
                try:
                    return _run(job, on_mismatch, t0)
                finally:
                    lease.folder.end_job(lease.fence)  # plan files (fetchable URLs) go however the job ends
        except LeaseError as e:
            raise JobError(str(e)) from None
        except PermissionError:
            raise access_denied(cfg) from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise JobError(f"no space left on the disk of {cfg.output.path}; committed shards are kept, free some "
                           "space and rerun to resume") from None


def _run(job: Job, on_mismatch: str, t0: float) -> dict:
    cfg, task, plan = job.cfg, job.task, job.plan
    out = open_output(cfg, job.keys, job.record(), on_mismatch)
    committed = out.committed()
    lance = lance_output.committer(job, out, committed)  # output.format: lance: the dataset's one writer; else None
    todo = [s for s in plan.shards if s.name not in committed]
    log.info("%s: %d shards planned, %d already committed, %d to run -> %s", task.name, len(plan.shards),
             len(plan.shards) - len(todo), len(todo), cfg.output.path)
    write_plan_files(job, out, todo)
    tally = Tally()  # every committed shard's record, counted and kept compact: none is read again
    for rec in committed.values():
        tally.add(rec, this_run=False)
    del committed
    _execute(job, todo, tally, lance)
    summary = summarise(out, task, plan, tally, time.time() - t0)
    commits = tally.commits
    if lance is not None:
        lance.sweep()  # data files of actors killed before their marker
    try:
        task.pictures(cfg, job.resolved, out, job.inputs.head if job.inputs else None, commits)
    except Exception as e:  # a picture is a convenience: it never fails a job whose shards are all committed
        log.warning("could not draw the %s pictures (%s: %s); the output is complete", task.name, type(e).__name__, e)
    report.maybe_write(cfg, out, summary, commits=commits)  # report.html beside _SUCCESS (output.report); never raises
    n_rows = summary["input_rows"]
    if n_rows and summary["errors"] / n_rows > cfg.run.max_error_fraction:
        out.finish(summary, ok=False, lease=job.resolved.lease)
        raise JobError(f"{summary['errors']} of {n_rows} input rows failed, over run.max_error_fraction="
                       f"{cfg.run.max_error_fraction}; committed shards are kept. Errors by reason: {summary['errors_by_reason']}")
    out.finish(summary, ok=True, lease=job.resolved.lease)
    log.info("done: %d shards (%d skipped), rows %s, %d errors, %.1f s", summary["shards"], summary["shards_skipped"],
             summary["rows"], summary["errors"], summary["wall_s"])
    return summary


def write_plan_files(job: Job, out: OutputFolder, todo: list) -> None:
    """The shards to run get their input rows in the output's plan files (a few files, a row group per shard: the
    driver's PUTs do not grow with shards), from the rows the scan kept; the kept rows are released after (the
    pictures need only the head)."""
    if job.inputs is None or not todo:
        job.close()
        return
    try:
        with out.plan_writer() as plan:
            write_plan(job.inputs.tables(), todo, plan.add)
    except OSError as e:
        raise JobError(guards.plan_write_error(e, job.cfg.output.path)) from None
    finally:
        job.close()


def _execute(job: Job, todo: list, tally: Tally, lance=None) -> None:
    """Run the shards to run with a progress bar or log; their commit records go into `tally` as they arrive, and
    to `lance` (a lance_output.Committer), which commits their fragments in batches and what arrived however it ends."""
    from igpt_batch.run.executors import execute

    per_row = job.task.outputs_per_row(job.cfg)
    shards = job.plan.shards
    progress = Progress(sum(len(s) for s in shards) * per_row,
                        sum(len(s) for s in shards if s.name in tally.commits) * per_row, job.task.unit)

    def done(rec: dict) -> None:  # where each commit record arrives
        if lance is not None:
            lance.add(rec)
        tally.add(rec)  # counted, and kept compact: the whole record is not held
        progress.update((rec["stop"] - rec["start"]) * per_row)

    try:
        failed = execute(job, todo, done)
    except ExecutorError as e:
        raise JobError(str(e)) from None
    finally:
        progress.close()
        if lance is not None:
            lance.close()
    if failed:
        raise JobError(f"{len(failed)} shard(s) failed after {job.cfg.run.max_retries} retries: "
                       + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))


def summarise(out: OutputFolder, task: Task, plan: Plan, tally: Tally, wall_s: float) -> dict:
    """The _SUCCESS summary from the commit records counted as they arrived (read once at the start, and handed
    back by the executor): no per-shard reads, except the errors parts of earlier runs' shards whose records
    predate `errors_by_reason`."""
    by_reason = Counter(tally.by_reason)
    for part in out.committed_files("errors", {name: tally.commits[name] for name in tally.older}):
        by_reason.update(errors_by_reason(out.read_table(part, ["stage", "error"])))
    run_s = tally.running_seconds()
    return {
        "task": task.name, "shards": len(plan.shards), "shards_skipped": len(tally.commits) - len(tally.run_shards),
        "shards_run": len(tally.run_shards), "input_rows": plan.rows if task.reads_manifest else 0,
        "rows": dict(tally.rows), "errors": tally.rows.get("errors", 0), "errors_by_reason": dict(by_reason.most_common()),
        # rows_per_s: over the shards' own span (first start to last commit), so start-up and model load are out
        "wall_s": round(wall_s, 3), "run_s": round(run_s, 3) if run_s else None,
        "rows_per_s": round(tally.new_rows / run_s, 3) if run_s else None,
        "stage_seconds": tally.stats.seconds(3), "http_retries": tally.stats.http_retries,
    }
