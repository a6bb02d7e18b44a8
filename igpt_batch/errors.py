"""Every exception the project raises on purpose, and the grouping of per-row error reasons."""

from __future__ import annotations

import re


class IgptError(Exception):
    """Base of the project's own errors; the CLI prints their message, never a traceback."""


class UsageError(IgptError, ValueError):
    """Bad config or input found before any work: the CLI exits 2."""


class ConfigError(UsageError):
    """A bad config key or value; the message names the key."""


class ManifestError(UsageError):
    """A manifest that cannot be used; raised before any model is loaded."""


class JobError(IgptError, RuntimeError):
    """The job cannot start or did not finish; committed shards stay committed (exit 1)."""


class LeaseError(IgptError, RuntimeError):
    """Another live job holds the lease on this output or store."""


class OutputError(JobError):
    """A file of a job output that cannot be read (invalid JSON, truncated Parquet); the message names it (exit 1)."""


class ExecutorError(IgptError, RuntimeError):
    """The pool cannot go on (no node left, resources the cluster cannot give); committed shards stay."""


class WorkerStartError(IgptError, RuntimeError):
    """This worker cannot start on its node (its copy of the model is missing or differs from the driver's);
    the pool goes on with the other workers and fails the job, listing every refusal, when none can start."""


class ImageError(IgptError):
    """A per-image failure. stage is "read" or "decode"; str(e) is the readable reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason

    def __reduce__(self):
        # Default exception pickling re-calls __init__(*self.args) = (reason,) and fails;
        # Ray ships these between processes.
        return (ImageError, (self.stage, self.reason))


def too_large(size: int, max_bytes: int, where: str) -> ImageError:
    """The read error of a source over `input.max_bytes`."""
    return ImageError("read", f"too large: {size} bytes > max_bytes {max_bytes}: {where}")


# (pattern at the start of a reason, class): reasons name their uri last, so a class never holds a path
_REASON_CLASSES = [(re.compile(p), t) for p, t in (
    (r"too large: \d+ bytes > max_bytes (\d+)", r"too large (over max_bytes \1)"),
    (r"image too large \(decompression bomb\).*?(--max-pixels \d+)", r"decompression bomb (over \1)"),
    (r"image too large \(decompression bomb\)", "decompression bomb"),
    (r"(HTTP \d{3})\b", r"\1"),
    (r"(HTTP read failed|cannot read|cannot open image) \((\w+)", r"\1 (\2)"),
    (r"(timed out after [\d.]+s)", r"\1"),
    (r"(cannot connect|access denied|unknown protocol) \(([^)]*)\)", r"\1 (\2)"),
    (r"cannot convert (\w+) image to RGB", r"cannot convert \1 image to RGB"),
    (r"([a-z][a-z ]*[a-z])\b", r"\1"),  # file not found, permission denied, empty data, not a recognised ...
    (r"([A-Za-z_]\w*)", r"\1"),  # an exception's type name
)]


def reason_class(reason: str) -> str:
    """A per-row error reason reduced to its kind, without paths, URLs or sizes, for grouping
    (e.g. 'file not found', 'HTTP 404', 'timed out after 30s', 'decompression bomb (over --max-pixels N)')."""
    for pattern, template in _REASON_CLASSES:
        m = pattern.match(reason)
        if m:
            return m.expand(template)
    return "other"
