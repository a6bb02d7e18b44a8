"""Command line: igpt-batch extract | generate | complete | refresh | export | neighbors | dedup | inspect | probe | demo
| outliers | report."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from igpt_batch import cli_store
from igpt_batch import config as config_mod
from igpt_batch.errors import ConfigError

# flag -> (dotted config key, help, extra argparse kwargs); values are type-checked by config.apply, not argparse.
# --help appends each key's default from igpt_batch/config.py.
CONST = {"action": "store_const", "const": True}
FLAGS = {
    "--model": ("model.name", "demo, a local checkpoint folder, an object-store folder (s3://...), or a hub id", {}),
    "--dtype": ("model.dtype", "fp32, bf16, fp16, or auto (bf16 where the hardware computes it natively)",
                {"choices": ["fp32", "bf16", "fp16", "auto"]}),
    "--device": ("model.device", "auto (CUDA when present), cpu, cuda or cuda:N", {}),
    "--manifest": ("input.manifest", "manifest file, folder or glob (Parquet, CSV, JSONL), or a folder or glob of images", {}),
    "--read-timeout": ("input.read_timeout", "seconds per image fetch", {}),
    "--max-pixels": ("input.max_pixels", "decompression-bomb limit, checked before decoding", {}),
    "--id-column": ("input.id_column", "the manifest's id column (img2dataset: key)", {}),
    "--uri-column": ("input.uri_column", "the manifest's uri column (img2dataset: url)", {}),
    "--bytes-column": ("input.bytes_column", "Parquet column holding the image bytes (jpg, or image.bytes)", {}),
    "--retries": ("input.retries", "http(s) retries of 429, 5xx and connection resets", {}),
    "--host-connections": ("input.host_connections", "http(s) connections at a time per host, per worker", {}),
    "--draft": ("input.draft", "JPEG draft decoding for big sources (faster, approximate)", CONST),
    "--output": ("output.path", "output folder or fsspec URL", {}),
    "--overwrite": ("output.overwrite", "replace an existing output, also one written with another config", CONST),
    "--output-format": ("output.format", "extract: embeddings as Parquet parts, or one Lance dataset",
                        {"choices": ["parquet", "lance"]}),
    "--write-png-files": ("output.write_png_files", "also write pngs/seed-<seed>.png", CONST),
    "--contact-sheet": ("output.contact_sheet", "grid picture of the first N samples (0 = none)", {"metavar": "N"}),
    "--no-report": ("output.report", "do not write report.html beside _SUCCESS", {"action": "store_const", "const": False}),
    "--preview": ("output.preview", "extract: the first N inputs beside their quantised versions", {"metavar": "N"}),
    "--score": ("extract.score", "extract: add nll_bits, the image's mean -log2 p(token) (full depth, same pass)", CONST),
    "--layer": ("extract.layers", "feature layer, repeatable, concatenated in order (none given: n_layer // 2)",
                {"action": "append", "metavar": "L"}),
    "--num-samples": ("generate.num_samples", "generate seeds seed .. seed+N-1", {}),
    "--seed": ("generate.seed", "first seed (generate) or base seed (complete)", {}),
    "--temperature": ("generate.temperature", "sampling temperature (0 = greedy)", {}),
    "--top-k": ("generate.top_k", "keep the K most likely tokens (0 = off; above the vocabulary: clamped)", {}),
    "--top-p": ("generate.top_p", "nucleus sampling mass (1.0 = off)", {}),
    "--prompt-rows": ("generate.prompt_rows", "complete: pixel rows kept from the top of each image", {}),
    "--samples-per-image": ("generate.samples_per_image", "complete: completions per image", {}),
    "--workers": ("run.workers", "actors, one model replica each", {}),
    "--shard-size": ("run.shard_size", "rows or seeds per shard: the unit of output, commit and retry", {}),
    "--address": ("run.address", "Ray address (none: RAY_ADDRESS or the job's cluster, else a local Ray)", {}),
    "--executor": ("run.executor", "ray, or local (in-process, same code path)", {"choices": ["ray", "local"]}),
    "--cpus-per-worker": ("run.cpus_per_worker", "Ray CPUs per actor (fractional is fine)", {}),
    "--gpus-per-worker": ("run.gpus_per_worker", "Ray GPUs per actor (none: 1 when the cluster has GPUs)", {}),
    "--torch-threads": ("run.torch_threads", "torch threads per actor (0 = torch's choice)", {}),
    "--max-retries": ("run.max_retries", "retries per shard after actor death or shard failure", {}),
    "--max-error-fraction": ("run.max_error_fraction", "fail the job when more input rows than this are bad", {}),
    "--store": ("refresh.store", "refresh: the embedding store (folder or fsspec URL)", {}),
    "--deleted": ("refresh.deleted", "refresh: ids that left the manifest are marked deleted or dropped",
                  {"metavar": "mark|drop"}),
    "--keep-current": ("refresh.keep_current", "refresh: nights kept as tags, the last one included (0 = all)",
                       {"metavar": "N"}),
    "--retry-errors": ("refresh.retry_errors", "refresh: retry failed rows even if their source is unchanged", CONST),
}
TASK_FLAGS = {
    "extract": ["--manifest", "--id-column", "--uri-column", "--bytes-column", "--retries", "--host-connections", "--read-timeout", "--max-pixels", "--draft", "--layer", "--preview", "--score",
                "--output-format"],
    "generate": ["--num-samples", "--seed", "--temperature", "--top-k", "--top-p", "--write-png-files", "--contact-sheet"],
    "complete": ["--manifest", "--id-column", "--uri-column", "--bytes-column", "--retries", "--host-connections", "--read-timeout", "--max-pixels", "--draft", "--seed", "--temperature", "--top-k",
                 "--top-p", "--prompt-rows", "--samples-per-image", "--write-png-files", "--contact-sheet"],
    "refresh": ["--manifest", "--id-column", "--uri-column", "--bytes-column", "--retries", "--host-connections", "--read-timeout", "--max-pixels", "--draft", "--layer", "--store", "--deleted", "--keep-current",
                "--retry-errors"],
}
COMMON = ["--model", "--dtype", "--device", "--output", "--overwrite", "--workers", "--shard-size", "--address",
          "--executor", "--cpus-per-worker", "--gpus-per-worker", "--torch-threads", "--max-retries", "--max-error-fraction",
          "--no-report"]


def _with_default(help_: str, key: str, defaults: config_mod.JobConfig) -> str:
    value = defaults
    for part in key.split("."):
        value = getattr(value, part)
    shown = value not in (None, "", []) and not isinstance(value, bool)
    return f"{help_}; default {value}" if shown else help_


def versions() -> str:
    """`igpt-batch --version`: the package and the libraries that decide its results (one list: run/versions.py)."""
    from igpt_batch.run.versions import versions_line

    return versions_line()


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--num-sample` must not mean `--num-samples`); errors show the subcommand's usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="igpt-batch", description="ImageGPT embeddings and samples at scale on Ray.")
    p.add_argument("--version", action="version", version=versions())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    defaults = config_mod.JobConfig()
    for task, help_ in [("extract", "paper-exact embeddings for a manifest of images"),
                        ("generate", "unconditional samples, one image per integer seed"),
                        ("complete", "complete the bottom of each image from its top rows"),
                        ("refresh", "nightly incremental embeddings into a versioned store (see docs/REFRESH.md)")]:
        sp = sub.add_parser(task, help=help_)
        sp.add_argument("--config", help="YAML config file (see configs/); flags override it")
        sp.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")
        sp.add_argument("--batch-size", help="images (extract) or samples (generate/complete) per model call, or auto; "
                        f"default {defaults.extract.batch_size} / {defaults.generate.batch_size}")
        _dry_run_options(sp)
        for flag in COMMON + TASK_FLAGS[task]:
            if task == "refresh" and flag in ("--output", "--overwrite", "--no-report"):  # the store decides where output goes
                continue
            key, help_, extra = FLAGS[flag]
            sp.add_argument(flag, dest=flag[2:].replace("-", "_"), help=_with_default(help_, key, defaults), **extra)
    d = sub.add_parser("demo", help="run extract and generate on the embedded demo model, offline")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--num-samples", type=int, default=64)
    d.add_argument("--executor", default="ray", choices=["ray", "local"])
    from igpt_batch.probe import add_arguments as probe_arguments

    probe_arguments(sub.add_parser("probe", help="linear probe (logistic regression) on extracted embeddings + labels"))
    i = sub.add_parser("inspect", help="summarise an output folder or a refresh store")
    i.add_argument("output", help="an output folder, or a refresh store (local folder or fsspec URL)")
    i.add_argument("--verify", action="store_true",
                   help="check every committed file (or every live current-table file) exists with its row count")
    i.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")
    i.add_argument("--json", action="store_true", help="print one machine-readable JSON object instead of text")
    cli_store.add_commands(sub)
    from igpt_batch.outliers import add_arguments as outliers_arguments

    outliers_arguments(sub)
    r = sub.add_parser("report", help="write report.html of an output (summary, throughput, errors, embedding map) "
                       "or of a refresh store (each night's rows, duration, recall, duplicates; versions, snapshots)")
    r.add_argument("output", help="an output folder or a refresh store (folder or fsspec URL)")
    r.add_argument("-o", "--out", help="where to write the page (default OUTPUT/report.html)")
    r.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")
    for choice in sub._choices_actions:  # `igpt-batch X --help` opens with the line the command list shows for X
        sub.choices[choice.dest].description = sub.choices[choice.dest].description or choice.help
    return p


def _dry_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="scan and plan, print what would run and, with --gpu, its "
                   "estimated time and cost; writes nothing and starts no model worker")
    p.add_argument("--gpu", metavar="NAME", help="--dry-run: price the run on run.workers GPUs of this kind "
                   "(A10G, L40S, A100, H100; docs/CAPACITY.md)")
    p.add_argument("--gpu-price", type=float, metavar="USD", help="--dry-run: $ per GPU-hour (default: the capacity "
                   "model's assumed on-demand price)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the usage of the subcommand it was given to."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def config_from_args(args: argparse.Namespace, task: str) -> config_mod.JobConfig:
    overrides = {}
    for flag, (key, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            overrides[key] = value
    if args.batch_size is not None:
        overrides["extract.batch_size" if task in ("extract", "refresh") else "generate.batch_size"] = args.batch_size
    if args.storage_options:
        overrides["storage_options"] = cli_store.storage_options(args.storage_options)
    return config_mod.load(args.config, overrides)


def _dispatch(args: argparse.Namespace, run_job) -> int:
    """Run one parsed command; returns its exit code (exceptions are main's to map)."""
    if args.command == "demo":
        from igpt_batch.demo import run_demo

        run_demo(args.output, args.num_samples, args.executor)
        return 0
    if args.command == "probe":
        from igpt_batch.probe import run_from_args

        run_from_args(args)
        return 0
    if args.command == "inspect":
        from igpt_batch.inspector import inspect

        return inspect(args.output, verify=args.verify, storage_options=cli_store.storage_options(args.storage_options),
                       as_json=args.json)
    if args.command == "report":
        from igpt_batch.store.report import write  # a store's page, or a job output's (run/report.py)

        print(write(args.output, args.out, cli_store.storage_options(args.storage_options)))
        return 0
    if args.command == "outliers":
        from igpt_batch.outliers import run as outliers

        return outliers(args, cli_store.storage_options(args.storage_options))
    if args.command in cli_store.COMMANDS:
        return cli_store.run(args)
    cfg = config_from_args(args, args.command)
    if (args.gpu or args.gpu_price) and not args.dry_run:
        raise ConfigError("--gpu and --gpu-price price a --dry-run; add --dry-run")
    if args.dry_run:
        from igpt_batch.store.dry_run import run as dry_run

        return dry_run(cfg, args.command, args.gpu, args.gpu_price)
    if args.command == "refresh":
        from igpt_batch.store.refresh import refresh

        summary = refresh(cfg)
    else:
        summary = run_job(cfg, args.command)
    print(json.dumps(summary, sort_keys=True), flush=True)  # one line: the last on stdout, for log-based alerts
    return 0


def main(argv: list[str] | None = None) -> int:
    level = logging.DEBUG if os.environ.get("IGPT_BATCH_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse(argv)
    from igpt_batch.errors import JobError, UsageError
    from igpt_batch.redact import redact_text
    from igpt_batch.run.driver import run_job

    try:
        return _dispatch(args, run_job)
    except UsageError as e:  # the project's own config and input errors, found before any work
        print(f"igpt-batch: error: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(f"igpt-batch: job failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else (Arrow, Lance, a bug): exit 1 with a message, the traceback at debug level
        logging.getLogger("igpt_batch").debug("traceback", exc_info=True)
        print(f"igpt-batch: failed: {type(e).__name__}: {redact_text(str(e))} (IGPT_BATCH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
