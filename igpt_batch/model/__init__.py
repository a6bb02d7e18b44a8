"""The model: checkpoints, palette, the one transformer forward, extraction, sampling, batch sizes, k-means."""
