"""Entry point for `ray job submit ... -- python jobs/complete.py --manifest ... --output ...` (same flags as `igpt-batch complete`)."""
import sys

from igpt_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["complete", *sys.argv[1:]]))
