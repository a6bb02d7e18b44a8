"""`igpt-batch demo`: extract and generate with the embedded demo model on real digits, fully offline."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from PIL import Image

log = logging.getLogger("igpt_batch")


def write_demo_inputs(folder: Path, n: int = 200) -> Path:
    """Write n real digits (scikit-learn) upscaled to 32x32 PNGs plus one broken file, and a manifest.csv."""
    from igpt_batch.train_demo import digits_rgb

    folder.mkdir(parents=True, exist_ok=True)
    rgb, labels = digits_rgb()
    rows = []
    for i in range(n):
        name = f"digit-{i:04d}.png"
        Image.fromarray(rgb[i]).resize((32, 32), Image.NEAREST).save(folder / name)
        rows.append({"id": f"digit-{i:04d}", "uri": name, "label": int(labels[i])})
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")  # shows the errors/ path
    rows.append({"id": "broken", "uri": "broken.jpg", "label": -1})
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "uri", "label"])
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


def run_demo(output: str, num_samples: int = 64, executor: str = "ray") -> dict:
    from igpt_batch import config
    from igpt_batch.run.driver import run_job
    from igpt_batch.run.tasks.extract import Extract
    from igpt_batch.run.tasks.sample import Generate

    root = Path(output)
    manifest = write_demo_inputs(root / "inputs")
    configs = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    base = {"run.executor": executor, "output.overwrite": True}
    file = str(configs) if configs.exists() else None
    extract = run_job(config.load(file, {**base, "input.manifest": str(manifest), "output.path": str(root / Extract.name)}), Extract())
    generate = run_job(config.load(file, {**base, "generate.num_samples": num_samples, "output.path": str(root / Generate.name)}), Generate())
    print(f"\ndemo outputs in {root}/:\n"
          f"  extract/embeddings/  {extract['rows'].get('embeddings', 0)} embeddings, {extract['errors']} error(s) in extract/errors/\n"
          f"  extract/preview.png  inputs beside their palette-quantised versions\n"
          f"  generate/samples/    {generate['rows'].get('samples', 0)} samples (tokens + PNG)\n"
          f"  generate/contact_sheet.png")
    return {Extract.name: extract, Generate.name: generate}
