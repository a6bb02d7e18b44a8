"""`inspect` of a Lance output (output.format: lance): its embeddings' line, and --verify's checks that every
committed shard's rows are in the dataset exactly once."""
from __future__ import annotations

from collections import Counter

from igpt_batch.run.lance_output import data_files, open_dataset, uri
from igpt_batch.run.storage import OutputFolder


def describe(out: OutputFolder) -> dict:
    """inspect's line for a Lance output's embeddings: rows, fragments, version and schema of the latest version."""
    ds = open_dataset(out)
    if ds is None:
        return {"rows": 0, "files": 0, "schema": {}, "format": "lance", "dataset": uri(out)}
    return {"rows": ds.count_rows(), "files": len(ds.get_fragments()), "format": "lance", "dataset": uri(out),
            "lance_version": ds.version, "schema": {f.name: str(f.type) for f in ds.schema}}


def verify(out: OutputFolder, commits: dict[str, dict]) -> list[str]:
    """Every committed shard's rows in the dataset exactly once (its fragments, of the rows its marker records), no
    fragment of a shard without a marker, no id twice. Problems, in words."""
    where = uri(out)
    try:
        ds = open_dataset(out)
    except (OSError, ValueError) as e:
        return [f"{where} cannot be opened ({e})"]
    if ds is None:
        return [f"{where} is missing"] if any(rec.get("fragments") for rec in commits.values()) else []
    held = [(str(d.path), frag.metadata.physical_rows - frag.metadata.num_deletions)
            for frag in ds.get_fragments() for d in frag.metadata.files]
    times, rows = Counter(p for p, _ in held), dict(held)
    owner = {p: name for name, rec in commits.items() for p in data_files(rec)}
    problems = []
    for name, rec in sorted(commits.items()):
        paths, want = data_files(rec), rec["rows"].get("embeddings", 0)
        if any(p not in times for p in paths):
            problems.append(f"{name}: committed (its marker) but not in the Lance dataset: a driver stopped before "
                            "its Lance commit; rerun to commit it")
        elif sum(rows[p] for p in paths) != want:
            problems.append(f"{name}: the Lance dataset holds {sum(rows[p] for p in paths)} of its rows, its marker "
                            f"says {want}")
    problems += [f"{owner.get(p, 'a data file')}: {p} is committed {n} times in the Lance dataset"
                 for p, n in sorted(times.items()) if n > 1]
    problems += [f"{where}: data file {p} belongs to no committed shard" for p in sorted(times) if p not in owner]
    dups = _duplicate_ids(ds)
    if dups:
        problems.append(f"{where}: {len(dups)} ids occur more than once (e.g. {', '.join(map(repr, dups[:5]))})")
    return problems


def _duplicate_ids(ds) -> list[str]:
    """Ids found twice, streamed (inputs.manifest.repeated_ids: 8 bytes a row, then the few suspects exactly)."""
    import numpy as np
    import pyarrow as pa

    from igpt_batch.inputs.manifest import id_hashes, repeated_ids

    hashes = [id_hashes(b.column("id")) for b in ds.to_batches(columns=["id"])]
    again = lambda: (pa.Table.from_batches([b]) for b in ds.to_batches(columns=["id"]))  # noqa: E731
    return sorted(repeated_ids(np.concatenate(hashes) if hashes else np.zeros(0, np.int64), again))
