"""Artefact neurons on a computed store (sitegen/services/artefacts.py): how many neurons each
rule flags, which layers' strongest neuron is flagged, how many of the neurons that ranking by the
maximum alone gives `--n2g N` are flagged, and the time the build spends on the flags.

    sitegen compute --tokens 10000 --out store
    python benchmarks/artefacts.py store [--n2g 2] [--show 11:1229,1:49]

--show prints the named neurons' flags and evidence.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from sitegen.services.artefacts import layer_artefacts, whitespace_ids
from sitegen.services.selection import select_neurons
from sitegen.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--n2g", type=int, default=2, help="N of `--n2g N` to compare the two rankings at")
    ap.add_argument("--show", default="", help="comma-separated layer:neuron pairs to print")
    args = ap.parse_args()
    store = Store.open(args.store)
    m = store.manifest["model"]
    n_layers, size = m["num_layers"], m["layer_size"]
    vocab = store.vocab()
    blank = whitespace_ids(vocab)
    start = time.perf_counter()
    flags = {layer: layer_artefacts(store, layer, vocab, blank) for layer in range(n_layers)}
    seconds = time.perf_counter() - start
    counts = Counter(a.code for f in flags.values() for a in f if a)
    print(
        f"{m['name']}: {sum(counts.values()):,} of {n_layers * size:,} neurons flagged {dict(sorted(counts.items()))} "
        f"({seconds:.1f} s for {n_layers} layers)"
    )
    strongest = []
    for layer in range(n_layers):
        top = int(np.argmax(store.read_layer("neuroscope", layer, columns=["max"]).column("max").to_numpy()))
        if flags[layer][top]:
            strongest.append(f"{layer}:{top} {flags[layer][top].code}")
    print(f"strongest neuron of the layer flagged in {len(strongest)} of {n_layers} layers: {', '.join(strongest)}")
    by_max = select_neurons(str(args.n2g), n_layers, size, store)
    chosen = select_neurons(str(args.n2g), n_layers, size, store, skip_artefacts=True)
    flagged = lambda sel: sum(1 for layer, ns in sel.items() for n in ns if flags[layer][n])
    total = sum(map(len, by_max.values()))
    print(
        f"--n2g {args.n2g}: {flagged(by_max)} of the {total} neurons with the largest maxima are flagged; "
        f"{flagged(chosen)} of the {total} chosen"
    )
    for pair in filter(None, args.show.split(",")):
        layer, n = map(int, pair.split(":"))
        a = flags[layer][n]
        print(f"{layer}:{n}", f"{a.code}: {a.evidence}" if a else "not flagged")


if __name__ == "__main__":
    main()
