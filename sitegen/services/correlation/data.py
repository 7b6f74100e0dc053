"""The correlation service's stored form, declared once (no torch: Store.open, the build and merge
read it), and the fixed-point grid its sums are kept on.

Each counted activation x becomes the integer q = round(x * 2^GRID_SHIFT), clamped to
[-CLAMP, CLAMP] (|x| <= 1024 activation units; the `clamped` column counts the values cut). The
corpus pass adds, per layer, the Gram matrix sum(q q^T), sum(q) and the token count in int64. The
Gram matrix is a float64 matrix product of integer-valued operands over at most CHUNK tokens at a
time: every product is at most CLAMP^2 = 2^40 and every partial sum, whatever order the product
adds in, at most CHUNK * 2^40 = 2^52 < 2^53, so each is an integer float64 holds exactly and the
chunk's result is exact. Chunks and batches add in int64, so the sums are the same integers
whatever the batch size, the device or the shard split.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sitegen.errors import StoreError

GRID_SHIFT = 10  # the grid: 2^-10 activation units
CLAMP = 2**20  # |q| <= 2^20: activations beyond +-1024 are cut to it (counted in `clamped`)
CHUNK = 4096  # tokens per float64 product: 2^12 * CLAMP^2 = 2^52 < 2^53
# The Gram diagonal (sum of q^2, the largest entry by Cauchy-Schwarz) may grow by at most 2^52
# per chunk; the pass stops before it reaches this, so no int64 sum can wrap.
INT64_GUARD = 2**62

# One row per neuron of the layer. `gram` is the neuron's row of the layer's Gram matrix: entry j
# is sum over counted tokens of q_n * q_j. Whole rows (not the upper triangle, which would halve
# the bytes) so that a neuron's row is all its page needs, and merging is adding column by column.
TABLE_SCHEMA = pa.schema(
    [
        ("neuron", pa.int32()),
        ("tokens", pa.int64()),  # the counted tokens (the same in every row of a layer)
        ("sum", pa.int64()),  # sum of q
        ("clamped", pa.int64()),  # counted tokens whose activation was beyond +-CLAMP / 2^GRID_SHIFT
        ("gram", pa.list_(pa.int64())),
    ]
)

# A dictionary's latents only (compute --correlations --sae): per latent, its products with every
# neuron of the model layer the dictionary reads at, over the same counted tokens: entry n is the
# sum of q_latent * q_n, q on the same grid. With the neurons' own `sum` and `gram` diagonal (that
# layer's table in the model's store) they give Pearson's r between latents and neurons.
CROSS_SCHEMA = pa.schema([("neuron_gram", pa.list_(pa.int64()))])


def _rows(matrix: np.ndarray) -> pa.Array:
    d, width = matrix.shape
    offsets = pa.array(np.arange(0, (d + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix, dtype=np.int64).reshape(-1)))


def sums_table(
    tokens: int, sums: np.ndarray, clamped: np.ndarray, gram: np.ndarray, cross: np.ndarray | None = None
) -> pa.Table:
    """A layer's table from its int64 sums: sums and clamped (d,), gram (d, d); for a dictionary's
    latents also cross (d, the base layer's neurons), the CROSS_SCHEMA column."""
    d = len(sums)
    table = pa.table(
        {
            "neuron": pa.array(np.arange(d, dtype=np.int32)),
            "tokens": pa.array(np.full(d, tokens, dtype=np.int64)),
            "sum": pa.array(np.asarray(sums, dtype=np.int64)),
            "clamped": pa.array(np.asarray(clamped, dtype=np.int64)),
            "gram": _rows(np.asarray(gram).reshape(d, d)),
        },
        schema=TABLE_SCHEMA,
    )
    if cross is not None:
        table = table.append_column(CROSS_SCHEMA.field("neuron_gram"), _rows(np.asarray(cross).reshape(d, -1)))
    return table


def table_cross(table: pa.Table) -> np.ndarray | None:
    """(d, base neurons) of a latents' table ordered by latent, or None for a table without it."""
    if "neuron_gram" not in table.column_names:
        return None
    table = table.sort_by("neuron")
    flat = table.column("neuron_gram").combine_chunks().flatten().to_numpy()
    return flat.reshape(table.num_rows, -1) if table.num_rows else flat.reshape(0, 0)


def table_sums(table: pa.Table) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, sums, clamped, gram (d, d)) of a layer's table, ordered by neuron."""
    table = table.sort_by("neuron")
    d = table.num_rows
    gram = table.column("gram").combine_chunks().flatten().to_numpy().reshape(d, d)
    tokens = int(table.column("tokens")[0].as_py()) if d else 0
    return tokens, table.column("sum").to_numpy(), table.column("clamped").to_numpy(), gram


def merge(tables: list[pa.Table]) -> pa.Table:
    """Shard tables of one layer -> the whole run's: every sum added (integers: any order gives
    the same bytes). The Gram diagonal bounds every entry (Cauchy-Schwarz), so checking that its
    merged values fit int64 (added as Python integers) shows that no sum wrapped."""
    parts = [table_sums(t) for t in tables]
    d = len(parts[0][1])
    peak = max((sum(int(p[3][i, i]) for p in parts) for i in range(d)), default=0)
    if peak >= 2**63:
        raise StoreError(
            f"the merged correlation sums reach {peak}, beyond int64: compute --correlations over fewer --tokens"
        )
    tokens = sum(p[0] for p in parts)
    sums, clamped, gram = (np.sum([p[i] for p in parts], axis=0, dtype=np.int64) for i in (1, 2, 3))
    crosses = [table_cross(t) for t in tables]
    if any(c is None for c in crosses) != all(c is None for c in crosses):
        raise StoreError("the shards' correlation tables differ in their columns: merge shards of one run")
    cross = None if crosses[0] is None else np.sum(crosses, axis=0, dtype=np.int64)
    return sums_table(tokens, sums, clamped, gram, cross)


def model_store(store):
    """The store of the model a dictionary's store belongs to, where that dictionary's store sits in
    it (<model store>/dictionaries/<name>) and the model's store has correlation tables; else None."""
    from sitegen.store import Store

    record = store.manifest.get("dictionary")
    root = store.root.parent.parent
    if record is None or not (root / "manifest.json").exists():
        return None
    base = Store.open(root)
    if record["name"] not in base.manifest.get("dictionaries", []) or not base.has_service("correlation"):
        return None
    return base
