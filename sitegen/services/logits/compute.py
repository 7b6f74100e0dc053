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
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

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


def logit_histograms(logits: torch.Tensor, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(min, max, counts) per row of logits (rows, vocab): counts (rows, bins) int32 equal to
    np.histogram(row, bins)[0]. Each value is placed by comparison with np.histogram's own float32
    edges (searchsorted: edges[i] <= x < edges[i + 1], the top edge in the last bin), so the counts
    do not depend on how the bin index would be rounded."""
    lo, hi = logits.amin(1).cpu().numpy(), logits.amax(1).cpu().numpy()
    edges = torch.from_numpy(np.stack([logit_hist_edges(a, b, bins) for a, b in zip(lo.tolist(), hi.tolist())]))
    edges = edges.to(logits.device)
    counts = torch.zeros((logits.shape[0], bins), dtype=torch.int64, device=logits.device)
    for start in range(0, logits.shape[0], _HIST_ROWS):
        rows = slice(start, start + _HIST_ROWS)
        index = torch.searchsorted(edges[rows].contiguous(), logits[rows].contiguous(), right=True).sub_(1)
        counts[rows].scatter_add_(1, index.clamp_(0, bins - 1), torch.ones_like(index))
    return lo, hi, counts.cpu().numpy().astype(np.int32)


@torch.no_grad()
def weight_tables(model, top_n: int = TOP_N, vocab_chunk: int = 8192) -> Iterator[tuple[int, pa.Table]]:
    """Yield (layer, table) with one row per neuron: promoted/suppressed output tokens and top
    input tokens. `model`: the LoadedModel (sitegen.compute.models), read through its methods."""
    kind, eps = model.normalization, model.norm_eps
    act = _ACTS.get(model.act_fn)
    w_final, _ = model.final_norm()
    W_U = model.unembed().float()  # (d_model, vocab)
    W_E = model.input_embeddings().float()  # (vocab, d_model)
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
        yield layer, pa.table(columns)
