"""Pictures people look at instead of reading: sample contact sheets, completion sheets, palette previews."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from . import images, palette
from .storage import OutputFolder, read_output


def _png_to_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_contact_sheet(out: OutputFolder, n: int, name: str = "contact_sheet.png") -> str | None:
    """A grid of the first n samples (by seed), upscaled with nearest-neighbour so pixels stay crisp."""
    samples = read_output(out.url, "samples", out.fs.storage_options)
    if not samples.num_rows:
        return None
    samples = samples.sort_by("seed").slice(0, n)
    pics = [_png_to_rgb(b) for b in samples.column("png").to_pylist()]
    ncols = int(np.ceil(np.sqrt(len(pics))))
    out.write_bytes(name, palette.to_png(palette.grid(pics, ncols=ncols, scale=max(1, 128 // pics[0].shape[0]))))
    return name


def _try_load(uri: str, n_px: int, storage_options: dict) -> np.ndarray | None:
    try:
        return images.load_rgb(uri, n_px, storage_options)[0]
    except images.ImageError:
        return None


def write_preview(out: OutputFolder, cfg, clusters: np.ndarray, table, n_px: int, n: int, name: str = "preview.png") -> str | None:
    """Pairs of (input resized to n_px | its palette-quantised version) for the first n readable rows."""
    pics = []
    for uri in table.column("uri").to_pylist():
        rgb = _try_load(uri, n_px, cfg.storage_options)
        if rgb is not None:
            pics += [rgb, palette.detokenize(palette.tokenize(rgb[None], clusters), clusters, n_px)[0]]
        if len(pics) >= 2 * n:
            break
    if not pics:
        return None
    out.write_bytes(name, palette.to_png(palette.grid(pics, ncols=2 * min(4, n), scale=max(1, 128 // n_px))))
    return name


def write_completion_sheet(out: OutputFolder, cfg, clusters: np.ndarray, table, n_px: int, n: int,
                           name: str = "contact_sheet.png") -> str | None:
    """One row per prompt: original | quantised prompt (rest grey) | its K completions; first n prompts."""
    samples = read_output(out.url, "samples", out.fs.storage_options)
    if not samples.num_rows:
        return None
    samples = samples.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    by_prompt: dict[str, list[np.ndarray]] = {}
    for pid, png in zip(samples.column("prompt_id").to_pylist(), samples.column("png").to_pylist()):
        by_prompt.setdefault(pid, []).append(_png_to_rgb(png))
    uris = dict(zip(table.column("id").to_pylist(), table.column("uri").to_pylist()))
    r = cfg.generate.prompt_rows
    pics = []
    for pid in [i for i in table.column("id").to_pylist() if i in by_prompt][:n]:
        original = _try_load(uris[pid], n_px, cfg.storage_options)
        quant = palette.detokenize(palette.tokenize(original[None], clusters), clusters, n_px)[0].copy()
        quant[r:] = 128  # the part the model had to imagine
        pics += [original, quant, *by_prompt[pid]]
    out.write_bytes(name, palette.to_png(palette.grid(pics, ncols=2 + cfg.generate.samples_per_image, scale=max(1, 128 // n_px))))
    return name
