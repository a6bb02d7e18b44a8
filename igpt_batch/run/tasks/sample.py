"""The sampling tasks: generate (one image per seed) and complete (the bottom of each image from its top rows)."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.errors import ConfigError
from igpt_batch.inputs.manifest import ManifestScan, plan_shards
from igpt_batch.model.checkpoint import CheckpointInfo
from igpt_batch.run.context import Resolved, ShardContext, Stats
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tasks.base import Plan, Task, error_row, error_table, shard_size


class _Sampling(Task):
    unit = "samples"

    def resolve(self, cfg: JobConfig, info: CheckpointInfo) -> Resolved:
        g = cfg.generate
        meta = super().resolve(cfg, info).meta | {
            "temperature": str(g.temperature), "top_k": str(g.top_k), "top_p": str(g.top_p), "n_px": str(info.n_px)}
        return Resolved(info, (), meta)

    def part_row_bytes(self, cfg: JobConfig, info: CheckpointInfo) -> int:
        per_sample = 2 * info.n_px * info.n_px + 3 * info.n_px * info.n_px // 2 + 64  # uint16 tokens, PNG, ids
        return per_sample * self.outputs_per_row(cfg)

    def keys(self, cfg: JobConfig, resolved: Resolved) -> dict:
        g = cfg.generate  # write_png_files: a rerun that asks for PNGs the committed shards lack is refused
        return {"seed": g.seed, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
                "write_png_files": cfg.output.write_png_files}


class Generate(_Sampling):
    """Unconditional samples: seeds seed .. seed+N-1, one image each."""

    name = "generate"
    reads_manifest = False

    def plan(self, cfg: JobConfig, scan: ManifestScan | None) -> Plan:
        n = cfg.generate.num_samples
        return Plan(n, plan_shards(n, shard_size(cfg), first=cfg.generate.seed))

    def runner(self, ctx: ShardContext) -> "SampleRunner":
        return SampleRunner(ctx)

    def pictures(self, cfg: JobConfig, resolved: Resolved, out: OutputFolder, head: pa.Table | None,
                 commits: dict[str, dict]) -> None:
        if cfg.output.contact_sheet:
            from igpt_batch.run import pictures

            pictures.write_contact_sheet(out, cfg.output.contact_sheet, commits)


class Complete(_Sampling):
    """Completions: the first prompt_rows pixel rows of each image kept, K samples of the rest."""

    name = "complete"

    def check(self, cfg: JobConfig, info: CheckpointInfo) -> None:
        if not 0 <= cfg.generate.prompt_rows < info.n_px:
            raise ConfigError(f"generate.prompt_rows must be in [0, {info.n_px}) for this {info.n_px}x{info.n_px} model")

    def outputs_per_row(self, cfg: JobConfig) -> int:
        return cfg.generate.samples_per_image

    def plan(self, cfg: JobConfig, scan: ManifestScan | None) -> Plan:
        plan = super().plan(cfg, scan)
        last = cfg.generate.seed + plan.rows * cfg.generate.samples_per_image
        if last > 2**63:
            raise ConfigError(f"generate.seed {cfg.generate.seed} + {plan.rows} rows x {cfg.generate.samples_per_image} "
                              "samples per image passes the largest seed, 2**63 - 1")
        return plan

    def keys(self, cfg: JobConfig, resolved: Resolved) -> dict:
        g = cfg.generate
        return super().keys(cfg, resolved) | {"prompt_rows": g.prompt_rows, "samples_per_image": g.samples_per_image}

    def runner(self, ctx: ShardContext) -> "CompleteRunner":
        return CompleteRunner(ctx)

    def pictures(self, cfg: JobConfig, resolved: Resolved, out: OutputFolder, head: pa.Table | None,
                 commits: dict[str, dict]) -> None:
        if cfg.output.contact_sheet:
            from igpt_batch.model.checkpoint import read_clusters
            from igpt_batch.run import pictures

            pictures.write_completion_sheet(out, cfg, read_clusters(resolved.info.path), head, resolved.info.n_px,
                                            cfg.output.contact_sheet, commits)


class SampleRunner:
    """Per shard: sample every seed of the shard, batch by batch, into the samples table."""

    def __init__(self, ctx: ShardContext):
        from igpt_batch.model import batching

        self.ctx, self.meta, self.n_px = ctx, ctx.resolved.meta, ctx.resolved.info.n_px
        if ctx.model.device.type == "cuda" and ctx.cfg.model.compile:
            ctx.model.compile_decode(buckets=ctx.cfg.model.decode_buckets)
        self.batch_size = batching.sample_batch_size(ctx.model, ctx.cfg.generate.batch_size)

    def sample(self, seeds: list[int], prompts: np.ndarray | None, stats: Stats) -> tuple[np.ndarray, list[bytes]]:
        """Tokens (B, n_px*n_px) and PNGs of one batch of seeds (and prompts); writes pngs/ when asked."""
        from igpt_batch.model import palette
        from igpt_batch.model.sampling import generate

        g = self.ctx.cfg.generate
        with self.ctx.model_lock:
            t = time.perf_counter()
            tokens = generate(self.ctx.model, seeds, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                              prompt=prompts)
            stats.model_s += time.perf_counter() - t
        t = time.perf_counter()
        pngs = [palette.to_png(im) for im in palette.detokenize(tokens, self.ctx.model.clusters, self.n_px)]
        if self.ctx.cfg.output.write_png_files:
            for seed, png in zip(seeds, pngs):
                self.ctx.out.write_png(seed, png)
        stats.preprocess_s += time.perf_counter() - t
        return tokens, pngs

    def table(self, columns: dict, tokens: list[np.ndarray], pngs: list[bytes]) -> pa.Table:
        n_tok = self.n_px * self.n_px
        flat = np.concatenate([np.zeros((0, n_tok), np.int64), *tokens]).reshape(-1).astype(np.uint16)
        return pa.table({
            **columns,
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint16()), n_tok),
            "png": pa.array(pngs, pa.binary()),
        }).replace_schema_metadata(self.meta)

    def __call__(self, shard, rows, stats: Stats) -> dict[str, pa.Table]:
        seeds = list(range(shard.start, shard.stop))
        toks, pngs = [], []
        for i in range(0, len(seeds), self.batch_size):
            t, p = self.sample(seeds[i:i + self.batch_size], None, stats)
            toks.append(t), pngs.extend(p)
        return {"samples": self.table({"seed": pa.array(seeds, pa.int64())}, toks, pngs)}


class CompleteRunner(SampleRunner):
    """Per shard: tokenise each readable image, keep its prompt rows, sample K completions; errors for the rest."""

    def __call__(self, shard, rows: pa.Table, stats: Stats) -> dict[str, pa.Table]:
        from igpt_batch.errors import ImageError
        from igpt_batch.model.extractor import tokenizer_for

        g, model = self.ctx.cfg.generate, self.ctx.model
        k, r = g.samples_per_image, g.prompt_rows * self.n_px
        tokenize = tokenizer_for(model.device)
        cols: dict[str, list] = {"prompt_id": [], "sample_index": [], "seed": []}
        toks, pngs, errors = [], [], []
        pending: list[tuple[int, str, np.ndarray]] = []  # (row index, id, prompt tokens)

        def flush() -> None:
            seeds = [g.seed + row * k + j for row, _, _ in pending for j in range(k)]
            prompts = np.repeat(np.stack([p for _, _, p in pending]), k, axis=0) if r else None
            t, p = self.sample(seeds, prompts, stats)
            toks.append(t), pngs.extend(p)
            for _, id_, _ in pending:
                cols["prompt_id"] += [id_] * k
                cols["sample_index"] += list(range(k))
            cols["seed"] += seeds
            pending.clear()

        per_batch = max(1, self.batch_size // k)
        for offset, (id_, uri, res) in enumerate(self.ctx.read(rows, stats, 4 * self.batch_size)):
            if isinstance(res, ImageError):
                errors.append(error_row(id_, uri, res))
                continue
            pending.append((shard.start + offset, id_, tokenize(res.rgb[None], model.clusters)[0][:r]))
            if len(pending) == per_batch:
                flush()
        if pending:
            flush()
        columns = {"prompt_id": pa.array(cols["prompt_id"], pa.string()),
                   "sample_index": pa.array(cols["sample_index"], pa.int32()),
                   "seed": pa.array(cols["seed"], pa.int64())}
        return {"samples": self.table(columns, toks, pngs), "errors": error_table(errors)}
