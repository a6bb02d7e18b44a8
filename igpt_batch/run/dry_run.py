"""`--dry-run`: scan and plan as a run would, then say what it would do and what it would cost, writing nothing.

The job is built by the driver's own `prepare` (inputs listed and read once, into a temporary file removed at the
end; the checkpoint's files read, which may fill a Hugging Face cache), and the output is only read: its job record
and commit markers decide, as in `open_output`, whether the run would resume, start over or be refused. No lease,
no plan files, no model worker. With a GPU name, the capacity model (run/capacity.py, docs/CAPACITY.md) prices the
work left to run.
"""
from __future__ import annotations

import json
import logging

from igpt_batch.config import JobConfig
from igpt_batch.errors import JobError
from igpt_batch.run import capacity

log = logging.getLogger("igpt_batch")


def compat_diff(old: dict, keys: dict) -> list[str]:
    """The compatibility keys whose values differ (as _job.json records them)."""
    new = json.loads(json.dumps(keys))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def dry_run(cfg: JobConfig, task, gpu: str | None = None, price: float | None = None) -> dict:
    """What `run_job(cfg, task)` would do: rows, shards, committed shards, what would run, and with `gpu` the
    estimate. Raises JobError when the run would be refused (an output written with another config)."""
    from igpt_batch.run import dtype_auto, tasks
    from igpt_batch.run.driver import prepare
    from igpt_batch.run.storage import OutputFolder

    g = capacity.gpu(gpu) if gpu else None  # an unknown name fails before the scan
    cfg = dtype_auto.resolve_job(cfg)
    with prepare(cfg, tasks.get(task), dry_run=True) as job:
        out = OutputFolder(cfg.output.path, cfg.storage_options)
        previous = out.read_job()
        diff = compat_diff((previous or {}).get("compat", {}), job.keys) if previous else []
        if previous is None:
            state, committed = "new output", {}
        elif cfg.output.overwrite:
            state, committed = "would remove the previous output (--overwrite)", {}
        elif diff:
            detail = "; ".join(f"{k}: {previous['compat'].get(k)!r} -> {job.keys.get(k)!r}" for k in diff)
            raise JobError(f"dry run: the run would be refused: output {cfg.output.path} was written with a different "
                           f"config ({detail}). Use a new output, or --overwrite to replace it.")
        else:
            state, committed = "resumes the previous output", out.committed()
        shards = job.plan.shards
        todo = [s for s in shards if s.name not in committed]
        per_row = job.task.outputs_per_row(cfg)
        result = {"dry_run": True, "task": job.task.name, "output": out.url, "output_state": state,
                  "dtype": cfg.model.dtype, "rows": job.plan.rows, "shards": len(shards),
                  "shards_committed": len(shards) - len(todo), "shards_to_run": len(todo),
                  "rows_to_run": sum(len(s) for s in todo), "outputs_to_run": sum(len(s) for s in todo) * per_row,
                  "unit": job.task.unit}
        if g is not None:
            layer = job.resolved.info.n_layer if cfg.extract.score else max(job.resolved.layers, default=None)
            result["estimate"] = estimate(job.resolved.info, cfg, job.task.name, result["outputs_to_run"], g, price,
                                          layer)
    return result


def shape_of(info, name: str) -> capacity.Shape:
    """The capacity model's shape of a checkpoint (checkpoint.CheckpointInfo)."""
    return capacity.Shape(name, info.n_layer, info.n_embd, info.n_tokens, info.vocab_size)


def estimate(info, cfg: JobConfig, task: str, outputs: int, g: capacity.GPU, price: float | None,
             layer: int | None) -> dict:
    """The capacity model's time and cost of `outputs` on run.workers GPUs of kind g (one replica each)."""
    est = capacity.estimate(shape_of(info, cfg.model.name), g, "extract" if task in ("extract", "refresh") else task,
                            outputs, cfg.run.workers, layer, price)
    return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in est.items()} | {"layer": layer}


def describe(r: dict) -> str:
    """The dry run's result as lines a person reads."""
    lines = [f"dry run of {r['task']} -> {r['output']} ({r['output_state']}); nothing was written",
             f"  rows {r['rows']:,}, shards {r['shards']:,}: {r['shards_committed']:,} already committed, "
             f"{r['shards_to_run']:,} to run ({r['rows_to_run']:,} rows, {r['outputs_to_run']:,} {r['unit']})"]
    for k in ("new", "changed", "unchanged", "revived", "deleted", "metadata_updates", "failed_unchanged"):
        if k in r:
            lines.append(f"  {k}: {r[k]:,}")
    e = r.get("estimate")
    if e:
        depth = f" through {e['layer']} blocks" if e.get("layer") else ""
        lines += [f"  on {e['gpus']} x {e['gpu']} at ${e['price_per_gpu_hour']:.3f}/GPU-hour{depth} (capacity model "
                  f"from the bf16 dense peak, computed, not measured; docs/CAPACITY.md):",
                  f"    ceiling {e['ceiling_per_gpu_per_s']:,} {r['unit']}/s per GPU: {_hours(e['ceiling_hours'])}, "
                  f"${e['ceiling_dollars']:,.2f}",
                  f"    planning figure ({capacity.PLANNING_FRACTION:.0%} of the ceiling): "
                  f"{_hours(e['planning_hours'])}, ${e['planning_dollars']:,.2f}"]
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h:,.2f} h" if h >= 1 else f"{h * 60:,.1f} min" if h * 60 >= 1 else f"{h * 3600:,.1f} s"
