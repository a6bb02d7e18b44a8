"""The one extraction path: RGB images -> palette tokens (the device's tokeniser) -> pooled features.

Used by the shard worker, the Ray Data `Embedder` and bench/bench_extract.py alike.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from igpt_batch.model import palette


def tokenizer_for(device: torch.device) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """palette.tokenize on CPU; the torch tokeniser on a GPU (same tokens, computed where the model runs)."""
    if device.type == "cuda":
        return lambda rgb, clusters: palette.tokenize_torch(rgb, clusters, device)
    return palette.tokenize


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (B, dim) -> the `embedding` column: fixed_size_list<float32>[dim]."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


class Extractor:
    """uint8 RGB (B, n_px, n_px, 3) -> float32 (B, len(layers) * n_embd): the mean over positions of
    ln_1(h[l]) for each layer l, concatenated in the order given (Chen et al. 2020, section 2.4).

    With `score`, each call also gives every image's nll_bits (float64: the mean over its n_px^2 tokens of
    -log2 p(token | SOS and the tokens before it)) from the same full-depth pass (`embed`).
    Model calls run `batch_size` images at a time under `lock` (two shards in flight share one model).
    """

    def __init__(self, model, layers, batch_size: int = 64, lock=None, score: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.layers, self.batch_size, self.score = model, list(layers), int(batch_size), bool(score)
        self.dim = len(self.layers) * model.n_embd
        self.tokenize = tokenizer_for(model.device)
        self.lock = lock if lock is not None else contextlib.nullcontext()

    def tokens(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (B, n_px, n_px, 3) -> int64 (B, n_px * n_px) cluster ids."""
        return self.tokenize(rgb, self.model.clusters)

    def features(self, tokens: np.ndarray, stats: dict | None = None) -> np.ndarray:
        """int64 (B, n_px * n_px) -> float32 (B, dim); adds the model's seconds (not the wait for it) to stats."""
        return self.features_and_scores(tokens, stats)[0]

    def features_and_scores(self, tokens: np.ndarray, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """int64 (B, n_px * n_px) -> (float32 (B, dim), float64 (B,) nll_bits or None without score): one pass."""
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            ids = torch.from_numpy(np.ascontiguousarray(tokens)).to(self.model.device)
            feats, nll = self.model.features_and_scores(ids, self.layers, score=self.score)
            feats = feats.float().cpu().numpy() if feats is not None else np.zeros((len(tokens), 0), np.float32)
            nll = nll.cpu().numpy() if nll is not None else None
            if stats is not None:
                stats["model_s"] = stats.get("model_s", 0.0) + time.perf_counter() - t0
            return feats, nll

    def embed(self, rgb: np.ndarray, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Embed (and score) a batch of any size in chunks of batch_size; adds preprocess_s / model_s to `stats`.
        -> (float32 (B, dim), float64 (B,) nll_bits or None without score)."""
        stats = stats if stats is not None else {}
        out = np.empty((len(rgb), self.dim), np.float32)
        nll = np.empty(len(rgb), np.float64) if self.score else None
        for start in range(0, len(rgb), self.batch_size):
            t0 = time.perf_counter()
            tokens = self.tokens(rgb[start:start + self.batch_size])
            stats["preprocess_s"] = stats.get("preprocess_s", 0.0) + time.perf_counter() - t0
            stop = start + len(tokens)
            out[start:stop], scores = self.features_and_scores(tokens, stats)
            if nll is not None:
                nll[start:stop] = scores
        return out, nll

    def __call__(self, rgb: np.ndarray, stats: dict | None = None) -> np.ndarray:
        """Embed a batch of any size in chunks of batch_size; adds preprocess_s / model_s to `stats`."""
        return self.embed(rgb, stats)[0]
