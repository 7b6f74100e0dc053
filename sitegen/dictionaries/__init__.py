"""Sparse dictionaries (SAEs and transcoders): the SAELens file format (format.py), the offline
TopK trainer behind `sitegen train-sae` (train.py), a dictionary's latents as units of the corpus
pass (units.py: `compute --sae`) and its quality figures (quality.py, torch-free: merge uses it)."""
