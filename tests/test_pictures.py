"""igpt_batch.run.pictures: picture grids, and the sheets written from real committed outputs (no Ray, no model)."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from igpt_batch import config
from igpt_batch.model import palette
from igpt_batch.run import pictures
from igpt_batch.run.storage import OutputFolder

N_PX, SCALE, PAD = 8, 16, 2  # the sheets upscale 8x8 pictures by 128 // 8, with grid's default 2 px padding
# A two-colour palette (black, white): grey levels far from 128 quantise to a known colour.
CLUSTERS = palette.normalize(np.array([[0, 0, 0], [255, 255, 255]], np.uint8))
LEVELS = np.array([30, 60, 200, 230], np.uint8)


def picture(seed: int) -> np.ndarray:
    """A distinct uint8 (8, 8, 3) grey picture whose every pixel is one of LEVELS."""
    grey = LEVELS[np.random.default_rng(seed).integers(0, len(LEVELS), (N_PX, N_PX))]
    return np.repeat(grey[:, :, None], 3, axis=2)


def black_and_white(rgb: np.ndarray) -> np.ndarray:
    """What CLUSTERS quantise a grey LEVELS picture to, worked out independently of palette.tokenize."""
    return np.where(rgb > 128, 255, 0).astype(np.uint8)


def cells(sheet: np.ndarray, ncols: int) -> list[list[np.ndarray]]:
    """Undo grid(): the picture in each cell, row by row, one source pixel per SCALE x SCALE block."""
    step = N_PX * SCALE + PAD
    nrows = (sheet.shape[0] - PAD) // step
    assert sheet.shape == (nrows * step + PAD, ncols * step + PAD, 3)
    return [[sheet[PAD + r * step: PAD + r * step + N_PX * SCALE: SCALE, PAD + c * step: PAD + c * step + N_PX * SCALE: SCALE]
             for c in range(ncols)] for r in range(nrows)]


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def commit_samples(out: OutputFolder, parts: list[dict]) -> None:
    """Write each dict of columns (with a png column of arrays) as one committed shard of samples."""
    for k, cols in enumerate(parts):
        name = f"part-{k:05d}"
        table = pa.table({**cols, "png": [palette.to_png(p) for p in cols["png"]]})
        out.commit(name, {"shard": name, "files": [out.write_part("samples", name, table)]})


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Four 8x8 PNG inputs p0..p3 (picture(i)) and a broken file, by id -> local path."""
    uris = {}
    for i in range(4):
        uris[f"p{i}"] = str(tmp_path / f"p{i}.png")
        Image.fromarray(picture(i)).save(uris[f"p{i}"])
    uris["broken"] = str(tmp_path / "broken.png")
    Path(uris["broken"]).write_bytes(b"not a PNG")
    return uris


# ----------------------------------------------------------------------------- grid


def test_grid_shape_and_crisp_blocks():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)  # smaller: padded into the max cell
    scale, pad = 3, 2
    g = pictures.grid([a, b, a], ncols=2, scale=scale, pad=pad)
    cell_h, cell_w = 4 * scale, 5 * scale
    assert g.dtype == np.uint8
    assert g.shape == (2 * cell_h + 3 * pad, 2 * cell_w + 3 * pad, 3)
    # each source pixel is a scale x scale block
    block = g[pad : pad + 4 * scale, pad : pad + 5 * scale]
    assert np.array_equal(block, np.kron(a, np.ones((scale, scale, 1), np.uint8)))
    assert np.array_equal(block[::scale, ::scale], a)
    # second image top-left of its cell, the rest of the cell white
    x0 = pad + cell_w + pad
    assert np.array_equal(g[pad : pad + 3 * scale : scale, x0 : x0 + 2 * scale : scale], b)
    assert (g[pad + 3 * scale : pad + cell_h, x0 : x0 + cell_w] == 255).all()
    # padding rows/columns are white, and the empty 4th cell too
    assert (g[:pad] == 255).all() and (g[:, :pad] == 255).all()
    assert (g[pad + cell_h + pad :, x0:] == 255).all()
    # ncols larger than the number of images is capped
    assert pictures.grid([a], ncols=8, scale=1, pad=0).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        pictures.grid([], ncols=2)


def test_grid_grey_tiles_and_bad_arguments():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
    g = pictures.grid([grey], ncols=1, scale=1, pad=0)
    assert np.array_equal(g, np.repeat(grey[:, :, None], 3, axis=2))
    for kw in ({"scale": 0}, {"pad": -1}, {"ncols": 0}):
        with pytest.raises(ValueError):
            pictures.grid([grey], **{"ncols": 1, **kw})
    with pytest.raises(ValueError, match="uint8"):
        pictures.grid([grey.astype(np.float32)], ncols=1)


# ----------------------------------------------------------------------------- contact sheet


def test_contact_sheet_shows_the_first_n_samples_by_seed(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    # parts committed out of seed order: the sheet still starts at the lowest seed
    commit_samples(out, [{"seed": [7, 5, 6, 4], "png": [picture(s) for s in (7, 5, 6, 4)]},
                         {"seed": [2, 0, 3, 1], "png": [picture(s) for s in (2, 0, 3, 1)]}])
    assert pictures.write_contact_sheet(out, 5) == "contact_sheet.png"
    rows = cells(read_png(tmp_path / "out" / "contact_sheet.png"), ncols=3)  # ceil(sqrt(5)) columns
    assert len(rows) == 2
    for i, cell in enumerate(rows[0] + rows[1][:2]):
        assert np.array_equal(cell, picture(i)), f"cell {i} is not seed {i}"
    assert (rows[1][2] == 255).all()  # the sixth cell stays white

    assert pictures.write_contact_sheet(out, 100, name="all.png") == "all.png"
    every = cells(read_png(tmp_path / "out" / "all.png"), ncols=3)  # 8 samples: 3 columns, 3 rows
    assert [np.array_equal(c, picture(i)) for i, c in enumerate(sum(every, [])[:8])] == [True] * 8


def test_contact_sheet_without_committed_samples_writes_nothing(tmp_path):
    out = OutputFolder(str(tmp_path / "out"))
    out.write_part("samples", "part-00000", pa.table({"seed": [0], "png": [palette.to_png(picture(0))]}))  # no commit
    assert pictures.write_contact_sheet(out, 4) is None
    assert not (tmp_path / "out" / "contact_sheet.png").exists()


# ----------------------------------------------------------------------------- preview


def test_preview_pairs_readable_inputs_with_their_quantised_versions(tmp_path, sources):
    out = OutputFolder(str(tmp_path / "out"))
    cfg = config.load(None)
    table = pa.table({"uri": [sources[k] for k in ("broken", "p2", "p0", "p3", "p1")]})
    assert pictures.write_preview(out, cfg, CLUSTERS, table, N_PX, 2) == "preview.png"
    [row] = cells(read_png(tmp_path / "out" / "preview.png"), ncols=4)  # 2 pairs; the broken file is skipped
    for (inp, quant), i in zip([row[0:2], row[2:4]], (2, 0)):
        assert np.array_equal(inp, picture(i)) and np.array_equal(quant, black_and_white(picture(i)))

    # n=8: ncols = 2 * min(4, n) = 8 (four pairs a row); four readable inputs fill one row
    table = pa.table({"uri": [sources[f"p{i}"] for i in range(4)]})
    assert pictures.write_preview(out, cfg, CLUSTERS, table, N_PX, 8, name="all.png") == "all.png"
    sheet = cells(read_png(tmp_path / "out" / "all.png"), ncols=8)
    assert len(sheet) == 1
    assert all(np.array_equal(sheet[0][2 * i], picture(i)) for i in range(4))
    assert all(np.array_equal(sheet[0][2 * i + 1], black_and_white(picture(i))) for i in range(4))


def test_preview_of_unreadable_inputs_writes_nothing(tmp_path, sources):
    out = OutputFolder(str(tmp_path / "out"))
    table = pa.table({"uri": [sources["broken"]]})
    assert pictures.write_preview(out, config.load(None), CLUSTERS, table, N_PX, 4) is None
    assert not (tmp_path / "out" / "preview.png").exists()


# ----------------------------------------------------------------------------- completion sheet


def test_completion_sheet_rows_follow_the_manifest(tmp_path, sources):
    out = OutputFolder(str(tmp_path / "out"))
    cfg = config.load(None, {"generate.prompt_rows": 3, "generate.samples_per_image": 2})
    completion = {(pid, k): picture(10 * int(pid[1]) + k + 100) for pid in ("p0", "p2", "p3") for k in range(2)}
    order = [("p2", 1), ("p0", 0), ("p3", 1), ("p2", 0), ("p0", 1), ("p3", 0)]  # sample_index out of order
    commit_samples(out, [{"prompt_id": [p for p, _ in order], "sample_index": [k for _, k in order],
                          "png": [completion[o] for o in order]}])
    # manifest order p3, p1, p0, p2: p1 has no samples, and n=2 keeps the first two prompts that do
    table = pa.table({"id": ["p3", "p1", "p0", "p2"], "uri": [sources[i] for i in ("p3", "p1", "p0", "p2")]})
    assert pictures.write_completion_sheet(out, cfg, CLUSTERS, table, N_PX, 2) == "contact_sheet.png"
    rows = cells(read_png(tmp_path / "out" / "contact_sheet.png"), ncols=4)  # original | prompt | 2 completions
    assert len(rows) == 2
    for row, pid in zip(rows, ("p3", "p0")):
        original = picture(int(pid[1]))
        prompt = black_and_white(original)
        prompt[3:] = 128  # below the prompt rows: grey, what the model had to imagine
        assert np.array_equal(row[0], original) and np.array_equal(row[1], prompt)
        assert np.array_equal(row[2], completion[pid, 0]) and np.array_equal(row[3], completion[pid, 1])


def test_completion_sheet_without_committed_samples_writes_nothing(tmp_path, sources):
    out = OutputFolder(str(tmp_path / "out"))
    table = pa.table({"id": ["p0"], "uri": [sources["p0"]]})
    assert pictures.write_completion_sheet(out, config.load(None), CLUSTERS, table, N_PX, 4, name="c.png") is None
    assert not (tmp_path / "out" / "c.png").exists()
