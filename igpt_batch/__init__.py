"""igpt-batch: ImageGPT embeddings and samples at scale on Ray."""
__version__ = "0.1.0"
