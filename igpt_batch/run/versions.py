"""The versions of igpt-batch and of the libraries that decide its results: `--version` and `_job.json` list them."""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("torch", "transformers", "ray", "pyarrow", "pylance", "numpy", "pillow", "fsspec")


def versions() -> dict[str, str | None]:
    """{name: version} of igpt-batch, python and LIBRARIES, in that order; None for a library not installed."""
    from igpt_batch import __version__

    out: dict[str, str | None] = {"igpt-batch": __version__, "python": sys.version.split()[0]}
    for pkg in LIBRARIES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def versions_line() -> str:
    """One line: `igpt-batch 0.1.0, python 3.11.9, torch 2.5.1, ...` (a missing library: `(not installed)`)."""
    return ", ".join(f"{k} {v or '(not installed)'}" for k, v in versions().items())
