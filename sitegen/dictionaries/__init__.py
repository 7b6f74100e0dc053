"""Sparse dictionaries (SAEs and transcoders): the SAELens file format (format.py) and the
offline TopK trainer behind `sitegen train-sae` (train.py). Torch side: imported by compute and
the CLI, never by the site side."""
