"""orthotune's version: adapter folders and model cards record it."""

__version__ = "0.1.0"
