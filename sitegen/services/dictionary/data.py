"""The dictionary service's stored form, declared once (no torch: Store.open and the build read it)."""

from __future__ import annotations

import pyarrow as pa

_IDS, _VALS = pa.list_(pa.int32()), pa.list_(pa.float32())
# One row per unit, in both kinds of store: for a dictionary's latents, `similar` latents (decoder
# cosine) and the base model's neurons each `reads` from / `writes` along (`*_dict` null); for a
# model's neurons, the latents reading from / writing along each (`*_dict`: the dictionary's index
# in the manifest's `dictionaries`; `similar` null). Lists are highest cosine first.
TABLE_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("similar", _IDS),
        ("similar_cos", _VALS),
        ("reads_dict", _IDS),
        ("reads", _IDS),
        ("reads_cos", _VALS),
        ("writes_dict", _IDS),
        ("writes", _IDS),
        ("writes_cos", _VALS),
    ]
)


def dictionary_table(columns: dict) -> pa.Table:
    """COLUMNS (arrays by name) as a table of the declared schema; the columns this kind of store
    does not use are null."""
    n = len(columns["neuron"])
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)
