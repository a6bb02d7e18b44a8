"""A job's commit records, folded as they reach the driver: running totals for the summary, and a compact record a
shard for the report and the pictures, so the driver's memory per shard stays small (issue 20)."""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping
from typing import Iterator

from igpt_batch.run.context import Stats


class Commits(Mapping):
    """Commit records by shard name, kept as tuples of what the report and the pictures read: the row range, rows by
    kind, files ({path, rows}) and start and end times. Reading one rebuilds that much of it as a dict."""

    def __init__(self):
        self._kept: dict[str, tuple] = {}
        self._kinds: dict[tuple, tuple] = {}  # each tuple of output kinds, held once

    def add(self, rec: dict) -> None:
        rows = rec.get("rows") or {}
        kinds = self._kinds.setdefault(tuple(rows), tuple(sys.intern(k) for k in rows))
        files = rec.get("files", [])
        self._kept[rec["shard"]] = (rec.get("start"), rec.get("stop"), kinds, tuple(rows.values()), tuple(f["path"] for f in files),
                                    tuple(f["rows"] for f in files), rec.get("started_at"), rec.get("ended_at"))

    def __getitem__(self, name: str) -> dict:
        start, stop, kinds, counts, paths, file_rows, started_at, ended_at = self._kept[name]
        return {"shard": name, "start": start, "stop": stop, "rows": dict(zip(kinds, counts)),
                "files": [{"path": p, "rows": n} for p, n in zip(paths, file_rows)], "started_at": started_at,
                "ended_at": ended_at}

    def __iter__(self) -> Iterator[str]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)


class Tally:
    """Every committed shard's record, counted as it arrives (`add`): rows by kind and error rows by reason over all
    of them (earlier runs' and this run's); for this run's, the stage seconds, new rows and the span from the first
    start to the last commit. `commits` keeps each shard's compact record; `older` names the shards whose records
    predate `errors_by_reason` and have error rows (their errors parts are read once, by the summary).

    A shard's record arriving again replaces its rows and errors (the last commit's files are the ones on disk);
    its stage seconds add up, as they were spent."""

    def __init__(self):
        self.commits = Commits()
        self.rows, self.by_reason, self.older = Counter(), Counter(), {}
        self.stats, self.new_rows, self.run_shards = Stats(), 0, {}
        self.first_start = self.last_end = None
        self._reasons: dict[str, tuple] = {}  # shards with error rows: their errors by reason, to replace them

    def add(self, rec: dict, this_run: bool = True) -> None:
        name = rec["shard"]
        if name in self.commits:
            self._remove(name)
        self.rows.update(rec.get("rows") or {})
        errors_by_reason = rec.get("errors_by_reason")
        if (rec.get("rows") or {}).get("errors"):
            if errors_by_reason is not None:  # None: a record from before v2 (records.read_record)
                self.by_reason.update(errors_by_reason)
                self._reasons[name] = tuple((sys.intern(k), v) for k, v in errors_by_reason.items())
            else:
                self.older[name] = None
        self.commits.add(rec)
        if not this_run:
            return
        self.run_shards[name] = None
        self.stats = self.stats + Stats.of(rec)
        self.new_rows += rec["stop"] - rec["start"]
        if rec.get("started_at") and rec.get("ended_at"):
            self.first_start = min(rec["started_at"], self.first_start or rec["started_at"])
            self.last_end = max(rec["ended_at"], self.last_end or rec["ended_at"])

    def _remove(self, name: str) -> None:
        old = self.commits[name]
        self.rows.subtract(old["rows"])
        self.by_reason.subtract(dict(self._reasons.pop(name, ())))
        self.by_reason = +self.by_reason  # no reason left at zero
        self.older.pop(name, None)
        if name in self.run_shards:
            self.new_rows -= old["stop"] - old["start"]

    def running_seconds(self) -> float | None:
        """From this run's first shard start to its last commit (the records' wall-clock times; workers take a
        shard's start after their model has loaded); None without timed records."""
        return self.last_end - self.first_start if self.first_start is not None else None
