"""The refresh store: its layout, a night (plan -> run -> merge -> publish -> prune), the index, export, neighbours."""
