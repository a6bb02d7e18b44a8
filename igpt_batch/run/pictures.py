"""Pictures people look at instead of reading: picture grids, sample contact sheets, completion sheets, palette previews."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from igpt_batch.inputs import images
from igpt_batch.model import palette
from igpt_batch.run.storage import OutputFolder


def grid(tiles: list[np.ndarray], ncols: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Contact sheet: uint8 RGB images (tiles) -> one uint8 (H, W, 3) picture on white.

    Every image is upscaled by `scale` with nearest-neighbour (each pixel becomes a scale x scale
    block, so tokens stay crisp) and placed top-left in a cell sized for the largest image;
    cells are separated and surrounded by `pad` white pixels. ncols is capped at len(tiles).
    """
    if not tiles:
        raise ValueError("grid needs at least one image")
    if scale < 1 or pad < 0 or ncols < 1:
        raise ValueError("need scale >= 1, pad >= 0, ncols >= 1")
    pics = []
    for im in tiles:
        im = np.asarray(im)
        if im.ndim == 2:  # grayscale convenience
            im = np.repeat(im[:, :, None], 3, axis=2)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"grid expects uint8 (h, w, 3) images, got {im.dtype} {im.shape}")
        pics.append(im)
    ncols = min(ncols, len(pics))
    nrows = -(-len(pics) // ncols)
    cell_h = max(p.shape[0] for p in pics) * scale
    cell_w = max(p.shape[1] for p in pics) * scale
    sheet = np.full((nrows * cell_h + (nrows + 1) * pad, ncols * cell_w + (ncols + 1) * pad, 3), 255, np.uint8)
    for i, im in enumerate(pics):
        r, c = divmod(i, ncols)
        y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        big = np.repeat(np.repeat(im, scale, axis=0), scale, axis=1)  # (h*scale, w*scale, 3)
        sheet[y : y + big.shape[0], x : x + big.shape[1]] = big
    return sheet


def _png_to_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _quantised(rgb: np.ndarray, clusters: np.ndarray, n_px: int) -> np.ndarray:
    """uint8 (n_px, n_px, 3) -> the same picture drawn in the palette's colours (what the model sees)."""
    return palette.detokenize(palette.tokenize(rgb[None], clusters), clusters, n_px)[0]


def _write_grid(out: OutputFolder, name: str, pics: list[np.ndarray], ncols: int) -> str:
    """Write pics as one PNG grid, each upscaled to about 128 px so pixels stay visible."""
    out.write_bytes(name, palette.to_png(grid(pics, ncols=ncols, scale=max(1, 128 // pics[0].shape[0]))))
    return name


def first_rows(out: OutputFolder, kind: str, commits: dict[str, dict] | None, columns: list[str],
               enough: Callable[[pa.Table], bool]) -> pa.Table:
    """The committed rows of `kind` in shard order, read a row group at a time until enough(rows so far) holds:
    a picture reads the rows it shows, not the whole output."""
    import pyarrow.parquet as pq

    got: list[pa.Table] = []
    for rel in out.committed_files(kind, commits):
        with out.fs.open(out.path(rel), "rb") as f:
            part = pq.ParquetFile(f)
            for g in range(part.num_row_groups):
                got.append(part.read_row_group(g, columns=columns))
                if enough(pa.concat_tables(got)):
                    return pa.concat_tables(got)
    return pa.concat_tables(got) if got else pa.table({})


def write_contact_sheet(out: OutputFolder, n: int, commits: dict[str, dict] | None = None,
                        name: str = "contact_sheet.png") -> str | None:
    """A grid of the first n samples (by seed), upscaled with nearest-neighbour so pixels stay crisp. Shards hold
    seeds in order, so the first shards' first rows are read, up to n."""
    samples = first_rows(out, "samples", commits, ["seed", "png"], lambda t: t.num_rows >= n)
    if not samples.num_rows:
        return None
    samples = samples.sort_by("seed").slice(0, n)
    pics = [_png_to_rgb(b) for b in samples.column("png").to_pylist()]
    return _write_grid(out, name, pics, ncols=int(np.ceil(np.sqrt(len(pics)))))


def _try_load(uri: str, n_px: int, storage_options: dict) -> np.ndarray | None:
    """The input as the model saw it, or None when it cannot be loaded for any reason (a picture never fails a job)."""
    try:
        return images.load_rgb(uri, n_px, storage_options)[0]
    except Exception:
        return None


def write_preview(out: OutputFolder, cfg, clusters: np.ndarray, table, n_px: int, n: int, name: str = "preview.png") -> str | None:
    """Pairs of (input resized to n_px | its palette-quantised version) for the first n readable rows."""
    pics = []
    for uri in table.column("uri").to_pylist():
        rgb = _try_load(uri, n_px, cfg.storage_options)
        if rgb is not None:
            pics += [rgb, _quantised(rgb, clusters, n_px)]
        if len(pics) >= 2 * n:
            break
    if not pics:
        return None
    return _write_grid(out, name, pics, ncols=2 * min(4, n))


def write_completion_sheet(out: OutputFolder, cfg, clusters: np.ndarray, table, n_px: int, n: int,
                           commits: dict[str, dict] | None = None, name: str = "contact_sheet.png") -> str | None:
    """One row per prompt: original | quantised prompt (rest grey) | its K completions; first n prompts. Shards
    hold prompts in manifest order, so the first shards are read until n prompts have all their K samples."""
    k = cfg.generate.samples_per_image
    enough = lambda t: pc.sum(pc.equal(pc.value_counts(t.column("prompt_id")).field("counts"), k)).as_py() >= n  # noqa: E731
    samples = first_rows(out, "samples", commits, ["prompt_id", "sample_index", "png"], enough)
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
        if original is None:  # unreadable now: grey placeholders stand in for it and its prompt
            original = quant = np.full((n_px, n_px, 3), 128, np.uint8)
        else:
            quant = _quantised(original, clusters, n_px).copy()
            quant[r:] = 128  # the part the model had to imagine
        pics += [original, quant, *by_prompt[pid]]
    return _write_grid(out, name, pics, ncols=2 + cfg.generate.samples_per_image)
