"""`refresh --dry-run`: plan the night as refresh would (every manifest row decided against the current table) and
say what it would embed and cost, writing nothing into the store.

Planning's bucket files go to a temporary folder removed at the end (refresh.planning_folder), planned in this
process; no lease is taken, no interrupted night is finished, no snapshot, manifest or version is written.
"""
from __future__ import annotations

import copy
import tempfile

from igpt_batch.config import JobConfig
from igpt_batch.inputs.manifest import plan_shards
from igpt_batch.model import checkpoint
from igpt_batch.run import capacity
from igpt_batch.run.dry_run import estimate
from igpt_batch.run.storage import OutputFolder

COUNTS = ("new", "changed", "unchanged", "revived", "deleted", "metadata_updates", "failed_unchanged")


def dry_night(cfg: JobConfig, gpu: str | None = None, price: float | None = None) -> dict:
    """What `refresh(cfg)` would do tonight (the keys of the job dry run plus the night's counts)."""
    from igpt_batch.store.layout import Store
    from igpt_batch.store.night_config import night_config
    from igpt_batch.store.night_plan import plan_night
    from igpt_batch.store.refresh import _summary, version_of

    cfg = night_config(cfg)  # as refresh reads it: refresh.score, the store's dtype for auto
    g = capacity.gpu(gpu) if gpu else None
    info = checkpoint.read_info(cfg.model.name, cfg.storage_options)
    layers = checkpoint.resolve_layers(cfg.extract.layers, info.n_layer)
    version, _ = version_of(cfg, info)
    store = Store(cfg.refresh.store, cfg.storage_options)
    pending = store.pending(version)
    with tempfile.TemporaryDirectory(prefix="igpt-dry-run-") as scratch:
        sub = copy.deepcopy(cfg)
        sub.refresh.planning_folder, sub.run.executor = scratch, "local"  # scratch is this machine's
        plan = plan_night(sub, store, version, store.read_failed(version), pending and pending["snapshot"])
    s = _summary(cfg, version, plan)
    cfg = _sized(cfg, store, version, pending, info)  # the shard size tonight's extract would use
    shards = plan_shards(s["computed"], cfg.run.shard_size)
    done = _committed(store, version, pending, s["computed"], cfg) if s["computed"] else set()
    todo = sum(len(x) for x in shards if x.name not in done)
    state = "new version" if store.version_info(version) is None else "existing version"
    if pending and s["computed"]:
        state += f", resumes the night {pending['snapshot']} that did not finish"
    result = {"dry_run": True, "task": "refresh", "output": store.url, "output_state": state, "version": version,
              "dtype": cfg.model.dtype, "rows": s["manifest_rows"], "shards": len(shards),
              "shards_committed": len(shards) - sum(x.name not in done for x in shards),
              "shards_to_run": sum(x.name not in done for x in shards), "rows_to_run": todo, "outputs_to_run": todo, "unit": "images",
              **{k: s[k] for k in COUNTS}, "to_embed": s["computed"], "current_rows": s["current_rows"]}
    if g is not None:
        layer = info.n_layer if cfg.extract.score else max(layers)
        result["estimate"] = estimate(info, cfg, "refresh", todo, g, price, layer)
    return result


def _sized(cfg: JobConfig, store, version: str, pending: dict | None, info) -> JobConfig:
    """cfg with run.shard_size resolved as the night's extract resolves it (driver.sized): an interrupted night's
    recorded size, else from the workers' resources."""
    from igpt_batch.run.driver import sized
    from igpt_batch.run.tasks.extract import Extract

    if cfg.run.shard_size != "auto":
        return cfg
    sub = copy.deepcopy(cfg)
    if pending:
        sub.output.path = store.snapshot_url(version, pending["snapshot"])
    else:
        sub.output.path, sub.output.overwrite = None, True  # a new night: no earlier size to reuse
    out = copy.deepcopy(cfg)
    out.run.shard_size = sized(sub, Extract(), info).run.shard_size
    return out


def _committed(store, version: str, pending: dict | None, rows: int, cfg: JobConfig) -> set[str]:
    """Shards a killed night already committed that tonight's run would keep: its extract output resumes only when
    it was planned over the same rows (else it is replaced)."""
    if not pending:
        return set()
    out = OutputFolder(store.snapshot_url(version, pending["snapshot"]), cfg.storage_options)
    compat = (out.read_job() or {}).get("compat", {})
    if compat.get("rows") != rows or compat.get("shard_size") != cfg.run.shard_size:
        return set()
    return set(out.committed())


def run(cfg: JobConfig, task: str, gpu: str | None, price: float | None, echo=print) -> int:
    """`igpt-batch TASK --dry-run`: the plan as text, then one JSON line (the last on stdout)."""
    import json

    from igpt_batch.run.dry_run import describe, dry_run

    result = dry_night(cfg, gpu, price) if task == "refresh" else dry_run(cfg, task, gpu, price)
    echo(describe(result))
    echo(json.dumps(result, sort_keys=True))
    return 0
