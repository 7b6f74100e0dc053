"""Weight-based data per neuron (torch; no corpus needed).

- Direct logit effect: the neuron's output direction W_out[n] read through the unembedding.
  Layer norms: ln_final's weight is folded in (and, for LayerNorm, the direction is centred
  first, as LayerNorm would centre it); the data-dependent 1/rms (or 1/std) scale is left out:
  it is one positive number per token position, so it changes no ranking. Biases are left out:
  they do not depend on the neuron.
- Input tokens: the activation the neuron would have if the residual stream held only a token's
  embedding, passed through the layer's own pre-MLP norm (weight and bias included) and the MLP's
  nonlinearity (act(gate) * up for gated MLPs). The tokens with the highest such activation are
  the neuron's top input tokens from W_E . W_in.
- Logit histogram: the direct effect above on every vocabulary token, binned as np.histogram bins
  it by default apart from the bin count: HIST_BINS equal-width bins from the neuron's smallest to
  its largest effect (the last bin closed). Stored as (min, max, counts): the edges follow from
  min and max (logit_hist_edges), so a unit costs two floats and HIST_BINS integers.
- Connected units (virtual weights through the residual stream): the weight from neuron (l, i) to
  neuron (m, j), l < m, is W_out[l][i] . (w_m * W_in[m][:, j]), w_m the weight of layer m's pre-MLP
  norm folded into the input direction (for LayerNorm the output direction is centred first, as
  the norm centres the residual stream); the data-dependent 1/rms scale, the norm's bias and the
  MLP bias are left out, as for the logit effects. Gated MLPs: W_in is the up (linear) projection,
  not the gate: the activation act(gate) * up is linear in up with slope act(gate), which is >= 0
  up to SiLU's -0.28, so a positive weight through up raises the activation wherever the gate is
  open; through the gate the sign of the effect flips with the sign of up. Each neuron keeps the 10
  largest and the 10 most negative weights of each side (upstream: every neuron of an earlier
  layer; downstream: of a later one), ordered by weight, largest first.
"""

from __future__ import annotations

from typing import Iterator

import numba
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from sitegen.services.logits.data import TABLE_SCHEMA
from sitegen.services.logits.render import HIST_BINS, logit_hist_edges

SERVICE = "logits"
TOP_N = 10
_HIST_ROWS = 256  # neurons binned at once: bounds the (rows, vocab) int64 bin-index matrix

_ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _normalise(
    x: torch.Tensor, kind: str, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    if kind.startswith("LN"):
        x = x - x.mean(-1, keepdim=True)
    x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if weight is not None:
        x = x * weight
    if bias is not None:
        x = x + bias
    return x


def _list_column(tensor: torch.Tensor, dtype: pa.DataType) -> pa.Array:
    """A [neurons, k] tensor (on any device: the model's, e.g. CUDA) as a list column."""
    values = tensor.contiguous().cpu().numpy()
    n, k = values.shape
    offsets = np.arange(0, (n + 1) * k, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), dtype))


def logit_histograms(
    logits: torch.Tensor, bins: int = HIST_BINS, fused: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min, max, counts) per row of logits (rows, vocab): counts (rows, bins) int32 equal to
    np.histogram(row, bins)[0]. Each value is placed by comparison with np.histogram's own float32
    edges (edges[i] <= x < edges[i + 1], the top edge in the last bin), so the counts do not depend
    on how the bin index would be rounded. fused (default: on a CPU): a numba kernel that guesses
    the bin arithmetically and settles it by those comparisons; else torch.searchsorted (the GPU's)."""
    lo, hi = logits.amin(1).cpu().numpy(), logits.amax(1).cpu().numpy()
    edges = np.stack([logit_hist_edges(a, b, bins) for a, b in zip(lo.tolist(), hi.tolist())])
    if logits.device.type == "cpu" if fused is None else fused:
        counts = np.zeros((logits.shape[0], bins), dtype=np.int64)
        _histogram_rows(logits.detach().float().contiguous().numpy(), edges, counts)
        return lo, hi, counts.astype(np.int32)
    edges = torch.from_numpy(edges).to(logits.device)
    counts = torch.zeros((logits.shape[0], bins), dtype=torch.int64, device=logits.device)
    for start in range(0, logits.shape[0], _HIST_ROWS):
        rows = slice(start, start + _HIST_ROWS)
        index = torch.searchsorted(edges[rows].contiguous(), logits[rows].contiguous(), right=True).sub_(1)
        counts[rows].scatter_add_(1, index.clamp_(0, bins - 1), torch.ones_like(index))
    return lo, hi, counts.cpu().numpy().astype(np.int32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _histogram_rows(values, edges, counts):
    """counts[r, i] += #{x in values[r]: i = the last bin whose left edge is <= x} (as
    searchsorted(edges[r], x, right=True) - 1, clamped to the bins)."""
    bins = counts.shape[1]
    for r in numba.prange(values.shape[0]):
        e = edges[r]
        first = np.float64(e[0])
        scale = bins / (np.float64(e[bins]) - first)
        for x in values[r]:
            g = min(max(np.int64((np.float64(x) - first) * scale), 0), bins - 1)
            while g < bins - 1 and x >= e[g + 1]:
                g += 1
            while g > 0 and x < e[g]:
                g -= 1
            counts[r, g] += 1


class Connections:
    """Virtual weights between the MLP neurons of different layers, top CONNECTED_N of each sign per
    neuron and side. Every layer pair (l, m) is multiplied once, when layer l comes: layer l's
    downstream lists are then complete, and so are its upstream lists (filled by the pairs (k, l),
    k < l, of earlier layers). `layer(l)` must be called in layer order."""

    def __init__(self, model, top_n: int):
        self.top_n, self.n_layers, self.size = top_n, model.n_layers, model.d_mlp
        lnorm = model.normalization.startswith("LN")
        self.out_dirs, self.in_dirs = [], []
        for layer in range(model.n_layers):
            mlp = model.mlp_weights(layer)
            W_out = mlp.W_out.float()
            self.out_dirs.append(W_out - W_out.mean(-1, keepdim=True) if lnorm else W_out)
            weight = mlp.norm[0]
            self.in_dirs.append(mlp.W_in.float() * (weight.float()[:, None] if weight is not None else 1.0))
        # running candidates per layer and side: (values, global ids), each (d_mlp, <= 2 * top_n)
        self.upstream: list = [None] * model.n_layers

    def _keep(self, best, values: torch.Tensor, first_id: int):
        """best (values, ids) joined with a new block of values (rows, cols), whose column c is unit
        first_id + c; keeps the top_n largest and the top_n smallest of each row."""
        ids = torch.arange(first_id, first_id + values.shape[1], device=values.device).expand_as(values)
        if best is not None:
            values, ids = torch.cat([best[0], values], 1), torch.cat([best[1], ids], 1)
        if values.shape[1] <= 2 * self.top_n:
            return values, ids
        hi_v, hi_i = torch.topk(values, self.top_n, dim=1)
        lo_v, lo_i = torch.topk(values, self.top_n, dim=1, largest=False)
        index = torch.cat([hi_i, lo_i], 1)
        return values.gather(1, index), ids.gather(1, index)

    def layer(self, layer: int) -> dict[str, pa.Array]:
        down = None
        for later in range(layer + 1, self.n_layers):
            weights = self.out_dirs[layer] @ self.in_dirs[later]  # (d_mlp of layer, d_mlp of later)
            down = self._keep(down, weights, later * self.size)
            self.upstream[later] = self._keep(self.upstream[later], weights.T, layer * self.size)
        up, self.upstream[layer] = self.upstream[layer], None
        columns = {}
        for side, best in (("upstream", up), ("downstream", down)):
            units, weights = _ordered(best, self.size)
            columns[f"{side}_units"], columns[f"{side}_weights"] = units, weights
        return columns


def _ordered(best, rows: int) -> tuple[pa.Array, pa.Array]:
    """List columns of each row's kept units (global ids) and weights: distinct units, largest
    weight first, ties to the lower id. None (no layer on that side): empty lists."""
    if best is None:
        empty = pa.array(np.zeros(rows + 1, dtype=np.int32))
        return (
            pa.ListArray.from_arrays(empty, pa.array([], pa.int32())),
            pa.ListArray.from_arrays(empty, pa.array([], pa.float32())),
        )
    values, ids = best[0].cpu().numpy(), best[1].cpu().numpy()
    order = np.lexsort((ids, -values), axis=1)
    values, ids = np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)
    # With ties (e.g. zero weights) a unit may be among both the largest and the smallest: once.
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    offsets = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32)
    return (
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[keep].astype(np.int32), pa.int32())),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep], pa.float32())),
    )


@torch.no_grad()
def weight_tables(model, top_n: int = TOP_N, vocab_chunk: int = 8192) -> Iterator[tuple[int, pa.Table]]:
    """Yield (layer, table) with one row per neuron: promoted/suppressed output tokens and top
    input tokens. `model`: the LoadedModel (sitegen.compute.models), read through its methods."""
    kind, eps = model.normalization, model.norm_eps
    act = _ACTS.get(model.act_fn)
    w_final, _ = model.final_norm()
    W_U = model.unembed().float()  # (d_model, vocab)
    W_E = model.input_embeddings().float()  # (vocab, d_model)
    # Units of one layer (a dictionary's latents) have no other layer to connect to.
    connections = Connections(model, top_n) if model.n_layers > 1 else None
    for layer in range(model.n_layers):
        mlp = model.mlp_weights(layer)
        W_out = mlp.W_out.float()  # (d_mlp, d_model)
        direction = W_out - W_out.mean(-1, keepdim=True) if kind.startswith("LN") else W_out
        if w_final is not None:
            direction = direction * w_final
        logits = direction @ W_U  # (d_mlp, vocab)
        pro_v, pro_i = torch.topk(logits, top_n, dim=1)
        sup_v, sup_i = torch.topk(-logits, top_n, dim=1)
        hist_lo, hist_hi, hist_counts = logit_histograms(logits)
        del logits
        columns = {
            "neuron": pa.array(np.arange(W_out.shape[0]), pa.int32()),
            "promoted_ids": _list_column(pro_i, pa.int32()),
            "promoted_vals": _list_column(pro_v, pa.float32()),
            "suppressed_ids": _list_column(sup_i, pa.int32()),
            "suppressed_vals": _list_column(-sup_v, pa.float32()),
            "logit_hist_lo": pa.array(hist_lo, pa.float32()),
            "logit_hist_hi": pa.array(hist_hi, pa.float32()),
            "logit_hist_counts": _list_column(torch.from_numpy(hist_counts), pa.int32()),
            **(connections.layer(layer) if connections is not None else {}),
        }
        if act is not None:
            w2, b2 = mlp.norm
            W_in = mlp.W_in.float()
            b_in = mlp.b_in.float() if mlp.b_in is not None else None
            W_gate = mlp.W_gate.float() if mlp.W_gate is not None else None
            best_v = best_i = None
            for start in range(0, W_E.shape[0], vocab_chunk):  # chunks bound the (vocab, d_mlp) matrix
                e = _normalise(W_E[start : start + vocab_chunk], kind, w2, b2, eps)
                pre = e @ W_in + (b_in if b_in is not None else 0)
                a = act(e @ W_gate) * pre if W_gate is not None else act(pre)
                v, i = torch.topk(a, min(top_n, a.shape[0]), dim=0)
                i = i + start
                if best_v is None:
                    best_v, best_i = v, i
                else:
                    cat_v, cat_i = torch.cat([best_v, v]), torch.cat([best_i, i])
                    keep = torch.topk(cat_v, top_n, dim=0).indices
                    best_v, best_i = cat_v.gather(0, keep), cat_i.gather(0, keep)
            columns["input_ids"] = _list_column(best_i.T, pa.int32())
            columns["input_vals"] = _list_column(best_v.T, pa.float32())
        else:  # an activation function sitegen cannot evaluate: no input tokens (null lists)
            for name in ("input_ids", "input_vals"):
                columns[name] = pa.nulls(W_out.shape[0], TABLE_SCHEMA.field(name).type)
        for name in TABLE_SCHEMA.names:  # connected units of a one-layer model (or latents): null lists
            if name not in columns:
                columns[name] = pa.nulls(W_out.shape[0], TABLE_SCHEMA.field(name).type)
        yield layer, pa.table(columns, schema=TABLE_SCHEMA)
