"""Load a checkpoint onto a device as the project's transformer: the device resolved, safetensors only, never remote
code."""
from __future__ import annotations

import re

import torch

from igpt_batch.model.transformer import DTYPES, IGPT


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; also 'cpu', 'cuda', 'cuda:N'."""
    spec = device.strip().lower() if isinstance(device, str) else None
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec or "")
    if m is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


def load_model(name: str, dtype: str = "fp32", device: str = "auto") -> "IGPT":
    """Load a checkpoint ('demo', local folder or hub id) from safetensors only; never remote code.
    dtype 'auto' resolves on this process's hardware (model/dtypes.py)."""
    if dtype == "auto":
        from igpt_batch.model import dtypes

        dtype = dtypes.resolve("auto", dtypes.hardware(device))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from transformers import ImageGPTForCausalImageModeling

    from igpt_batch.model import checkpoint

    dev = resolve_device(device)
    path = checkpoint.resolve(name)
    hf = ImageGPTForCausalImageModeling.from_pretrained(path, use_safetensors=True, dtype=DTYPES[dtype])
    clusters = checkpoint.read_clusters(path)
    return IGPT(hf.to(dev), clusters)
