"""Similar neurons on a computed store: how many lists are flat, and the same figures had every
pair been measured by DeepDecipher's formula (which divides by the smaller set).

    sitegen compute --out STORE --tokens 10000
    python benchmarks/similar.py STORE

Prints: neurons, time to compute every neuron's similar list, the share of neurons that list five
or more neighbours all at 1.00 (`flat_share`), the share with at least one neighbour, the mean list
length, the neurons whose compared set is a single token and how many of those have a 1.00
neighbour; then the flat share and time with DeepDecipher's formula for every pair (graphless
neurons' sets cut of the same stop tokens).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from sitegen.services.neuron2graph import tokenstore as t
from sitegen.store import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--first-valid", type=int, default=1, help="first counted position (1: skip BOS)")
    args = ap.parse_args()
    ts = t.build_token_store(Store.open(args.store), args.first_valid)
    start = time.perf_counter()
    sim = t.similar_neurons(ts)
    took = time.perf_counter() - start
    n = ts.n_neurons
    one = [i for i in range(n) if len(sim.activating[i]) == 1 and not len(sim.important[i])]
    print(f"neurons {n:,}; similar lists in {took:.1f} s")
    print(
        f"flat lists (>= 5 neighbours, all 1.00): {100 * t.flat_share(sim):.2f}%; with a neighbour: "
        f"{100 * sum(1 for e in sim.lists if e) / n:.1f}%; mean length {sum(map(len, sim.lists)) / n:.2f}"
    )
    print(
        f"single-token neurons: {len(one):,}, with a 1.00 neighbour: {sum(1 for i in one if any(s >= 0.995 for _, s, _ in sim.lists[i])):,}"
    )
    # DeepDecipher's formula for every pair: the same (stop-cut) sets, every neuron treated as a graph
    activating, important = t.similarity_sets(ts)
    as_graphs = replace(ts, activating=activating, important=important, source=[t.SOURCE_GRAPH] * n)
    start = time.perf_counter()
    dd = t.similar_neurons(as_graphs)
    print(
        f"DeepDecipher's formula for every pair: flat lists {100 * t.flat_share(dd):.2f}% ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
