"""The refresh store: its layout, a night (night plan, extract, merge, publish a snapshot, prune), index, export, neighbours."""
