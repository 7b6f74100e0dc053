"""Neuroscope's part of `sitegen verify` (hook `Service.verifier`): its top, bottom and random
traces, top-k claims, statistics and random sample, against the model rerun on the store's
stored token ids. sitegen/compute/verify.py runs the one forward pass and hands every checked
layer's activations to the verifier; nothing here sees the model (and no torch).

What is checked, per neuron (m = the neuron's largest |activation| over the counted tokens of the
corpus, i.e. max(|stored max|, |stored min|), at least MIN_SCALE; `rtol` the relative tolerance):

- activations: every stored value of its top, bottom, random and interval-example traces (BOS
  included) against the recomputed one; error = max |stored - recomputed| / m.
- examples across the activation range (where the store has them): each example's recomputed
  maximum lies in its group's interval (within rtol*m).
- top-k (and bottom-k): each stored top sequence's recomputed maximum over its counted positions
  equals the stored maximum, and the recomputed maxima keep the stored order (each <= the one
  before + rtol*m); no other sequence that was run beats the stored k-th maximum by more than
  rtol*m. Only sequences that were run can be checked: with every processed sequence stored and
  run, that is the whole top-k claim; otherwise the report says how many sequences it covered.
- statistics (count, mean, std, min, max, fraction > 0), recomputed in float64 from the
  activations of every counted token, only when every processed sequence is stored and run (a
  small store); otherwise the report says why not. Mean, std, min and max must agree within
  rtol*m (mean and variance also within the rounding of the stored fixed-point sums); the stored positive count must lie between the recomputed counts of values above
  +rtol*m and above -rtol*m (values that close to zero may change sign with float noise).
- the random sample (when every processed sequence is stored): the sequences with the smallest
  random_key(seed, seq_id), as compute chooses them.

The work is per layer: a LayerCheck needs only its layer's table, the stored token ids and that
layer's activations, so layers can be checked on different machines and their reports joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sitegen.corpus_keys import random_key
from sitegen.errors import StoreError
from sitegen.services.base import Verification, VerifyRun
from sitegen.services.neuroscope import stats as ns_stats

NAME = "neuroscope"
MIN_SCALE = 1e-6  # the smallest neuron range errors are measured against


@dataclass
class NeuronResult:
    layer: int
    neuron: int
    max_rel_error: float
    top_order: bool
    top_maxima: bool
    top_unbeaten: bool
    bottom_order: bool
    bottom_minima: bool
    bottom_unbeaten: bool
    stats: dict | None  # stored vs recomputed, None when not checkable
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LayerReport:
    layer: int
    neurons: list[NeuronResult]
    sequences_run: int
    notes: list[str] = field(default_factory=list)


class LayerCheck:
    """Everything verify checks for one layer's sampled neurons, fed batch by batch."""

    COLUMNS = [
        "neuron",
        "top_seq",
        "top_max",
        "top_acts",
        "bottom_seq",
        "bottom_min",
        "bottom_acts",
        "random_seq",
        "random_acts",
        "count",
        "mean",
        "std",
        "min",
        "max",
        "n_pos",
    ]
    INTERVAL_COLUMNS = ["interval_top", "interval_group", "interval_seq", "interval_acts"]

    def __init__(
        self,
        layer: int,
        neurons: list[int],
        table: dict[str, list],
        first_valid: int,
        top_k: int,
        with_stats: bool,
        rtol: float,
    ):
        self.layer, self.neurons, self.fv, self.top_k, self.with_stats, self.rtol = (
            layer,
            neurons,
            first_valid,
            top_k,
            with_stats,
            rtol,
        )
        k = len(neurons)
        self.rows = table  # column -> one value per sampled neuron, in the order of `neurons`
        self.kinds = ("top", "bottom", "random") + (("interval",) if "interval_seq" in table else ())
        if list(table["neuron"]) != list(neurons):
            raise StoreError(
                f"neuroscope/layer={layer}/data.parquet: rows are not one per neuron in order; recompute the store"
            )
        vmax, vmin = np.array(self.rows["max"], np.float64), np.array(self.rows["min"], np.float64)
        # m per neuron; the floor keeps a dead neuron (all zeros) from turning float noise into a huge relative error
        self.scale = np.maximum(np.maximum(np.abs(vmax), np.abs(vmin)), MIN_SCALE)
        # Which (neuron column, kind, rank) needs which sequence's recomputed trace.
        self.needs: dict[int, list[tuple[int, str, int]]] = {}
        for j in range(k):
            for kind in self.kinds:
                for rank, s in enumerate(self.rows[f"{kind}_seq"][j]):
                    self.needs.setdefault(int(s), []).append((j, kind, rank))
        self.recomputed: dict[tuple[int, str, int], np.ndarray] = {}
        self.top_sets = [set(map(int, s)) for s in self.rows["top_seq"]]
        self.bottom_sets = [set(map(int, s)) for s in self.rows["bottom_seq"]]
        # The k-th stored max (min) each other sequence must not beat; a list shorter than top_k
        # claims to hold every sequence, so any other sequence beats it.
        self.kth_top = np.array([m[-1] if len(m) >= top_k else -np.inf for m in self.rows["top_max"]], np.float64)
        self.kth_bottom = np.array([m[-1] if len(m) >= top_k else np.inf for m in self.rows["bottom_min"]], np.float64)
        self.beaten_top = np.full(k, -np.inf)  # the largest excess over the k-th, among other sequences run
        self.beaten_bottom = np.full(k, -np.inf)
        self.beaten_by: dict[tuple[str, int], int] = {}
        self.seqs_run = 0
        self.count = 0
        self.sum = np.zeros(k)
        self.sumsq = np.zeros(k)
        self.vmin = np.full(k, np.inf)
        self.vmax = np.full(k, -np.inf)
        self.pos_hi = np.zeros(k, np.int64)  # values > +rtol*m: positive whatever the noise
        self.pos_lo = np.zeros(k, np.int64)  # values > -rtol*m: possibly positive

    def update(self, acts: np.ndarray, seq_ids: list[int], lengths: list[int]) -> None:
        """acts (rows, seq_len, k) float32: this layer's activations of the sampled neurons."""
        fv = self.fv
        for row, (sid, n_tok) in enumerate(zip(seq_ids, lengths)):
            trace = acts[row, :n_tok]  # (T, k)
            for j, kind, rank in self.needs.get(sid, ()):
                self.recomputed[(j, kind, rank)] = trace[:, j].astype(np.float32)
            counted = trace[fv:].astype(np.float64)
            if counted.shape[0] == 0:
                continue
            self.seqs_run += 1
            hi, lo = counted.max(0), counted.min(0)
            for j in np.nonzero(hi - self.kth_top > self.beaten_top)[0]:
                if sid not in self.top_sets[j]:
                    self.beaten_top[j] = hi[j] - self.kth_top[j]
                    self.beaten_by[("top", int(j))] = sid
            for j in np.nonzero(self.kth_bottom - lo > self.beaten_bottom)[0]:
                if sid not in self.bottom_sets[j]:
                    self.beaten_bottom[j] = self.kth_bottom[j] - lo[j]
                    self.beaten_by[("bottom", int(j))] = sid
            if self.with_stats:
                self.count += counted.shape[0]
                self.sum += counted.sum(0)
                self.sumsq += np.square(counted).sum(0)
                np.minimum(self.vmin, lo, out=self.vmin)
                np.maximum(self.vmax, hi, out=self.vmax)
                band = self.rtol * self.scale
                self.pos_hi += (counted > band).sum(0)
                self.pos_lo += (counted > -band).sum(0)

    def finish(self) -> list[NeuronResult]:
        rtol = self.rtol
        out = []
        for j, n in enumerate(self.neurons):
            m, tol = self.scale[j], rtol * self.scale[j]
            problems: list[str] = []
            err, worst = 0.0, None
            extremes: dict[str, list[float]] = {"top": [], "bottom": [], "interval": []}
            for kind in self.kinds:
                for rank, (sid, stored) in enumerate(zip(self.rows[f"{kind}_seq"][j], self.rows[f"{kind}_acts"][j])):
                    rec = self.recomputed.get((j, kind, rank))
                    if rec is None:
                        problems.append(f"{kind} sequence {sid} was not run (missing from sequences.parquet?)")
                        continue
                    stored = np.asarray(stored, np.float64)
                    if len(stored) != len(rec):
                        problems.append(f"{kind} sequence {sid}: {len(stored)} stored values for {len(rec)} tokens")
                        continue
                    diff = np.abs(stored - rec) / m
                    p = int(np.argmax(diff))
                    if diff[p] > err:
                        err, worst = float(diff[p]), (kind, rank, sid, p, stored[p], float(rec[p]))
                    if kind != "random" and len(rec) > self.fv:
                        extremes[kind].append(float(rec[self.fv :].min() if kind == "bottom" else rec[self.fv :].max()))
            if err > rtol and worst:
                kind, rank, sid, p, a, b = worst
                problems.append(
                    f"activations differ by {err:.3g} of the neuron's range (> {rtol:g}): {kind} #{rank + 1} (sequence {sid}) "
                    f"position {p}: stored {a:.6g}, recomputed {b:.6g}"
                )
            if "interval" in self.kinds:
                self._check_intervals(j, extremes["interval"], tol, problems)
            top_maxima, top_order, top_unbeaten = self._check_extremes(j, "top", extremes["top"], tol, problems)
            bottom_minima, bottom_order, bottom_unbeaten = self._check_extremes(
                j, "bottom", extremes["bottom"], tol, problems
            )
            stats = self._stats(j, tol, problems) if self.with_stats else None
            out.append(
                NeuronResult(
                    self.layer,
                    n,
                    err,
                    top_order,
                    top_maxima,
                    top_unbeaten,
                    bottom_order,
                    bottom_minima,
                    bottom_unbeaten,
                    stats,
                    problems,
                )
            )
        return out

    def _check_intervals(self, j: int, maxima: list[float], tol: float, problems: list[str]) -> None:
        """Each interval example's recomputed maximum lies in its group's interval (the lowest
        group: above 0, below its upper edge), within tol."""
        top, groups = self.rows["interval_top"][j], ns_stats.INTERVAL_GROUPS + 1
        for g, sid, peak in zip(self.rows["interval_group"][j], self.rows["interval_seq"][j], maxima):
            hi = ns_stats.interval_edge(top + 1 - g)
            lo = ns_stats.interval_edge(top - g) if g < groups - 1 else 0.0
            if not (lo - tol <= peak < hi + tol and peak > -tol):
                problems.append(
                    f"interval example (sequence {sid}) has its maximum {peak:.6g} outside its interval [{lo:.6g}, {hi:.6g})"
                )

    def _check_extremes(
        self, j: int, kind: str, recomputed: list[float], tol: float, problems: list[str]
    ) -> tuple[bool, bool, bool]:
        """One side's checks (top: maxima in descending order; bottom: minima ascending): the stored
        extremes recomputed, their order, and no other rerun sequence past the k-th. Appends a line
        per failed check; returns (extremes, order, unbeaten)."""
        top = kind == "top"
        stored = np.asarray(self.rows["top_max" if top else "bottom_min"][j], np.float64)
        rec = np.asarray(recomputed)
        beaten = (self.beaten_top if top else self.beaten_bottom)[j]
        extremes = len(rec) == len(stored) and bool(np.all(np.abs(rec - stored) <= tol))
        order = bool(np.all((np.diff(rec) if top else -np.diff(rec)) <= tol))
        unbeaten = not beaten > tol
        if not extremes:
            problems.append(f"stored {kind} {'maxima' if top else 'minima'} {_fmt(stored)} but recomputed {_fmt(rec)}")
        if not order:
            problems.append(f"{kind} sequences out of order once recomputed: {_fmt(rec)}")
        if not unbeaten:
            problems.append(
                f"sequence {self.beaten_by[(kind, j)]} is not in the {kind} {self.top_k} but "
                f"{'beats its last one' if top else 'goes below its last one'} by {beaten:.6g}"
            )
        return extremes, order, unbeaten

    def _stats(self, j: int, tol: float, problems: list[str]) -> dict:
        c = self.count
        mean = self.sum[j] / max(c, 1)
        std = float(np.sqrt(max(self.sumsq[j] / max(c, 1) - mean * mean, 0.0)))
        stored = {k: float(self.rows[k][j]) for k in ("mean", "std", "min", "max")} | {
            "count": int(self.rows["count"][j]),
            "n_pos": int(self.rows["n_pos"][j]),
        }
        rec = {
            "mean": float(mean),
            "std": std,
            "min": float(self.vmin[j]),
            "max": float(self.vmax[j]),
            "count": c,
            "n_pos": [int(self.pos_hi[j]), int(self.pos_lo[j])],
        }
        if stored["count"] != c:
            problems.append(f"stats: {stored['count']} counted tokens stored, {c} recomputed")
        # The stored sums are fixed point (values on a 2^-SUM_SHIFT grid, squares on 2^-SQ_SHIFT), so
        # the stored mean and variance carry that rounding too: allowed on top of rtol*m.
        q_mean = 2.0 ** -(ns_stats.SUM_SHIFT + 1)
        q_var = 2.0 ** -(ns_stats.SQ_SHIFT + 1) + 2 * abs(rec["mean"]) * q_mean
        for key in ("mean", "std", "min", "max"):
            allowed = tol + (q_mean if key == "mean" else 0.0)
            if key == "std":  # compared as variances, where the rounding bound is additive
                bad = abs(stored["std"] ** 2 - std**2) > 2 * tol * max(stored["std"], std) + tol * tol + q_var
            else:
                bad = abs(stored[key] - rec[key]) > allowed
            if bad:
                problems.append(f"stats: {key} stored {stored[key]:.6g}, recomputed {rec[key]:.6g}")
        if not self.pos_hi[j] <= stored["n_pos"] <= self.pos_lo[j]:
            problems.append(
                f"stats: fraction > 0 stored {stored['n_pos'] / max(c, 1):.6g}, recomputed {self.pos_hi[j] / max(c, 1):.6g}"
            )
        error = max(abs(stored[k] - rec[k]) for k in ("mean", "std", "min", "max")) / self.scale[j]
        return {"stored": stored, "recomputed": rec, "error": float(error)}


def _fmt(values) -> str:
    values = list(values)
    shown = ", ".join(f"{v:.5g}" for v in values[:6])
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


def _ranks_ok(r: NeuronResult) -> bool:
    return all((r.top_order, r.top_maxima, r.top_unbeaten, r.bottom_order, r.bottom_minima, r.bottom_unbeaten))


class NeuroscopeVerifier:
    """The `Verifier` of neuroscope's tables: one LayerCheck per selected layer, fed by the
    driver's forward pass, and the report lines joining them."""

    def __init__(self, store, run: VerifyRun):
        m = store.manifest
        fv, top_k = int(m["config"]["first_valid_position"]), int(m["config"]["top_k"])
        self.run = run
        self.processed = int(m["processed"]["sequences"])
        self.with_stats = run.full and run.every_stored  # statistics need the whole corpus pass rerun
        self.checks: dict[int, LayerCheck] = {}
        for layer, neurons in run.selection.items():
            names = pq.read_schema(store.layer_path(NAME, layer)).names
            columns = LayerCheck.COLUMNS + [c for c in LayerCheck.INTERVAL_COLUMNS if c in names]
            table = store.read_layer(NAME, layer, columns=columns)
            rows = table.take(pa.array(neurons, pa.int64())).to_pydict()  # only the sampled rows become Python objects
            self.checks[layer] = LayerCheck(layer, neurons, rows, fv, top_k, self.with_stats, run.rtol)
        self.problems = (
            _check_random_sample(store, run.seq_tokens, int(m["config"]["seed"]), int(m["config"]["n_random"]))
            if self.with_stats
            else []
        )
        self.ran: set[int] = set()  # the sequences run (every one comes through every checked layer)

    def sequences(self) -> set[int]:
        return {s for c in self.checks.values() for s in c.needs}

    def update(self, layer: int, acts, seq_ids: list[int], lengths: list[int]) -> None:
        self.ran.update(seq_ids)
        self.checks[layer].update(acts, seq_ids, lengths)

    def finish(self) -> Verification:
        layers = [LayerReport(layer, c.finish(), c.seqs_run) for layer, c in sorted(self.checks.items())]
        neurons = [r for lr in layers for r in lr.neurons]
        failed = [r for r in neurons if not r.ok]
        max_rel_error = max((r.max_rel_error for r in neurons), default=0.0)
        # the largest |stored - recomputed| mean, std, min or max, as a fraction of the neuron's range
        max_stats_error = max((r.stats["error"] for r in neurons if r.stats), default=0.0)
        lines = []
        for lr in layers:
            rs = lr.neurons
            bad = [r for r in rs if not r.ok]
            stats = "checked" if rs and rs[0].stats is not None else "not checked"
            lines.append(
                f"layer {lr.layer}: {len(rs)} neurons, {lr.sequences_run} sequences run, max relative error "
                f"{max((r.max_rel_error for r in rs), default=0):.3g}, top/bottom-k {'hold' if all(_ranks_ok(r) for r in rs) else 'BROKEN'}, "
                f"stats {stats}, {len(bad)} failed"
            )
            lines += [f"  note: {n}" for n in lr.notes]
            for r in bad:
                lines += [f"  FAIL layer {r.layer} neuron {r.neuron}: {p}" for p in r.problems]
        return Verification(
            summary=f"{len(neurons)} neurons checked, {len(failed)} failed, max relative error {max_rel_error:.3g}, "
            f"stats within {max_stats_error:.3g}",
            lines=lines,
            failed=[(r.layer, r.neuron) for r in failed],
            notes=_coverage_notes(
                len(self.run.seq_tokens), self.processed, len(self.ran), self.run.full, self.with_stats
            ),
            problems=self.problems,
            data={
                "max_rel_error": max_rel_error,
                "max_stats_error": max_stats_error,
                "layers": [
                    {
                        "layer": lr.layer,
                        "sequences_run": lr.sequences_run,
                        "notes": lr.notes,
                        "neurons": [{k: v for k, v in r.__dict__.items()} for r in lr.neurons],
                    }
                    for lr in layers
                ],
            },
        )


def _coverage_notes(stored: int, processed: int, run: int, full: bool, with_stats: bool) -> list[str]:
    """What this run could not check, in words for the report."""
    notes = []
    if not with_stats:
        notes.append(
            "statistics and the random sample not checked: "
            + (
                f"the store keeps {stored} of the {processed} sequences it processed (only the top, bottom and random ones), so mean, "
                "std and fraction > 0 cannot be recomputed without the corpus"
                if stored != processed
                else f"only the sampled neurons' sequences were run (rerun with --full to run all {stored} stored sequences)"
            )
        )
    if not full:
        notes.append(
            f"top/bottom-k: checked against the {run} sequences that were run (the sampled neurons' own); another stored "
            "or unstored sequence could still beat the k-th without this run seeing it"
        )
    elif stored != processed:
        notes.append(
            f"top/bottom-k: checked against every stored sequence ({stored}), not every processed one ({processed}): "
            "an unstored sequence could still beat the k-th"
        )
    return notes


def _check_random_sample(store, seq_tokens, seed: int, n_random: int) -> list[str]:
    """With every processed sequence stored, the random sample must be the n_random stored
    sequences with the smallest random_key(seed, seq_id) (ties by lower id), as compute picks them."""
    expected = sorted(seq_tokens, key=lambda s: (np.float32(random_key(seed, s)), s))[
        :n_random
    ]  # compute ranks float32 keys
    stored = store.read_layer(NAME, 0, columns=["random_seq"]).column("random_seq")[0].as_py()
    if stored != expected:
        return [f"the random sample is sequences {stored}, but the smallest random keys are those of {expected}"]
    return []
