"""A dictionary's quality figures from the corpus pass's exact sums (no torch: merge adds shards'
sums up and recomputes the figures here)."""

from __future__ import annotations

import numpy as np

# Fixed-point scale of the quality sums: per-token values are rounded to multiples of 2^-SCALE_BITS
# and summed as int64, so the sums are exact whatever the order or the shard split (as the
# neuroscope statistics are). 2^16 keeps a per-token squared norm of 10^5 at ~6.6e9, so int64
# (9.2e18) holds the sum over a billion such tokens, at a resolution of 1.5e-5 per token.
SCALE_BITS = 16
FIELDS = ("tokens", "active", "sq_err", "sq_norm", "loss_tokens", "loss_clean", "loss_spliced")
VECTORS = ("target_sum", "latent_active")


def add_sums(records: list[dict]) -> dict:
    """Merge: the sums of several shards' records."""
    out: dict = {f: sum(int(r[f]) for r in records) for f in FIELDS}
    for key in VECTORS:
        out[key] = [int(v) for v in np.sum([np.asarray(r[key], dtype=np.int64) for r in records], axis=0)]
    return out


def quality_figures(sums: dict) -> dict:
    """L0 (mean active latents per token), FVU (squared error over the target's variance about its
    mean, both summed over tokens), and the mean next-token loss clean, spliced and their
    difference (None where nothing was counted)."""
    scale = float(1 << SCALE_BITS)
    n = int(sums["tokens"])
    counts = np.asarray(sums["latent_active"], dtype=np.int64)
    out: dict = {"tokens": n, "l0": None, "fvu": None, "loss_tokens": int(sums["loss_tokens"])}
    out["dead"] = int((counts == 0).sum())  # never active on a counted token of the corpus pass
    out["density_histogram"] = density_histogram(counts, n)
    if n:
        mean_sq = sums["sq_norm"] / scale / n
        mean = np.asarray(sums["target_sum"], dtype=np.float64) / scale / n
        variance = mean_sq - float(mean @ mean)
        out["l0"] = sums["active"] / n
        out["fvu"] = (sums["sq_err"] / scale / n) / variance if variance > 0 else None
    out["loss_clean"] = out["loss_spliced"] = out["loss_increase"] = None
    if sums["loss_tokens"]:
        m = float(sums["loss_tokens"]) * scale
        out["loss_clean"] = sums["loss_clean"] / m
        out["loss_spliced"] = sums["loss_spliced"] / m
        out["loss_increase"] = out["loss_spliced"] - out["loss_clean"]
    return out


DENSITY_DECADES = (-6, -5, -4, -3, -2, -1, 0)  # log10(density) bin edges


def density_histogram(counts: np.ndarray, tokens: int) -> dict:
    """Latents per decade of density (active tokens / counted tokens): {"edges": log10 edges,
    "counts": latents in [edge_i, edge_i+1) (the last bin includes density 1), "dead": density 0,
    "below": density > 0 but under the first edge}."""
    density = counts / tokens if tokens else np.zeros(len(counts))
    logs = np.log10(density[density > 0])
    edges = np.array(DENSITY_DECADES, dtype=np.float64)
    inside = logs[logs >= edges[0]]
    bins = np.minimum(np.searchsorted(edges, inside, side="right") - 1, len(edges) - 2)  # density 1 in the last bin
    return {
        "edges": list(DENSITY_DECADES),
        "counts": [int(c) for c in np.bincount(bins, minlength=len(edges) - 1)],
        "dead": int((density == 0).sum()),
        "below": int((logs < edges[0]).sum()),
    }
