"""Entry point for `ray job submit ... -- python jobs/nightly_refresh.py --config configs/nightly-refresh.yaml` (same flags as `igpt-batch refresh`)."""
import sys

from igpt_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
