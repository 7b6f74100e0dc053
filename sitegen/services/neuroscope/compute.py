"""Streaming accumulators for the neuroscope service (torch; the compute half).

Per layer, for every neuron at once, one forward pass updates:
- the top-k sequences by max activation and the bottom-k by min activation (Neuroscope's rule:
  rank sequences, one entry per sequence; ties by lower sequence id), each with its whole trace;
- a fixed random sample of sequences (smallest random_key) with their traces;
- examples across the activation range: per interval of the sequence maximum, the sequences with
  the smallest interval_key, with their traces (IntervalExamples);
- exact fixed-point sums (squares as two limbs), the positive count, min, max and the fine
  histogram (see stats.py).
Positions before `first_valid` (the BOS token) and padding are excluded from ranking and stats.

The k slots are unordered while streaming: a new sequence overwrites the slot it evicts, so an
update moves only the traces that change, not k x d_mlp x seq_len floats per batch.
"""

from __future__ import annotations

import numpy as np
import torch

from sitegen.services.neuroscope import data, kernels, stats


def counted_spans(valid: torch.Tensor, first_valid: int, all_full: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row's counted positions as one span [start, end) (int64 arrays; 0, 0 for a padding
    row): a packed batch counts first_valid .. the sequence's length (runner._batch_tensors)."""
    b, t = valid.shape
    if all_full:
        return np.full(b, first_valid, dtype=np.int64), np.full(b, t, dtype=np.int64)
    mask = valid.cpu().numpy()
    length = mask.sum(1)
    starts = np.where(length > 0, mask.argmax(1), 0).astype(np.int64)
    ends = starts + length
    if not all(mask[r, starts[r] : ends[r]].all() for r in range(b)):
        raise ValueError("the fused accumulators need each row's counted positions in one span")
    return starts, ends


class Extremes:
    """k best sequences per neuron under `score` (higher is better), with their traces."""

    def __init__(self, k: int, n: int, seq_len: int, device: str):
        self.k = k
        self.score = torch.full((k, n), -torch.inf, device=device)
        self.seq_id = torch.full((k, n), -1, dtype=torch.int64, device=device)
        self.trace = torch.zeros((k, n, seq_len), device=device)

    def update(self, score: torch.Tensor, seq_ids: torch.Tensor, trace_of) -> None:
        """score (B, n) for the batch's sequences; seq_ids (B,) with -1 for padding rows;
        trace_of(rows, cols) -> (m, T) traces, called only for the sequences that get in. Only the
        columns some row can enter are sorted, which synchronises a GPU (`update_dense` does not):
        the CPU's random sample, one column whose every-neuron trace a dense merge would copy."""
        k = self.k
        # Cheap pre-filter: only columns where some real row reaches the current worst kept score.
        reach = (score >= self.score.amin(0)) & (seq_ids >= 0)[:, None]
        cols = torch.nonzero(reach.any(0)).squeeze(1)
        if cols.numel() == 0:
            return
        b, m = score.shape[0], cols.numel()
        cand_score = torch.cat([self.score[:, cols], score[:, cols]])
        cand_id = torch.cat([self.seq_id[:, cols], seq_ids[:, None].expand(b, m)])
        cand_score[k:][~reach[:, cols]] = -torch.inf  # rows that cannot get in (padding, too low)
        # Order: score descending, ties by lower sequence id (two stable sorts).
        by_id = torch.argsort(cand_id, dim=0, stable=True)
        by_score = torch.argsort(cand_score.gather(0, by_id), dim=0, descending=True, stable=True)
        chosen = by_id.gather(0, by_score[:k])
        kept = torch.zeros_like(cand_score, dtype=torch.bool).scatter_(0, chosen, True)
        entering = kept[k:] & reach[:, cols]
        if not bool(entering.any()):
            return
        evicted = ~kept[:k]
        ev_c, ev_slot = torch.nonzero(evicted.T, as_tuple=True)  # sorted by column, then slot
        en_c, en_b = torch.nonzero(entering.T, as_tuple=True)  # same count per column
        col = cols[en_c]
        self.score[ev_slot, col] = score[en_b, col]
        self.seq_id[ev_slot, col] = seq_ids[en_b]
        self.trace[ev_slot, col] = trace_of(en_b, col)

    def update_dense(self, score: torch.Tensor, seq_ids: torch.Tensor, traces: torch.Tensor) -> None:
        """update() without a host synchronisation (the GPU's): every column's k kept and B new
        sequences sorted together, whatever gets in; traces (B, n, T), a view is enough. Padding
        rows (id -1, score -inf) sort after the empty slots (also -inf, -1), so they never enter."""
        k = self.k
        cand_score = torch.cat([self.score, torch.where((seq_ids >= 0)[:, None], score, -torch.inf)])
        cand_id = torch.cat([self.seq_id, seq_ids[:, None].expand_as(score)])
        by_id = torch.argsort(cand_id, dim=0, stable=True)
        by_score = torch.argsort(cand_score.gather(0, by_id), dim=0, descending=True, stable=True)
        chosen = by_id.gather(0, by_score[:k])  # (k, n): rows of the candidates
        self.score = cand_score.gather(0, chosen)
        self.seq_id = cand_id.gather(0, chosen)
        self.trace = torch.cat([self.trace, traces]).gather(0, chosen[:, :, None].expand(-1, -1, traces.shape[2]))

    def state(self) -> dict[str, np.ndarray]:
        return {
            "score": self.score.cpu().numpy(),
            "seq_id": self.seq_id.cpu().numpy(),
            "trace": self.trace.cpu().numpy(),
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.score.copy_(torch.from_numpy(state["score"]))
        self.seq_id.copy_(torch.from_numpy(state["seq_id"]))
        self.trace.copy_(torch.from_numpy(state["trace"]))


class LayerAccumulator:
    """Everything the neuroscope service keeps for one layer while streaming."""

    def __init__(
        self, n: int, seq_len: int, top_k: int, n_random: int, first_valid: int, device: str, fused: bool | None = None
    ):
        self.n, self.seq_len, self.first_valid = n, seq_len, first_valid
        # fused: the per-value statistics by kernels.layer_stats (numba) instead of torch operations;
        # the same bits, a fraction of the memory traffic. By default on a CPU (the GPU keeps torch).
        self.fused = device == "cpu" if fused is None else fused
        self.top = Extremes(top_k, n, seq_len, device)
        self.bottom = Extremes(top_k, n, seq_len, device)  # score = -min
        self.random = Extremes(n_random, 1, seq_len * n, device)  # score = -random_key, shared by all neurons
        self.count = 0
        self.sum_fx = torch.zeros(n, dtype=torch.int64, device=device)
        self.sumsq_fx = torch.zeros(n, dtype=torch.int64, device=device)  # squares, high limb
        self.sumsq_lo = torch.zeros(n, dtype=torch.int64, device=device)  # squares, low limb
        self.vmin = torch.full((n,), torch.inf, device=device)
        self.vmax = torch.full((n,), -torch.inf, device=device)
        self.hist = torch.zeros((stats.N_FINE_BINS, n), dtype=torch.int64, device=device)  # (bin, neuron)
        self._one = torch.ones((1, 1), dtype=torch.int64, device=device)
        self._code_table = torch.from_numpy(stats.CODE_TABLE.astype(np.int64)).to(device)
        self._cell_table = self._code_table * n  # flat position of (bin, neuron 0) in self.hist
        self._neuron = torch.arange(n, device=device)
        self._code_table16 = stats.CODE_TABLE.astype(np.int16)  # the kernel's: 16 KB, stays in L1

    def update(
        self,
        acts: torch.Tensor,
        seq_ids: torch.Tensor,
        valid: torch.Tensor,
        rand_score: torch.Tensor,
        all_full: bool = False,
    ) -> None:
        """acts (B, T, n) float32; seq_ids (B,); valid (B, T) bool; rand_score (B,) = -random_key.
        all_full: every row is a real sequence of full length, so `valid` is just 'position >= first_valid'
        and strided views replace masked copies (the common case). Returns each sequence's maximum
        (B, n) (-inf for a padding row), which IntervalExamples files the sequences by."""
        acts = acts.float()
        if self.fused:
            return self._fused_update(acts, seq_ids, valid, rand_score, all_full)
        fv = self.first_valid
        if all_full:
            counted = acts[:, fv:, :]  # (B, T - fv, n) view: every counted token
            seq_min, seq_max = torch.aminmax(counted, dim=1)
        else:
            vmask = valid[:, :, None]
            seq_max = acts.masked_fill(~vmask, -torch.inf).amax(dim=1)
            seq_min = acts.masked_fill(~vmask, torch.inf).amin(dim=1)
            counted = acts[valid]  # (V, n)
        self._update_examples(acts, seq_ids, rand_score, seq_min, seq_max)

        if counted.numel() == 0:
            return seq_max
        dims = tuple(range(counted.dim() - 1))
        self.count += counted.numel() // self.n
        # Fixed point, exactly: values on the 2^-24 grid, squares as two limbs (2^-16 and 2^-46, the
        # steps of stats.square_limbs), sum without rounding in float64 within one batch (partial
        # sums stay below 2^53 units), then accumulate in int64. Two scratch tensors, reused in place
        # (fresh large tensors cost page faults on CPU).
        scratch = torch.mul(counted, 2.0**stats.SUM_SHIFT).round_()
        self.sum_fx += scratch.sum(dims, dtype=torch.float64).to(torch.int64)
        sq = torch.mul(counted, counted, out=scratch).mul_(2.0**stats.SQ_SHIFT)
        sq_hi = torch.round(sq)
        self.sumsq_fx += sq_hi.sum(dims, dtype=torch.float64).to(torch.int64)
        sq_lo = sq.sub_(sq_hi).mul_(2.0**stats.SQ_LO_SHIFT).round_()  # sq - sq_hi is exact
        self.sumsq_lo += sq_lo.sum(dims, dtype=torch.float64).to(torch.int64)
        # In the fast path every row counts, so the per-sequence extremes already hold the layer's.
        lo, hi = (seq_min.amin(0), seq_max.amax(0)) if all_full else torch.aminmax(counted, dim=0)
        torch.minimum(self.vmin, lo, out=self.vmin)
        torch.maximum(self.vmax, hi, out=self.vmax)
        # Histogram: sign, exponent and 4 mantissa bits of each float32 index a lookup table of bins.
        # A negative value's bits one ulp closer to zero (int64: -0.0 does not wrap): bins right-open
        # in value, as np.histogram's (stats.fine_bins).
        bits = counted.view(torch.int32).long()
        codes = bits.add_(bits >> 31).bitwise_right_shift_(19).add_(stats.CODE_OFFSET)
        if self.hist.is_cuda:  # scatter: bincount would sync the device to size its output
            fine = torch.take(self._code_table, codes).reshape(-1, self.n)
            self.hist.scatter_add_(0, fine, self._one.expand(fine.shape))
        else:  # bincount over cells (bin * n + neuron of self.hist): ~1.5x faster than the scatter on CPU
            cells = torch.take(self._cell_table, codes).add_(self._neuron).reshape(-1)
            self.hist.view(-1).add_(torch.bincount(cells, minlength=self.hist.numel()))
        return seq_max

    def _update_examples(self, acts, seq_ids, rand_score, seq_min, seq_max) -> None:
        """The torch path's examples: dense merges, no host synchronisation."""
        traces = acts.transpose(1, 2)  # (B, n, T) view
        self.top.update_dense(seq_max, seq_ids, traces)
        self.bottom.update_dense(-seq_min, seq_ids, traces)
        # The random sample is one column shared by all neurons; its 'trace' is every neuron's trace.
        self.random.update_dense(rand_score[:, None], seq_ids, traces.reshape(len(seq_ids), 1, -1))

    def _fused_update(self, acts, seq_ids, valid, rand_score, all_full: bool):
        """update() with the per-value statistics in one pass of kernels.layer_stats."""
        acts = acts.detach().contiguous()
        starts, ends = counted_spans(valid, self.first_valid, all_full)
        b, n = acts.shape[0], self.n
        seq_min = torch.empty((b, n), dtype=torch.float32)
        seq_max = torch.empty((b, n), dtype=torch.float32)
        values = acts.numpy()
        kernels.layer_stats(
            values,
            values.view(np.int32),
            starts,
            ends,
            self._code_table16,
            self.sum_fx.numpy(),
            self.sumsq_fx.numpy(),
            self.sumsq_lo.numpy(),
            self.vmin.numpy(),
            self.vmax.numpy(),
            self.hist.numpy(),
            seq_min.numpy(),
            seq_max.numpy(),
        )
        ids = seq_ids.numpy()
        for kept, score in ((self.top, seq_max.numpy()), (self.bottom, np.negative(seq_min.numpy()))):
            kernels.offer_sequences(kept.score.numpy(), kept.seq_id.numpy(), kept.trace.numpy(), score, ids, values)
        self.random.update(
            rand_score[:, None], seq_ids, lambda rows, cols: acts[rows].transpose(1, 2).reshape(len(rows), -1)
        )
        self.count += int((ends - starts).sum())
        return seq_max

    # -- checkpointing and hand-off (numpy, so merge and the store need no torch) --
    def state(self) -> dict:
        return {
            "top": self.top.state(),
            "bottom": self.bottom.state(),
            "random": self.random.state(),
            "count": self.count,
            "sum_fx": self.sum_fx.cpu().numpy(),
            "sumsq_fx": self.sumsq_fx.cpu().numpy(),
            "sumsq_lo": self.sumsq_lo.cpu().numpy(),
            "n_pos": stats.positive_count(self.hist.T.cpu().numpy()),
            "vmin": self.vmin.cpu().numpy(),
            "vmax": self.vmax.cpu().numpy(),
            "hist": np.ascontiguousarray(self.hist.T.cpu().numpy()),  # (neuron, bin)
        }

    def load(self, state: dict) -> None:
        self.top.load(state["top"])
        self.bottom.load(state["bottom"])
        self.random.load(state["random"])
        self.count = int(state["count"])
        for name in ("sum_fx", "sumsq_fx", "sumsq_lo", "vmin", "vmax"):
            getattr(self, name).copy_(torch.from_numpy(state[name]))
        self.hist.copy_(torch.from_numpy(state["hist"]).T)


class IntervalExamples:
    """Examples across the activation range: sequences filed by their maximum's interval
    (stats.interval_code: 4 per octave), the INTERVAL_GROUPS highest intervals the neuron reaches
    kept one by one and all lower ones as one group, PER_INTERVAL sequences per group: those with
    the smallest interval_key (highest Batch.interval_score), ties to the lower sequence id.

    The groups hang from the neuron's highest interval so far (`top`), which only rises: when it
    does, the kept examples move down by the rise (as data.merge_intervals moves them),
    the lowest group taking what falls out of the others. Whatever the order the sequences come in,
    the result is the per-group selection over all of them under the final top."""

    def __init__(self, n: int, seq_len: int, device: str, fused: bool | None = None):
        self.n, self.groups, self.per = n, stats.INTERVAL_GROUPS + 1, stats.PER_INTERVAL
        self.fused = device == "cpu" if fused is None else fused  # kernels.offer_intervals, as LayerAccumulator's
        self.slots = Extremes(self.per, self.groups * n, seq_len, device)  # column: group * n + neuron
        self.top = torch.full((n,), -1, dtype=torch.int64, device=device)

    def update(self, seq_max: torch.Tensor, seq_ids: torch.Tensor, score: torch.Tensor, acts: torch.Tensor) -> None:
        """seq_max (B, n) from LayerAccumulator.update; score (B,) = Batch.interval_score; acts (B, T, n)."""
        if self.fused:
            values = acts.detach().float().contiguous().numpy()
            seq_max = seq_max.contiguous().numpy()
            slots = self.slots
            kernels.offer_intervals(
                slots.score.numpy(),
                slots.seq_id.numpy(),
                slots.trace.numpy(),
                self.top.numpy(),
                seq_max,
                seq_max.view(np.int32),
                seq_ids.numpy(),
                score.numpy(),
                values,
                stats.INTERVAL_SHIFT,
                self.groups,
            )
            return
        self._update_dense(seq_max, seq_ids, score, acts)

    def _update_dense(self, seq_max, seq_ids, score, acts) -> None:
        """The torch path (the GPU's), without a host synchronisation: the kept examples, moved to
        their groups under the new top (g -> min(g + rise, last)), and the batch's filed rows are
        sorted together, per neuron, by (group, score descending, lower id), and each group keeps
        its first `per`."""
        n, groups, per, slots = self.n, self.groups, self.per, self.slots
        dev = seq_max.device
        filed = (seq_max > 0) & (seq_ids >= 0)[:, None]  # only a positive maximum has an interval
        code = torch.where(filed, seq_max.contiguous().view(torch.int32).long() >> stats.INTERVAL_SHIFT, -1)
        top = torch.maximum(self.top, code.amax(0))
        group_of = torch.arange(groups, device=dev)
        # entries: the kept examples, rows (slot, group), then the batch's rows (unfiled: group
        # `groups`, which no group takes)
        kept_group = (group_of[:, None] + (top - self.top)[None, :]).clamp(max=groups - 1)
        group = torch.cat(
            [
                kept_group.expand(per, groups, n).reshape(per * groups, n),
                torch.where(filed, (top[None, :] - code).clamp(max=groups - 1), groups),
            ]
        )
        cand_score = torch.cat([slots.score.reshape(per * groups, n), score[:, None].expand_as(seq_max)])
        cand_id = torch.cat([slots.seq_id.reshape(per * groups, n), seq_ids[:, None].expand_as(seq_max)])
        order = torch.argsort(cand_id, dim=0, stable=True)
        order = order.gather(0, torch.argsort(cand_score.gather(0, order), dim=0, descending=True, stable=True))
        order = order.gather(0, torch.argsort(group.gather(0, order), dim=0, stable=True))
        # group g's entries start where the entries of the lower groups end
        counts = (group[None, :, :] == group_of[:, None, None]).sum(1)  # (groups, n)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(per, device=dev)[:, None, None]  # (per, 1, 1)
        taken = rank < counts[None]  # (per, groups, n)
        pick = order.gather(0, (starts[None] + rank).clamp(max=len(order) - 1).reshape(per * groups, n))
        taken = taken.reshape(per * groups, n)
        traces = torch.cat([slots.trace.reshape(per * groups, n, -1), acts.transpose(1, 2)])
        slots.score = torch.where(taken, cand_score.gather(0, pick), -torch.inf).reshape(per, groups * n)
        slots.seq_id = torch.where(taken, cand_id.gather(0, pick), -1).reshape(per, groups * n)
        slots.trace = torch.where(
            taken[:, :, None], traces.gather(0, pick[:, :, None].expand(-1, -1, traces.shape[2])), 0.0
        ).reshape(per, groups * n, -1)
        self.top = top

    def state(self) -> dict[str, np.ndarray]:
        shape = (self.per, self.groups, self.n)
        s = self.slots.state()
        return {
            "score": s["score"].reshape(shape),
            "seq_id": s["seq_id"].reshape(shape),
            "trace": s["trace"].reshape(*shape, -1),
            "top": self.top.cpu().numpy(),
        }

    def load(self, state: dict) -> None:
        flat = {
            k: state[k].reshape(self.per, self.groups * self.n, *state[k].shape[3:])
            for k in ("score", "seq_id", "trace")
        }
        self.slots.load(flat)
        self.top.copy_(torch.from_numpy(state["top"]))


class GluQuadrants:
    """A gated MLP's neurons by (gate sign, up sign) quadrant over the counted tokens: per quadrant
    and neuron the token count, the activation mass (sum of |activation|, fixed point at 2^-24 as
    the neuroscope sums) and the top example (largest |activation|, ties to the lower sequence id,
    then position). Quadrant q = 2 * (gate <= 0) + (up <= 0): 0 (+, +), 1 (+, -), 2 (-, +), 3 (-, -).

    The top example is one int64 per cell, max-reduced: the float32 bits of |activation| (ordered
    as the values are, for values >= 0) above 2^32 - 1 - (seq_id * seq_len + position), so a
    single amax picks the largest value and, among equals, the lowest (sequence, position); -1: no
    token. Counts, sums and maxima of such keys merge exactly in any order (data.merge_glu)."""

    def __init__(self, n: int, seq_len: int, first_valid: int, device: str, fused: bool | None = None):
        self.n, self.seq_len, self.first_valid = n, seq_len, first_valid
        self.fused = device == "cpu" if fused is None else fused  # kernels.glu_quadrants, as LayerAccumulator's
        self.count = torch.zeros(4 * n, dtype=torch.int64, device=device)  # cell q * n + neuron
        self.mass_fx = torch.zeros(4 * n, dtype=torch.int64, device=device)
        self.top = torch.full((4 * n,), -1, dtype=torch.int64, device=device)
        self._neuron = torch.arange(n, device=device)
        self._position = torch.arange(seq_len, device=device)
        self._one = torch.ones(1, dtype=torch.int64, device=device)

    def update(self, acts, gate, up, seq_ids, valid, all_full: bool) -> None:
        if self.fused:
            values = acts.detach().float().contiguous().numpy()
            starts, ends = counted_spans(valid, self.first_valid, all_full)
            kernels.glu_quadrants(
                values,
                values.view(np.int32),
                gate.detach().float().contiguous().numpy(),
                up.detach().float().contiguous().numpy(),
                seq_ids.numpy(),
                starts,
                ends,
                self.seq_len,
                self.count.numpy(),
                self.mass_fx.numpy(),
                self.top.numpy(),
            )
            return
        fv, T = self.first_valid, self.seq_len
        key = seq_ids[:, None] * T + self._position[None, :]  # (B, T): the lower, the earlier
        if all_full:  # strided views, no copies: every row is real, every position from fv on counts
            acts, gate, up, key = acts[:, fv:], gate[:, fv:], up[:, fv:], key[:, fv:]
        else:
            acts, gate, up, key = acts[valid], gate[valid], up[valid], key[valid]
        if acts.numel() == 0:
            return
        # The quadrant in one byte per value, widened once to the cell index (int64: scatter's index).
        quadrant = (gate <= 0).to(torch.uint8).mul_(2).add_((up <= 0).to(torch.uint8))
        cells = quadrant.long().mul_(self.n).add_(self._neuron).reshape(-1)
        magnitude = acts.float().abs()  # contiguous, whatever acts' strides
        # scatter_add rather than bincount, which scans its input for the min and max first
        self.count.scatter_add_(0, cells, self._one.expand(cells.shape))
        # float64 sums of integer-valued units are exact within a batch (< 2^53, as in LayerAccumulator)
        fixed = torch.mul(magnitude, 2.0**stats.SUM_SHIFT).round_().reshape(-1).double()
        self.mass_fx += (
            torch.zeros(4 * self.n, dtype=torch.float64, device=fixed.device)
            .scatter_add_(0, cells, fixed)
            .to(torch.int64)
        )
        ranked = magnitude.view(torch.int32).long().bitwise_left_shift_(32)
        ranked.bitwise_or_((0xFFFFFFFF - key).unsqueeze(-1))
        self.top.scatter_reduce_(0, cells, ranked.reshape(-1), "amax")

    def state(self) -> dict[str, np.ndarray]:
        shape = (4, self.n)
        return {
            "count": self.count.cpu().numpy().reshape(shape),
            "mass_fx": self.mass_fx.cpu().numpy().reshape(shape),
            "top": self.top.cpu().numpy().reshape(shape),
        }

    def load(self, state: dict) -> None:
        for name in ("count", "mass_fx", "top"):
            getattr(self, name).copy_(torch.from_numpy(state[name]).reshape(-1))


class CorpusAccumulator:
    """The service contract's accumulator (sitegen/services/base.py): one layer's LayerAccumulator
    fed a `Batch` at a time; its table has the traces trimmed to each sequence's length."""

    def __init__(self, run):
        self.run = run
        self.acc = LayerAccumulator(run.layer_size, run.seq_len, run.top_k, run.n_random, run.first_valid, run.device)
        self.intervals = IntervalExamples(run.layer_size, run.seq_len, run.device)
        self.glu = (
            GluQuadrants(run.layer_size, run.seq_len, run.first_valid, run.device)
            if getattr(run, "gated_mlp", False)
            else None
        )

    def update(self, acts: torch.Tensor, batch) -> None:
        seq_max = self.acc.update(acts, batch.seq_ids, batch.valid, batch.rand_score, batch.all_full)
        self.intervals.update(seq_max, batch.seq_ids, batch.interval_score, acts)
        if self.glu is not None:
            self.glu.update(acts, batch.gate, batch.up, batch.seq_ids, batch.valid, batch.all_full)

    def state(self) -> dict:
        state = self.acc.state()
        state["interval"] = self.intervals.state()
        if self.glu is not None:
            state["glu"] = self.glu.state()
        return state

    def load(self, state: dict) -> None:
        self.acc.load(state)
        self.intervals.load(state["interval"])
        if self.glu is not None:
            self.glu.load(state["glu"])

    def table(self):
        return data.state_to_table(
            self.state(), self.run.top_k, self.run.n_random, self.run.seq_lengths, self.run.seq_len
        )
