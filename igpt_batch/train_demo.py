"""Train the embedded demo model: a small ImageGPT on scikit-learn's 8x8 digits, palette fitted with our k-means.

Reproduce the committed checkpoint with:  python -m igpt_batch.train_demo --out igpt_batch/demo_model
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from igpt_batch.model.kmeans import fit_palette
from igpt_batch.model.palette import tokenize

N_PX = 8
N_CLUSTERS = 16


def digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real 8x8 digits (values 0..16) as uint8 grey RGB (N, 8, 8, 3), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), d.target


def train(out: str, steps: int = 3000, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
          batch_size: int = 64, lr: float = 3e-3, seed: int = 0, log_every: int = 100) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling, ImageGPTImageProcessor

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # one thread: a fixed reduction order makes the run reproducible
    rgb, _ = digits_rgb()
    clusters = fit_palette(rgb.reshape(-1, 3), k=N_CLUSTERS, seed=seed)
    tokens = torch.from_numpy(tokenize(rgb, clusters))  # (N, 64)
    sos = N_CLUSTERS  # vocab_size - 1
    config = ImageGPTConfig(vocab_size=N_CLUSTERS + 1, n_positions=N_PX * N_PX, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = ImageGPTForCausalImageModeling(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(tokens), (batch_size,), generator=gen)
        target = tokens[idx]  # (B, 64)
        inputs = torch.cat([torch.full((batch_size, 1), sos), target[:, :-1]], dim=1)  # [SOS] + tokens[:-1]
        logits = model(input_ids=inputs).logits  # (B, 64, vocab_size - 1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    proc = ImageGPTImageProcessor(clusters=clusters.tolist(), size={"height": N_PX, "width": N_PX})
    proc.save_pretrained(out)
    stats = {"steps": steps, "final_loss": float(np.mean(losses[-100:])), "train_seconds": round(time.time() - t0, 1),
             "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "clusters": N_CLUSTERS, "seed": seed,
             "data": "sklearn.datasets.load_digits (1797 real 8x8 digits)"}
    (Path(out) / "training.json").write_text(json.dumps(stats, indent=2))
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(Path(__file__).parent / "demo_model"))
    p.add_argument("--steps", type=int, default=3000)
    a = p.parse_args()
    print(train(a.out, steps=a.steps))


if __name__ == "__main__":
    main()
