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
    ]
)
