"""The extract task: paper-exact embeddings of a manifest's images, and its preview picture."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from igpt_batch.config import JobConfig
from igpt_batch.model.checkpoint import CheckpointInfo, resolve_layers
from igpt_batch.run.context import Resolved, ShardContext, Stats
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tasks.base import NIGHTLY, Plan, Task, error_row, error_table

POOLING = "mean(ln_1(h[l]))"
SCORE = "mean over tokens of -log2 p(token | SOS, tokens before), full depth, float64"


class Extract(Task):
    """Embeddings: one row per readable image, the features of `layers` concatenated in order."""

    name = "extract"
    unit = "images"
    formats = ("parquet", "lance")  # lance: the embeddings (errors stay Parquet parts)

    def resolve(self, cfg: JobConfig, info: CheckpointInfo) -> Resolved:
        base = super().resolve(cfg, info)
        layers = tuple(resolve_layers(cfg.extract.layers, info.n_layer))
        meta = base.meta | {"layers": ",".join(map(str, layers)), "pooling": POOLING}
        return Resolved(info, layers, meta | ({"nll_bits": SCORE} if cfg.extract.score else {}))

    def keys(self, cfg: JobConfig, resolved: Resolved) -> dict:
        # score and format only when not the default: outputs written before the keys existed keep resuming
        return ({"layers": list(resolved.layers)} | ({"score": True} if cfg.extract.score else {})
                | ({"format": cfg.output.format} if cfg.output.format != "parquet" else {}))

    def embeddings_schema(self, cfg: JobConfig, resolved: Resolved) -> pa.Schema:
        """The embeddings' columns (and the job's metadata): one schema for every shard, and for a Lance dataset."""
        dim = resolved.info.n_embd * len(resolved.layers)
        return pa.schema([("id", pa.string()), ("uri", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                          ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
                          *([("nll_bits", pa.float64())] if cfg.extract.score else [])], metadata=resolved.meta)

    def part_row_bytes(self, cfg: JobConfig, info: CheckpointInfo) -> int:
        return 4 * info.n_embd * len(resolve_layers(cfg.extract.layers, info.n_layer)) + 256  # float32s, id, uri, sha

    def version_keys(self, cfg: JobConfig, info: CheckpointInfo) -> dict:
        """A refresh store's version: the compatibility keys minus what may differ between nights."""
        keys = self.compat_keys(cfg, self.resolve(cfg, info), Plan(0, []))
        return {k: v for k, v in keys.items() if k not in NIGHTLY}

    def runner(self, ctx: ShardContext) -> "ExtractRunner":
        return ExtractRunner(ctx)

    def pictures(self, cfg: JobConfig, resolved: Resolved, out: OutputFolder, head: pa.Table | None,
                 commits: dict[str, dict]) -> None:
        if cfg.output.preview:
            from igpt_batch.model.checkpoint import read_clusters
            from igpt_batch.run import pictures

            pictures.write_preview(out, cfg, read_clusters(resolved.info.path), head, resolved.info.n_px,
                                   cfg.output.preview)


class ExtractRunner:
    """Per shard: read and decode ahead -> Extractor (tokenise -> features) -> embeddings and errors tables."""

    def __init__(self, ctx: ShardContext):
        from igpt_batch.model import batching
        from igpt_batch.model.extractor import Extractor

        resolved = ctx.resolved
        self.ctx, self.schema = ctx, Extract().embeddings_schema(ctx.cfg, resolved)
        score = ctx.cfg.extract.score
        probe = list(resolved.layers) + ([ctx.model.n_layer] if score else [])  # scoring runs the full depth
        bs = batching.extract_batch_size(ctx.model, probe, ctx.cfg.extract.batch_size)
        self.extractor = Extractor(ctx.model, resolved.layers, bs, lock=ctx.model_lock, score=score)

    def __call__(self, shard, rows: pa.Table, stats: Stats) -> dict[str, pa.Table]:
        from igpt_batch.errors import ImageError
        from igpt_batch.model.extractor import embedding_array
        from igpt_batch.redact import redact_uri

        bs = self.extractor.batch_size
        ok: dict[str, list] = {"id": [], "uri": [], "width": [], "height": [], "sha256": []}
        embs: list[np.ndarray] = [np.zeros((0, self.extractor.dim), np.float32)]
        scores: list[np.ndarray] = [np.zeros(0, np.float64)]
        errors: list[dict] = []
        batch: list = []

        def flush() -> None:
            seconds: dict[str, float] = {}  # the extractor's preprocess_s and model_s
            emb, nll = self.extractor.embed(np.stack([got.rgb for got in batch]), seconds)
            stats.add_seconds(seconds)
            embs.append(emb)
            if nll is not None:
                scores.append(nll)
            for got in batch:
                for key in ("width", "height", "sha256"):
                    ok[key].append(getattr(got, key))
            batch.clear()

        for id_, uri, res in self.ctx.read(rows, stats, 4 * bs):
            if isinstance(res, ImageError):
                errors.append(error_row(id_, uri, res))
                continue
            ok["id"].append(id_), ok["uri"].append(redact_uri(uri)), batch.append(res)
            if len(batch) == bs:
                flush()
        if batch:
            flush()
        columns = {
            "id": pa.array(ok["id"], pa.string()),
            "uri": pa.array(ok["uri"], pa.string()),
            "embedding": embedding_array(np.concatenate(embs)),
            "width": pa.array(ok["width"], pa.int32()),
            "height": pa.array(ok["height"], pa.int32()),
            "sha256": pa.array(ok["sha256"], pa.string()),
        }
        if self.extractor.score:
            columns["nll_bits"] = pa.array(np.concatenate(scores), pa.float64())
        table = pa.table(columns, schema=self.schema)
        return {"embeddings": table, "errors": error_table(errors)}
