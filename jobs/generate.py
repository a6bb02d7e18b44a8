"""Entry point for `ray job submit ... -- python jobs/generate.py --manifest ... --output ...` (same flags as `igpt-batch generate`)."""
import sys

from igpt_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
