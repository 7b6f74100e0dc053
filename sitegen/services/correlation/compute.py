"""The correlation service's corpus pass (torch): one layer's exact Gram matrix of the counted
activations on the fixed-point grid of data.py."""

from __future__ import annotations

import numpy as np
import torch

from sitegen.errors import ModelError
from sitegen.services.correlation import data


class GramAccumulator:
    """int64 sums over the counted tokens (Batch.valid: BOS and padding excluded, as neuroscope
    counts): the token count, per neuron sum(q) and the clamped count, and the (d, d) Gram matrix
    sum(q q^T), q the activation on the 2^-GRID_SHIFT grid (data.py says why each chunk's float64
    product is exact)."""

    def __init__(self, run):
        d, device = run.layer_size, run.device
        self.first_valid = run.first_valid
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(d, dtype=torch.int64, device=device)
        self.clamped = torch.zeros(d, dtype=torch.int64, device=device)
        self.gram = torch.zeros((d, d), dtype=torch.int64, device=device)
        # A dictionary's latents: their products with the neurons of the layer they read at
        # (Batch.base); |each| <= sqrt(G_ll G_nn), so the two units' own guards bound it too.
        self.cross = torch.zeros((d, run.base_size), dtype=torch.int64, device=device) if run.base_size else None
        # Set (without a device sync) when a Gram diagonal entry passes INT64_GUARD; read at every
        # checkpoint and before the table is written.
        self.over = torch.zeros((), dtype=torch.bool, device=device)

    def _counted(self, acts: torch.Tensor, batch) -> torch.Tensor:
        counted = acts[:, self.first_valid :] if batch.all_full else acts[batch.valid]
        # One pass to a new contiguous tensor; scaling by a power of two is exact.
        return torch.mul(counted.float(), 2.0**data.GRID_SHIFT).reshape(-1, acts.shape[-1])

    def update(self, acts: torch.Tensor, batch) -> None:
        scaled = self._counted(acts, batch)
        if scaled.shape[0] == 0:
            return
        # Counting the cut values per neuron costs a pass over the batch: on the CPU a whole-batch
        # min and max first (a sync costs nothing there), on a device no sync.
        if scaled.device.type != "cpu" or max(-float(scaled.amin()), float(scaled.amax())) > data.CLAMP:
            self.clamped += (scaled.abs() > data.CLAMP).sum(0)
        q = scaled.round_().clamp_(-data.CLAMP, data.CLAMP)  # integers of at most 21 bits: exact in float32
        # the base layer's neurons on the same grid (their cut values are counted in their own table)
        base = None if self.cross is None else self._counted(batch.base, batch).round_().clamp_(-data.CLAMP, data.CLAMP)
        self.tokens += q.shape[0]
        for start in range(0, q.shape[0], data.CHUNK):
            chunk = q[start : start + data.CHUNK].double()
            self.gram += (chunk.T @ chunk).to(torch.int64)
            self.sum += chunk.sum(0).to(torch.int64)
            if base is not None:
                self.cross += (chunk.T @ base[start : start + data.CHUNK].double()).to(torch.int64)
            self.over |= self.gram.diagonal().max() >= data.INT64_GUARD

    def _check(self) -> None:
        if bool(self.over):
            raise ModelError(
                "--correlations: a neuron's sum of squared activations on the grid nears the int64 limit; "
                "compute it over fewer --tokens"
            )

    def _names(self) -> tuple[str, ...]:
        return ("tokens", "sum", "clamped", "gram") + (("cross",) if self.cross is not None else ())

    def state(self) -> dict[str, np.ndarray]:
        self._check()
        return {name: getattr(self, name).cpu().numpy() for name in self._names()}

    def load(self, state: dict) -> None:
        for name in self._names():
            getattr(self, name).copy_(torch.from_numpy(np.asarray(state[name])))

    def table(self):
        s = self.state()
        return data.sums_table(int(s["tokens"]), s["sum"], s["clamped"], s["gram"], s.get("cross"))
