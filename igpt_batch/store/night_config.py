"""A night's job config from the user's: refresh.score turns on the extract task's scoring, and `--dtype auto`
resolves to the dtype the store was created with (its latest version's), or, in a new store, from the hardware."""
from __future__ import annotations

import copy
import logging

from igpt_batch.config import JobConfig
from igpt_batch.errors import ConfigError

log = logging.getLogger("igpt_batch")


def night_config(cfg: JobConfig) -> JobConfig:
    """A copy of cfg as every step of a night (and its dry run) reads it; the store version follows from it.
    ConfigError without a store or a manifest."""
    if not cfg.refresh.store:
        raise ConfigError("refresh.store is required (--store)")
    if not cfg.input.manifest:
        raise ConfigError("input.manifest is required (--manifest)")
    out = copy.deepcopy(cfg)
    out.extract.score = cfg.refresh.score  # refresh.score decides: nll_bits in the current table or not
    if out.model.dtype != "auto":
        return out
    kept = store_dtype(cfg)
    if kept is None:  # a new store: from the hardware, as a job resolves it (recorded in the version)
        from igpt_batch.run.dtype_auto import resolve_job

        return resolve_job(out)
    log.info("--dtype auto -> %s (the dtype the store was created with)", kept)
    out.model.dtype, out.model.dtype_auto_from = kept, ""  # another CPU's nights keep it: no worker check
    return out


def store_dtype(cfg: JobConfig) -> str | None:
    """The dtype of the store's latest version (None: a store with no version yet)."""
    from igpt_batch.store.layout import Store

    store = Store(cfg.refresh.store, cfg.storage_options)
    if not store.versions():
        return None
    return (store.version_info(store.resolve(None)) or {}).get("dtype")
