"""The logits service's stored form, declared once (no torch: Store.open, the build and merge read it)."""

from __future__ import annotations

import pyarrow as pa

_IDS, _VALS = pa.list_(pa.int32()), pa.list_(pa.float32())
# One row per neuron: its TOP_N promoted and suppressed output tokens (ids into vocab.parquet, and
# their values) and the input tokens that drive it most. The input lists are null for an activation
# function sitegen cannot evaluate (the page and the API then show none).
TABLE_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("promoted_ids", _IDS),
        ("promoted_vals", _VALS),
        ("suppressed_ids", _IDS),
        ("suppressed_vals", _VALS),
        ("input_ids", _IDS),
        ("input_vals", _VALS),
        # The logit histogram: the smallest and largest direct effect and HIST_BINS counts (render.py's
        # logit_hist_edges gives the edges).
        ("logit_hist_lo", pa.float32()),
        ("logit_hist_hi", pa.float32()),
        ("logit_hist_counts", pa.list_(pa.int32())),
        # Connected units by virtual weights, as global ids (layer * layer_size + neuron) with their
        # weights; null for a one-layer model and for a dictionary's latents.
        ("upstream_units", _IDS),
        ("upstream_weights", _VALS),
        ("downstream_units", _IDS),
        ("downstream_weights", _VALS),
    ]
)
