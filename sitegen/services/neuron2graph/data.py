"""The neuron2graph service's stored form, declared once (no torch: Store.open, the build and the
token store read it; compute.graphs_table writes it)."""

from __future__ import annotations

import pyarrow as pa

# One row per graph: its nodes breadth-first with parent indices (-1 for the trie's first tokens),
# its token sets (search, similarity) and its held-out evaluation.
GRAPH_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("base_max_act", pa.float32()),
        (
            "nodes",
            pa.list_(
                pa.struct(
                    [
                        ("token", pa.string()),
                        ("depth", pa.int16()),
                        ("value", pa.float32()),
                        ("end", pa.float32()),
                        ("parent", pa.int32()),
                        ("activation", pa.float32()),
                        ("activating", pa.bool_()),
                    ]
                )
            ),
        ),
        ("activating", pa.list_(pa.string())),
        ("important", pa.list_(pa.string())),
        # null where undefined (graph.evaluate): never a vacuous 1.0 or a 1 - x/1e-32
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("f1", pa.float64()),
        ("f1_ci", pa.list_(pa.float64())),  # [low, high]: 95% bootstrap interval over the held-out texts
        ("variance_explained", pa.float64()),
        ("n_train", pa.int16()),
        ("n_test", pa.int16()),
        ("n_lines", pa.int32()),
    ]
)
