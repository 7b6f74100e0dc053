"""`sitegen verify`: rerun the model on a store's stored token ids and check what the store claims.

Reads top to bottom:

    open the store -> choose neurons (a seeded sample per layer, or all) and the sequences to run
    (every stored sequence for a small store, else the sampled neurons' own sequences) -> load the
    store's model, compare its fingerprints with the manifest's -> one forward pass per batch that
    stops after the last checked layer, each layer's activations handed to that layer's LayerCheck
    -> each LayerCheck compares and reports per neuron -> one report, failures named by layer:neuron.

The work is per layer: a LayerCheck needs only its layer's table, the stored token ids and that
layer's activations, so layers can be checked on different machines and their reports joined.

What is checked, per neuron (m = the neuron's largest |activation| over the counted tokens of the
corpus, i.e. max(|stored max|, |stored min|), at least MIN_SCALE; `rtol` the relative tolerance):

- activations: every stored value of its top, bottom and random traces (BOS included) against
  the recomputed one; error = max |stored - recomputed| / m.
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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from sitegen.corpus_keys import random_key
from sitegen.errors import ConfigError, SitegenError, StoreError
from sitegen.services.neuroscope import stats as ns_stats
from sitegen.store import Store

# Measured on 2 CPU cores (README, "Verify a store"): rerunning in other batches (sizes 1, 3, 5, 7 against
# compute's 4 and 32) and thread counts (1 against 2) reproduced every stored activation bit for bit,
# on the tiny test model and on SmolLM2-135M; the float64 statistics differ from the stored
# fixed-point ones by at most 8.2e-6 of a neuron's range. 1e-4 leaves room for other CPUs and
# kernels (not measured) and still catches a 0.1% change of a neuron's peak.
DEFAULT_RTOL = 1e-4
MIN_SCALE = 1e-6  # the smallest neuron range errors are measured against
FULL_RUN_TOKENS = 50_000  # stores with at most this many stored tokens are rerun over every stored sequence
DEFAULT_NEURONS = "8"


class VerificationFailed(SitegenError):
    """The store disagrees with the model beyond the tolerance (the report names where)."""

    stage = "verify"
    exit_code = 1


@dataclass
class VerifyConfig:
    store: Path
    model: str | None = None  # None: the manifest's model source
    neurons: str = DEFAULT_NEURONS
    rtol: float = DEFAULT_RTOL
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None
    full: bool | None = None  # None: every stored sequence when the store is small (FULL_RUN_TOKENS)


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


def parse_neurons(spec: str, n_layers: int, d_mlp: int, seed: int) -> dict[int, list[int]]:
    """--neurons: 'all'; N (N neurons per layer, a random sample seeded by --seed: verification
    should not favour the neurons a researcher opens first); or LAYER:NEURON pairs '3:17,5:2'."""
    spec = spec.strip()
    if spec == "all":
        return {layer: list(range(d_mlp)) for layer in range(n_layers)}
    if ":" in spec:
        out: dict[int, set[int]] = {}
        for part in spec.split(","):
            try:
                layer, n = (int(x) for x in part.split(":"))
            except ValueError:
                raise ConfigError(f"--neurons {spec}: write LAYER:NEURON pairs, e.g. --neurons 3:17,5:2") from None
            if not (0 <= layer < n_layers and 0 <= n < d_mlp):
                raise ConfigError(f"--neurons {spec}: {layer}:{n} is not a neuron of this model ({n_layers} layers x {d_mlp})")
            out.setdefault(layer, set()).add(n)
        return {k: sorted(v) for k, v in sorted(out.items())}
    try:
        per_layer = int(spec)
    except ValueError:
        raise ConfigError(f"--neurons {spec}: use N (neurons per layer), 'all' or LAYER:NEURON pairs, e.g. --neurons 8") from None
    if per_layer < 1:
        raise ConfigError(f"--neurons {spec}: must be at least 1 neuron per layer")
    return {layer: sorted(np.random.default_rng([seed, layer]).choice(d_mlp, min(per_layer, d_mlp), replace=False).tolist())
            for layer in range(n_layers)}


class LayerCheck:
    """Everything verify checks for one layer's sampled neurons, fed batch by batch."""

    COLUMNS = ["neuron", "top_seq", "top_max", "top_acts", "bottom_seq", "bottom_min", "bottom_acts", "random_seq", "random_acts",
               "count", "mean", "std", "min", "max", "n_pos"]

    def __init__(self, layer: int, neurons: list[int], table: dict[str, list], first_valid: int, top_k: int, with_stats: bool, rtol: float = DEFAULT_RTOL):
        self.layer, self.neurons, self.fv, self.top_k, self.with_stats, self.rtol = layer, neurons, first_valid, top_k, with_stats, rtol
        k = len(neurons)
        self.rows = table  # column -> one value per sampled neuron, in the order of `neurons`
        if list(table["neuron"]) != list(neurons):
            raise StoreError(f"neuroscope/layer={layer}/data.parquet: rows are not one per neuron in order; recompute the store")
        vmax, vmin = np.array(self.rows["max"], np.float64), np.array(self.rows["min"], np.float64)
        # m per neuron; the floor keeps a dead neuron (all zeros) from turning float noise into a huge relative error
        self.scale = np.maximum(np.maximum(np.abs(vmax), np.abs(vmin)), MIN_SCALE)
        # Which (neuron column, kind, rank) needs which sequence's recomputed trace.
        self.needs: dict[int, list[tuple[int, str, int]]] = {}
        for j in range(k):
            for kind in ("top", "bottom", "random"):
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
            extremes: dict[str, list[float]] = {"top": [], "bottom": []}
            for kind in ("top", "bottom", "random"):
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
                        extremes[kind].append(float(rec[self.fv:].max() if kind == "top" else rec[self.fv:].min()))
            if err > rtol and worst:
                kind, rank, sid, p, a, b = worst
                problems.append(f"activations differ by {err:.3g} of the neuron's range (> {rtol:g}): {kind} #{rank + 1} (sequence {sid}) "
                                f"position {p}: stored {a:.6g}, recomputed {b:.6g}")
            top_maxima, top_order, top_unbeaten = self._check_extremes(j, "top", extremes["top"], tol, problems)
            bottom_minima, bottom_order, bottom_unbeaten = self._check_extremes(j, "bottom", extremes["bottom"], tol, problems)
            stats = self._stats(j, tol, problems) if self.with_stats else None
            out.append(NeuronResult(self.layer, n, err, top_order, top_maxima, top_unbeaten, bottom_order, bottom_minima, bottom_unbeaten,
                                    stats, problems))
        return out

    def _check_extremes(self, j: int, kind: str, recomputed: list[float], tol: float, problems: list[str]) -> tuple[bool, bool, bool]:
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
            problems.append(f"sequence {self.beaten_by[(kind, j)]} is not in the {kind} {self.top_k} but "
                            f"{'beats its last one' if top else 'goes below its last one'} by {beaten:.6g}")
        return extremes, order, unbeaten

    def _stats(self, j: int, tol: float, problems: list[str]) -> dict:
        c = self.count
        mean = self.sum[j] / max(c, 1)
        std = float(np.sqrt(max(self.sumsq[j] / max(c, 1) - mean * mean, 0.0)))
        stored = {k: float(self.rows[k][j]) for k in ("mean", "std", "min", "max")} | {"count": int(self.rows["count"][j]),
                                                                                       "n_pos": int(self.rows["n_pos"][j])}
        rec = {"mean": float(mean), "std": std, "min": float(self.vmin[j]), "max": float(self.vmax[j]), "count": c,
               "n_pos": [int(self.pos_hi[j]), int(self.pos_lo[j])]}
        if stored["count"] != c:
            problems.append(f"stats: {stored['count']} counted tokens stored, {c} recomputed")
        # The stored sums are fixed point (values on a 2^-SUM_SHIFT grid, squares on 2^-SQ_SHIFT), so
        # the stored mean and variance carry that rounding too: allowed on top of rtol*m.
        q_mean = 2.0 ** -(ns_stats.SUM_SHIFT + 1)
        q_var = 2.0 ** -(ns_stats.SQ_SHIFT + 1) + 2 * abs(rec["mean"]) * q_mean
        for key in ("mean", "std", "min", "max"):
            allowed = tol + (q_mean if key == "mean" else 0.0)
            if key == "std":  # compared as variances, where the rounding bound is additive
                bad = abs(stored["std"] ** 2 - std ** 2) > 2 * tol * max(stored["std"], std) + tol * tol + q_var
            else:
                bad = abs(stored[key] - rec[key]) > allowed
            if bad:
                problems.append(f"stats: {key} stored {stored[key]:.6g}, recomputed {rec[key]:.6g}")
        if not self.pos_hi[j] <= stored["n_pos"] <= self.pos_lo[j]:
            problems.append(f"stats: fraction > 0 stored {stored['n_pos'] / max(c, 1):.6g}, recomputed {self.pos_hi[j] / max(c, 1):.6g}")
        error = max(abs(stored[k] - rec[k]) for k in ("mean", "std", "min", "max")) / self.scale[j]
        return {"stored": stored, "recomputed": rec, "error": float(error)}


def _fmt(values) -> str:
    values = list(values)
    shown = ", ".join(f"{v:.5g}" for v in values[:6])
    return f"[{shown}{', ...' if len(values) > 6 else ''}]"


@dataclass
class VerifyReport:
    store: Path
    model: dict
    rtol: float
    layers: list[LayerReport]
    notes: list[str]
    problems: list[str]  # store-level (fingerprints)
    seconds: float  # everything, model loading included
    check_seconds: float  # the forward passes and the comparisons: what grows with the neurons checked
    tokens_run: int

    @property
    def neurons(self) -> list[NeuronResult]:
        return [r for lr in self.layers for r in lr.neurons]

    @property
    def failed(self) -> list[NeuronResult]:
        return [r for r in self.neurons if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failed

    def max_stats_error(self) -> float:
        """The largest |stored - recomputed| mean, std, min or max, as a fraction of the neuron's range."""
        return max((r.stats["error"] for r in self.neurons if r.stats), default=0.0)

    def lines(self) -> list[str]:
        """The human-readable report: a header, one line per layer, one per failing neuron, a total."""
        out = [f"verify {self.store}: model {self.model.get('name')} ({self.model.get('source')}), tolerance {self.rtol:g} of each "
               "neuron's largest |activation|"]
        out += [f"note: {n}" for n in self.notes]
        out += [f"FAIL: {p}" for p in self.problems]
        for lr in self.layers:
            rs = lr.neurons
            bad = [r for r in rs if not r.ok]
            stats = "checked" if rs and rs[0].stats is not None else "not checked"
            out.append(f"layer {lr.layer}: {len(rs)} neurons, {lr.sequences_run} sequences run, max relative error "
                       f"{max((r.max_rel_error for r in rs), default=0):.3g}, top/bottom-k {'hold' if all(_ranks_ok(r) for r in rs) else 'BROKEN'}, "
                       f"stats {stats}, {len(bad)} failed")
            out += [f"  note: {n}" for n in lr.notes]
            for r in bad:
                out += [f"  FAIL layer {r.layer} neuron {r.neuron}: {p}" for p in r.problems]
        n = len(self.neurons)
        out.append(f"{'OK' if self.ok else 'FAILED'}: {n} neurons checked, {len(self.failed)} failed, max relative error "
                   f"{max((r.max_rel_error for r in self.neurons), default=0):.3g}, stats within {self.max_stats_error():.3g}; "
                   f"{self.tokens_run} tokens run; {self.seconds:.1f} s in all, {self.check_seconds:.1f} s checking "
                   f"({self.check_seconds / max(n, 1) * 1000:.1f} ms per neuron)")
        return out

    def as_dict(self) -> dict:
        return {
            "store": str(self.store), "model": self.model, "rtol": self.rtol, "ok": self.ok, "notes": self.notes, "problems": self.problems,
            "seconds": round(self.seconds, 3), "check_seconds": round(self.check_seconds, 3), "tokens_run": self.tokens_run,
            "max_rel_error": max((r.max_rel_error for r in self.neurons), default=0.0), "max_stats_error": self.max_stats_error(),
            "layers": [{"layer": lr.layer, "sequences_run": lr.sequences_run, "notes": lr.notes,
                        "neurons": [{k: v for k, v in r.__dict__.items()} for r in lr.neurons]} for lr in self.layers],
        }


def _ranks_ok(r: NeuronResult) -> bool:
    return all((r.top_order, r.top_maxima, r.top_unbeaten, r.bottom_order, r.bottom_minima, r.bottom_unbeaten))


def run_verify(cfg: VerifyConfig, log: Callable[[str], None] = lambda m: None) -> VerifyReport:
    """Check a store against its model; returns the report (the CLI prints it and exits non-zero
    when report.ok is false)."""
    if not cfg.rtol > 0:
        raise ConfigError(f"--rtol {cfg.rtol}: must be a positive fraction, e.g. --rtol {DEFAULT_RTOL:g}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be at least 1 (or leave it out for automatic)")
    started = time.perf_counter()
    store = Store.open(cfg.store)
    m = store.manifest
    if "neuroscope" not in m.get("services", []):
        raise ConfigError(f"{cfg.store}: the store has no neuroscope data to verify")
    n_layers, d_mlp = int(m["model"]["num_layers"]), int(m["model"]["layer_size"])
    seq_len, fv, top_k = int(m["config"]["seq_len"]), int(m["config"]["first_valid_position"]), int(m["config"]["top_k"])
    selection = parse_neurons(cfg.neurons, n_layers, d_mlp, cfg.seed)
    seq_tokens = store.sequence_tokens()
    stored_tokens = sum(len(t) for t in seq_tokens.values())
    full = cfg.full if cfg.full is not None else stored_tokens <= FULL_RUN_TOKENS
    every_processed_stored = len(seq_tokens) == int(m["processed"]["sequences"])
    with_stats = full and every_processed_stored
    checks: dict[int, LayerCheck] = {}
    for layer, neurons in selection.items():
        table = store.read_layer("neuroscope", layer, columns=LayerCheck.COLUMNS)
        rows = table.take(pa.array(neurons, pa.int64())).to_pydict()  # only the sampled rows become Python objects
        checks[layer] = LayerCheck(layer, neurons, rows, fv, top_k, with_stats, cfg.rtol)
    wanted = sorted(seq_tokens) if full else sorted({s for c in checks.values() for s in c.needs})
    missing = [s for s in wanted if s not in seq_tokens]
    run_ids = [s for s in wanted if s in seq_tokens]
    notes = _coverage_notes(len(seq_tokens), int(m["processed"]["sequences"]), len(run_ids), full, with_stats)

    from sitegen.compute.models import load_model, resolve_device, weights_fingerprint
    from sitegen.compute.runner import auto_batch_size

    device = resolve_device(cfg.device)
    source = cfg.model or m["model"]["source"]
    log(f"loading model {source}")
    model = load_model(source, device=device, name=m["model"]["name"])
    if (model.n_layers, model.d_mlp) != (n_layers, d_mlp):
        raise ConfigError(f"--model {source}: {model.n_layers} layers x {model.d_mlp} neurons, but the store {cfg.store} holds "
                          f"{n_layers} x {d_mlp}; pass the model the store was computed with")
    problems = []
    if model.fingerprint != m["model"].get("fingerprint"):
        problems.append(f"model fingerprint {model.fingerprint} differs from the store's {m['model'].get('fingerprint')}: "
                        "this is not the model the store was computed with")
    weights = weights_fingerprint(model)
    if m["model"].get("weights_sha256") is None:
        notes.append("the store records no weights hash (computed before sitegen recorded one); the file fingerprint was compared")
    elif weights != m["model"]["weights_sha256"]:
        problems.append(f"weights hash {weights} differs from the store's {m['model']['weights_sha256']}")
    if with_stats:
        problems += _check_random_sample(store, seq_tokens, int(m["config"]["seed"]), int(m["config"]["n_random"]))
    if missing:
        problems.append(f"{len(missing)} referenced sequences are missing from sequences.parquet (e.g. {missing[:3]})")
    batch_size = cfg.batch_size or auto_batch_size(device, seq_len)
    loaded = time.perf_counter()
    log(f"running {len(run_ids)} sequences through layers {min(checks)}..{max(checks)} ({len(checks)} layers checked)")
    tokens_run = recompute(model, [(s, seq_tokens[s]) for s in run_ids], checks, seq_len, batch_size)
    layers = [LayerReport(layer, c.finish(), c.seqs_run) for layer, c in sorted(checks.items())]
    model_info = {"name": m["model"]["name"], "source": source, "fingerprint": model.fingerprint, "weights_sha256": weights}
    now = time.perf_counter()
    return VerifyReport(cfg.store, model_info, cfg.rtol, layers, notes, problems, now - started, now - loaded, tokens_run)


def _coverage_notes(stored: int, processed: int, run: int, full: bool, with_stats: bool) -> list[str]:
    """What this run could not check, in words for the report."""
    notes = []
    if not with_stats:
        notes.append("statistics and the random sample not checked: " + (
            f"the store keeps {stored} of the {processed} sequences it processed (only the top, bottom and random ones), so mean, "
            "std and fraction > 0 cannot be recomputed without the corpus" if stored != processed else
            f"only the sampled neurons' sequences were run (rerun with --full to run all {stored} stored sequences)"))
    if not full:
        notes.append(f"top/bottom-k: checked against the {run} sequences that were run (the sampled neurons' own); another stored "
                     "or unstored sequence could still beat the k-th without this run seeing it")
    elif stored != processed:
        notes.append(f"top/bottom-k: checked against every stored sequence ({stored}), not every processed one ({processed}): "
                     "an unstored sequence could still beat the k-th")
    return notes


def _check_random_sample(store: Store, seq_tokens: dict, seed: int, n_random: int) -> list[str]:
    """With every processed sequence stored, the random sample must be the n_random stored
    sequences with the smallest random_key(seed, seq_id) (ties by lower id), as compute picks them."""
    expected = sorted(seq_tokens, key=lambda s: (np.float32(random_key(seed, s)), s))[:n_random]  # compute ranks float32 keys
    stored = store.read_layer("neuroscope", 0, columns=["random_seq"]).column("random_seq")[0].as_py()
    if stored != expected:
        return [f"the random sample is sequences {stored}, but the smallest random keys are those of {expected}"]
    return []


def recompute(model, sequences: list[tuple[int, np.ndarray]], checks: dict[int, LayerCheck], seq_len: int, batch_size: int) -> int:
    """Run the sequences in fixed-shape right-padded batches (as compute does), stopping after the
    last checked layer, and hand each checked layer's activations of its sampled neurons to its
    LayerCheck. Returns the model-input tokens run (padding included)."""
    import torch

    bos = model.bos
    pad_id = int(getattr(model.tokenizer, "pad_token_id", None) or bos or 0)
    columns = {layer: torch.tensor(c.neurons, dtype=torch.long) for layer, c in checks.items()}
    tokens_run = 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        ids = np.full((batch_size, seq_len), pad_id, dtype=np.int64)
        for row, (_, toks) in enumerate(batch):
            ids[row, :len(toks)] = toks
        seq_ids, lengths = [s for s, _ in batch], [len(t) for _, t in batch]

        def check(layer: int, acts) -> None:
            chosen = acts[:len(batch)].index_select(2, columns[layer].to(acts.device)).float().cpu().numpy()
            checks[layer].update(chosen, seq_ids, lengths)

        model.run_mlp_activations(ids, checks, check)
        tokens_run += ids.size
    return tokens_run
