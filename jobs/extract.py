"""Entry point for `ray job submit ... -- python jobs/extract.py --manifest ... --output ...` (same flags as `igpt-batch extract`)."""
import sys

from igpt_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
