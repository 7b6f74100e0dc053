"""Explanations of neurons in words, with simulation scores (Bills et al. 2023): imported from
OpenAI's published files (published.py), scored with the pure functions of scoring.py, shown by
render.py. No torch anywhere here."""
