"""The compute layer: the only code that imports torch, transformers or transformer-lens."""
