"""The wrapper around one frozen layer: named adapters, mixed batches, quantised and offloaded bases, the per-step cores."""
