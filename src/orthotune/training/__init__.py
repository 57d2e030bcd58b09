"""Training: step compilation, NaN/Inf guards, distributed training, the HF Trainer, LOFT's support selection."""
