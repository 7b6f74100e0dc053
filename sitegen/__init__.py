"""sitegen: compute per-neuron data for transformer language models and publish it as static files.

Data flows one way: compute (torch) -> store (Parquet) -> site (HTML + JSON API) -> CDN.
"""

__version__ = "0.1.0"
