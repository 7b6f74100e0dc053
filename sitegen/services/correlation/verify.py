"""The correlation service's part of `sitegen verify` (hook `Service.verifier`; no torch, no
model). The sums are over every counted token of the corpus pass, so a rerun of sampled sequences
cannot recompute them; what can be checked is checked exactly, per checked layer:

- always, every neuron of the layer (integer identities the sums of integers q satisfy whatever
  the activations were):
  - the token count is the same in every row and equals neuroscope's `count` (the same counted
    positions), where the store has neuroscope's table;
  - the Gram matrix is symmetric;
  - parity: q^2 and q are both even or both odd, so the Gram diagonal G_nn and the sum s_n are;
  - bounds: 0 <= clamped <= N, |s| <= G_nn <= N * CLAMP^2, G_nn >= clamped * CLAMP^2 (a cut value
    is +-CLAMP), N G_nn >= s^2 (a variance is never negative);
  - against neuroscope's fixed-point sums of the same activations, for neurons with no cut value:
    |s * 2^14 - sum_fx| <= N * (2^13 + 1/2) (q * 2^-10 and sum_fx's 2^-24 grid each round x by at
    most half a step), and G_nn * 2^-20 within 2^-10 sqrt(N S) + N (2^-22 + 2^-47) + 2^-24 S of
    neuroscope's sum of squares S (q = x * 2^10 + e with |e| <= 1/2; neuroscope's float32 squares
    carry a relative 2^-24 and its low limb 2^-47);
- for the sampled neurons' rows: |r| <= 1 exactly, (N G_nj - s_n s_j)^2 <= (N G_nn - s_n^2)
  (N G_jj - s_j^2) in integers, against every neuron j of the layer; for a dictionary's latents
  also against every neuron of the model layer the dictionary reads at (their products, and that
  layer's sums in the model's store, over the same token count);
- with the whole corpus pass rerun (`run.full` on a store that keeps every processed sequence),
  the sampled neurons' sums recomputed from the rerun activations on the same grid: the token count
  exactly, and sums, cut counts and the Gram block of the sampled neurons within what activations
  agreeing to rtol * m allow (|dq| <= rtol m 2^10 + 1 per token, m the neuron's largest |activation|
  rerun): |ds_n| <= N E_n, |dG_ij| <= E_j A_i + E_i A_j + N E_i E_j with A = sum |q|. On the CPU
  the rerun activations are the stored ones bit for bit, and the difference is 0 (reported).
"""

from __future__ import annotations

import math

import numpy as np

from sitegen.services.base import Verification, VerifyRun
from sitegen.services.correlation.data import CLAMP, GRID_SHIFT, TABLE_SCHEMA, model_store, table_cross, table_sums

NAME = "correlation"
MIN_SCALE = 1e-6  # as neuroscope's verify: the smallest neuron range a tolerance is measured against
# neuroscope's low square limb is in units of 2^-(sq_shift + 30) (its stats.py); its other shifts
# are in its manifest record
NS_SQ_LO_SHIFT = 30
SHOWN = 10  # failing neurons listed per layer; the rest counted


class _Layer:
    """One checked layer: the stored sums, and what the rerun adds up for its sampled neurons."""

    def __init__(self, store, layer: int, neurons: list[int], first_valid: int):
        self.layer, self.neurons, self.fv = layer, neurons, first_valid
        table = store.read_layer(NAME, layer)
        self.token_column = table.sort_by("neuron").column("tokens").to_numpy()
        self.tokens, self.sums, self.clamped, self.gram = table_sums(table)
        self.neuroscope = None
        grid = store.manifest.get("stats") or {}
        # neuroscope's fixed-point grid, as its manifest record names it (a store that does not: sums not compared)
        self.ns_shifts = (grid.get("sum_shift"), grid.get("sq_shift"))
        if store.has_service("neuroscope"):
            # neuroscope's counts and fixed-point sums of the same activations (its columns, by name)
            t = store.read_layer("neuroscope", layer, columns=["neuron", "count", "sum_fx", "sumsq_fx", "sumsq_lo"])
            t = t.sort_by("neuron")
            self.neuroscope = {c: t.column(c).to_numpy() for c in ("count", "sum_fx", "sumsq_fx", "sumsq_lo")}
        # A dictionary's latents: their products with the neurons of the layer it reads at, and
        # those neurons' sums from the model's store (None where either is missing)
        self.cross = table_cross(table)
        self.base = None
        base = None if self.cross is None else model_store(store)
        if base is not None:
            base_layer = int(store.manifest["dictionary"]["layer"])
            base_tokens, base_sums, _, base_gram = table_sums(
                base.read_layer(NAME, base_layer, columns=TABLE_SCHEMA.names)
            )
            self.base = (base_layer, base_tokens, base_sums, np.diagonal(base_gram).copy())
        k = len(neurons)
        self.count = 0
        self.rsum = np.zeros(k, np.int64)
        self.rabs = np.zeros(k, np.int64)
        self.rgram = np.zeros((k, k), np.int64)
        self.rmax = np.zeros(k, np.float64)
        self.rx: list[np.ndarray] = []  # |x| of every counted token, per batch: the cut counts, once m is known

    def update(self, acts: np.ndarray, lengths: list[int]) -> None:
        positions = np.arange(acts.shape[1])
        valid = (positions[None, :] >= self.fv) & (positions[None, :] < np.asarray(lengths)[:, None])
        x = acts[valid].astype(np.float64)  # (tokens, k), as compute's batch.valid counts them
        if x.shape[0] == 0:
            return
        q = np.clip(np.rint(x * 2.0**GRID_SHIFT), -CLAMP, CLAMP).astype(np.int64)
        self.count += q.shape[0]
        self.rsum += q.sum(0)
        self.rabs += np.abs(q).sum(0)
        self.rgram += q.T @ q
        np.maximum(self.rmax, np.abs(x).max(0), out=self.rmax)
        self.rx.append(np.abs(x))

    def store_problems(self) -> dict[int, list[str]]:
        """{neuron: problems} of the integer identities, every neuron of the layer."""
        out: dict[int, list[str]] = {}
        add = lambda n, p: out.setdefault(int(n), []).append(p)
        n_tok, sums, clamped, gram = self.tokens, self.sums, self.clamped, self.gram
        for n in np.nonzero(self.token_column != n_tok)[0]:
            add(n, f"correlation: {self.token_column[n]} counted tokens stored, the layer's first row says {n_tok}")
        if self.neuroscope is not None:
            for n in np.nonzero(self.neuroscope["count"] != self.token_column)[0]:
                add(
                    n,
                    f"correlation: {self.token_column[n]} counted tokens, neuroscope counted {self.neuroscope['count'][n]}",
                )
        asym = gram != gram.T
        for n in np.nonzero(asym.any(1))[0]:
            j = int(np.argmax(asym[n]))
            add(
                n,
                f"correlation: the Gram matrix is not symmetric: entry ({n}, {j}) is {gram[n, j]}, ({j}, {n}) is {gram[j, n]}",
            )
        diag = np.diagonal(gram)
        for n in np.nonzero((diag - sums) % 2 != 0)[0]:
            add(
                n,
                f"correlation: sum of q^2 {diag[n]} and sum of q {sums[n]} differ in parity (integers q: they cannot)",
            )
        for n in range(len(sums)):
            g, s, c = int(diag[n]), int(sums[n]), int(clamped[n])
            if not (0 <= c <= n_tok and abs(s) <= g <= n_tok * CLAMP**2 and g >= c * CLAMP**2 and n_tok * g >= s * s):
                add(n, f"correlation: sums out of bounds: {n_tok} tokens, sum {s}, sum of squares {g}, {c} cut")
            elif self.neuroscope is not None and None not in self.ns_shifts and c == 0:
                problem = self._against_neuroscope(n, s, g)
                if problem:
                    add(n, problem)
        s_int, g_int = [int(v) for v in sums], [int(v) for v in diag]
        var = [n_tok * g - v * v for g, v in zip(g_int, s_int)]
        if self.base is not None:
            self._against_base(n_tok, s_int, var, add)
        for n in self.neurons:
            j = self._cauchy_schwarz(n, s_int, var)
            if j is not None:
                add(
                    n,
                    f"correlation: r with neuron {j} is beyond +-1 (the sums cannot come from one set of activations)",
                )
        return out

    def _against_base(self, n_tok: int, s: list[int], var: list[int], add) -> None:
        """The sampled latents' products with the model layer's neurons: the same token count and
        shape, and r within +-1 in integers against every neuron."""
        layer, tokens, sums, diag = self.base
        if tokens != n_tok or self.cross.shape[1] != len(sums):
            for n in self.neurons:
                add(
                    n,
                    f"correlation: the products with layer {layer}'s neurons cover {n_tok} tokens and "
                    f"{self.cross.shape[1]} neurons, the model's store {tokens} and {len(sums)}",
                )
            return
        bs = [int(v) for v in sums]
        bvar = [tokens * int(g) - v * v for g, v in zip(diag, bs)]
        for n in self.neurons:
            for j, c in enumerate(self.cross[n].tolist()):
                cov = n_tok * c - s[n] * bs[j]
                if cov * cov > var[n] * bvar[j]:
                    add(n, f"correlation: r with neuron {j} of layer {layer} is beyond +-1")
                    break

    def _against_neuroscope(self, n: int, s: int, g: int) -> str | None:
        ns, n_tok = self.neuroscope, self.tokens
        sum_shift, sq_shift = (int(v) for v in self.ns_shifts)
        sum_fx = int(ns["sum_fx"][n])
        shift = sum_shift - GRID_SHIFT
        # |q 2^shift - x 2^sum_shift| <= 2^(shift - 1) and |x 2^sum_shift - its rint| <= 1/2, per token
        if shift >= 0 and abs((s << shift) - sum_fx) * 2 > n_tok * ((1 << shift) + 1):
            return (
                f"correlation: sum {s * 2.0**-GRID_SHIFT:.6g} differs from neuroscope's {sum_fx * 2.0**-sum_shift:.6g} "
                f"by more than the grids' rounding over {n_tok} tokens"
            )
        squares = int(ns["sumsq_fx"][n]) * 2.0**-sq_shift
        squares += int(ns["sumsq_lo"][n]) * 2.0 ** -(sq_shift + NS_SQ_LO_SHIFT)
        mine = g * 2.0 ** (-2 * GRID_SHIFT)
        top = max(squares, mine, 0.0)
        bound = 2.0**-GRID_SHIFT * math.sqrt(n_tok * top) + n_tok * (2.0**-22 + 2.0**-47) + 2.0**-24 * top
        if (
            abs(mine - squares) > bound * (1 + 1e-6) + 1e-12 * top
        ):  # the margin: float64, and sqrt of S against the true sum
            return (
                f"correlation: sum of squares {mine:.6g} differs from neuroscope's {squares:.6g} by more than the "
                f"grids' rounding over {n_tok} tokens ({bound:.3g})"
            )
        return None

    def _cauchy_schwarz(self, n: int, s: list[int], var: list[int]) -> int | None:
        """The first neuron j whose r with n would be beyond +-1 (exact integers: N^2 cov^2 against
        N^2 var_n var_j), or None."""
        n_tok = self.tokens
        for j, g in enumerate(self.gram[n].tolist()):
            cov = n_tok * g - s[n] * s[j]
            if cov * cov > var[n] * var[j]:
                return j
        return None

    def rerun_problems(self, rtol: float) -> tuple[dict[int, list[str]], int]:
        """{neuron: problems} of the sampled neurons' sums against the rerun, and the largest
        difference of any compared sum (0: bit for bit)."""
        out: dict[int, list[str]] = {}
        cols = np.asarray(self.neurons)
        n_tok = self.count
        if n_tok != self.tokens:
            for n in self.neurons:
                out.setdefault(n, []).append(f"correlation: {self.tokens} counted tokens stored, {n_tok} rerun")
            return out, abs(n_tok - self.tokens)
        scale = np.maximum(self.rmax, MIN_SCALE)
        e = rtol * scale * 2.0**GRID_SHIFT + 1  # per token, |stored q - rerun q| at most
        ds = np.abs(self.sums[cols] - self.rsum)
        dg = np.abs(self.gram[np.ix_(cols, cols)] - self.rgram)
        gram_bound = np.outer(self.rabs, e).T + np.outer(self.rabs, e) + n_tok * np.outer(e, e)
        ax = np.concatenate(self.rx) if self.rx else np.zeros((0, len(cols)))
        band = rtol * scale
        cut_hi = (ax > CLAMP * 2.0**-GRID_SHIFT + band).sum(0)
        cut_lo = (ax >= CLAMP * 2.0**-GRID_SHIFT - band).sum(0)
        for i, n in enumerate(self.neurons):
            if ds[i] > n_tok * e[i]:
                out.setdefault(n, []).append(f"correlation: sum stored {self.sums[n]}, rerun {self.rsum[i]}")
            if not cut_hi[i] <= self.clamped[n] <= cut_lo[i]:
                out.setdefault(n, []).append(f"correlation: {self.clamped[n]} cut values stored, {cut_hi[i]} rerun")
            bad = np.nonzero(dg[i] > gram_bound[i])[0]
            if len(bad):
                j = int(bad[0])
                out.setdefault(n, []).append(
                    f"correlation: Gram entry with neuron {self.neurons[j]} stored {self.gram[n, self.neurons[j]]}, "
                    f"rerun {self.rgram[i, j]}"
                )
        largest = int(max(ds.max(initial=0), dg.max(initial=0)))
        return out, largest


class CorrelationVerifier:
    """The `Verifier` of the correlation tables: the identities on every checked layer, the sampled
    neurons' rows, and their recomputed sums where verify reruns the whole corpus pass."""

    def __init__(self, store, run: VerifyRun):
        self.run = run
        self.rerun = run.full and run.every_stored  # the sums need the whole corpus pass rerun
        fv = int(store.manifest["config"]["first_valid_position"])
        self.layers = {layer: _Layer(store, layer, neurons, fv) for layer, neurons in run.selection.items()}

    def sequences(self):
        return ()  # when the sums can be recomputed, verify reruns every stored sequence anyway

    def update(self, layer, acts, seq_ids, lengths) -> None:
        if self.rerun:
            self.layers[layer].update(acts, lengths)

    def finish(self) -> Verification:
        failed, lines, largest = [], [], 0
        for layer, check in sorted(self.layers.items()):
            problems = check.store_problems()
            if self.rerun:
                rerun, diff = check.rerun_problems(self.run.rtol)
                largest = max(largest, diff)
                for n, ps in rerun.items():
                    problems.setdefault(n, []).extend(ps)
            bad = sorted(problems)
            rerun_part = f"; {len(check.neurons)} neurons' sums rerun, largest difference {diff}" if self.rerun else ""
            lines.append(
                f"correlation layer {layer}: {len(check.sums)} neurons' sums checked{rerun_part}, {len(bad)} failed"
            )
            for n in bad[:SHOWN]:
                lines += [f"  FAIL layer {layer} neuron {n}: {p}" for p in problems[n]]
            if len(bad) > SHOWN:
                lines.append(f"  ... and {len(bad) - SHOWN} more neurons of layer {layer} fail")
            failed += [(layer, n) for n in bad]
        alone = [
            "correlation: the latents' products with the neurons of the layer their dictionary reads at not checked: "
            "this dictionary's store is not in a model store with correlations (<model store>/dictionaries/<name>)"
            for check in self.layers.values()
            if check.cross is not None and check.base is None
        ][:1]
        notes = alone + (
            []
            if self.rerun
            else [
                "correlation: the sums checked for consistency only (symmetry, parity, bounds, neuroscope's counts "
                "and sums); recomputing them needs the whole corpus pass rerun (a store that keeps every processed "
                "sequence, with --full)"
            ]
        )
        return Verification(
            summary=f"correlation sums of {len(self.layers)} layers checked, {len(failed)} neurons failed",
            lines=lines,
            failed=failed,
            notes=notes,
            data={
                "correlation": {
                    "layers": sorted(self.layers),
                    "rerun": self.rerun,
                    "max_sum_difference": largest,
                    "failed": failed,
                }
            },
        )
