"""Inputs: manifests, WebDataset tars, fetching bytes (files, fsspec, http), decoding images, stat-ing sources."""
