"""Weight-based links between a dictionary's latents and the model's neurons, and among the latents.

All cosines are between directions in the space the dictionary reads and writes: for a dictionary
over the residual stream (or a transcoder writing the MLP's output), a neuron's direction is its
output row W_out[L][n] at the dictionary's layer L; for a dictionary over MLP activations
(`blocks.L.mlp.hook_*`), it is the unit vector of neuron n. A latent "reads from" a neuron by the
cosine of its encoder column W_enc[:, j] with that direction and "writes along" it by the cosine
of its decoder row W_dec[j]. Similar latents: the cosine of decoder rows (Neuronpedia's measure).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from sitegen.hooks import HOOK_STAGES, MLP_WIDE, hook_order
from sitegen.services.dictionary.data import dictionary_table

TOP_N = 10
_CHUNK = 2048  # latents per block of a cosine matrix: bounds its memory at _CHUNK x d_sae floats


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _top(cos: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n of each row, ties to the lower index (torch.topk's order is not specified on ties)."""
    n = min(n, cos.shape[1])
    # A stable descending sort: equal cosines keep index order, so the tables are deterministic.
    values, index = torch.sort(cos, dim=1, descending=True, stable=True)
    return values[:, :n], index[:, :n]


def _list_column(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    n, k = values.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)), pa.array(values.reshape(-1), dtype)
    )


def neuron_directions(model, dictionary) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(layer, read-side neuron directions, write-side neuron directions), each (d_mlp, width) at
    unit norm, in the spaces of the dictionary's input and output hooks."""

    def at(hook: str) -> torch.Tensor:
        layer, stage = hook_order(hook)
        if HOOK_STAGES[stage] in MLP_WIDE:
            return torch.eye(model.d_mlp)
        return _unit_rows(model.mlp_weights(layer).W_out.float().cpu())

    return (
        hook_order(dictionary.hook_name)[0],
        at(dictionary.hook_name),
        at(dictionary.hook_out or dictionary.hook_name),
    )


def latent_table(units) -> pa.Table:
    """One row per latent: similar latents by decoder cosine (itself excluded), the neurons it reads
    from (encoder) and writes along (decoder), TOP_N each, highest cosine first."""
    d = units.dictionary
    _, read_dirs, write_dirs = neuron_directions(units.base, d)
    enc = _unit_rows(d.W_enc.T.float().cpu())  # (d_sae, d_in)
    dec = _unit_rows(d.W_dec.float().cpu())  # (d_sae, d_out)
    (
        sim_v,
        sim_i,
    ) = [], []
    for start in range(0, dec.shape[0], _CHUNK):
        cos = dec[start : start + _CHUNK] @ dec.T
        rows = torch.arange(cos.shape[0])
        cos[rows, rows + start] = -float("inf")  # not itself
        v, i = _top(cos, TOP_N)
        sim_v.append(v)
        sim_i.append(i)
    read_v, read_i = _top(enc @ read_dirs.T, TOP_N)
    write_v, write_i = _top(dec @ write_dirs.T, TOP_N)
    f32 = lambda t: t.numpy().astype(np.float32)
    i32 = lambda t: t.numpy().astype(np.int32)
    return dictionary_table(
        {
            "neuron": pa.array(np.arange(d.d_sae), pa.int32()),
            "similar": _list_column(i32(torch.cat(sim_i)), pa.int32()),
            "similar_cos": _list_column(f32(torch.cat(sim_v)), pa.float32()),
            "reads": _list_column(i32(read_i), pa.int32()),
            "reads_cos": _list_column(f32(read_v), pa.float32()),
            "writes": _list_column(i32(write_i), pa.int32()),
            "writes_cos": _list_column(f32(write_v), pa.float32()),
        }
    )


def neuron_tables(model) -> Iterator[tuple[int, pa.Table]]:
    """Per model layer with dictionaries: one row per neuron, the latents (of every dictionary at
    that layer, by its index in model.dictionaries) reading from its direction and writing along
    it, TOP_N each across those dictionaries, highest cosine first."""
    by_layer: dict[int, list[int]] = {}
    for k, d in enumerate(model.dictionaries):
        by_layer.setdefault(hook_order(d.hook_name)[0], []).append(k)
    for layer in sorted(by_layer):
        sides = {}
        directions = {
            k: neuron_directions(model, model.dictionaries[k]) for k in by_layer[layer]
        }  # once per dictionary
        for side in ("reads", "writes"):
            values, dicts, latents = [], [], []
            for k in by_layer[layer]:
                d = model.dictionaries[k]
                _, read_dirs, write_dirs = directions[k]
                if side == "reads":
                    cos = read_dirs @ _unit_rows(d.W_enc.T.float().cpu()).T  # (d_mlp, d_sae)
                else:
                    cos = write_dirs @ _unit_rows(d.W_dec.float().cpu()).T
                v, i = _top(cos, TOP_N)
                values.append(v)
                latents.append(i)
                dicts.append(torch.full_like(i, k))
            v, order = _top(
                torch.cat(values, dim=1), TOP_N
            )  # across the layer's dictionaries, dictionary order on ties
            sides[side] = (
                v.numpy().astype(np.float32),
                torch.cat(dicts, dim=1).gather(1, order).numpy().astype(np.int32),
                torch.cat(latents, dim=1).gather(1, order).numpy().astype(np.int32),
            )
        columns = {"neuron": pa.array(np.arange(model.d_mlp), pa.int32())}
        for side, (v, k, i) in sides.items():
            columns[f"{side}_dict"] = _list_column(k, pa.int32())
            columns[side] = _list_column(i, pa.int32())
            columns[f"{side}_cos"] = _list_column(v, pa.float32())
        yield layer, dictionary_table(columns)


@torch.no_grad()
def weight_tables(model) -> Iterator[tuple[int, pa.Table]]:
    if getattr(model, "dictionary", None) is not None:  # a dictionary's latents (sitegen.dictionaries.units)
        yield 0, latent_table(model)
    elif getattr(model, "dictionaries", ()):
        yield from neuron_tables(model)
