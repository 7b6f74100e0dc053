"""Neuron2Graph throughput on SmolLM2: graphs per minute and model-input tokens per graph, batched
(every selected neuron of a layer shares each stage's forward passes) against the same neurons
done one at a time, measured in the same run.

    python benchmarks/n2g.py [--store STORE] [--layers 5,15,25] [--per-layer 8] [--device auto]

Without --store, a store is computed first (--tokens, default 8192) in a temporary folder. The
neurons are the --per-layer most active of each layer (what `--n2g N` picks).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument(
        "--baseline-layer",
        type=int,
        default=None,
        help="layer for the one-at-a-time baseline [default: the middle one]",
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from sitegen.compute.models import load_model, resolve_device
    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.services.neuron2graph.compute import ModelTokens, N2GConfig, build_layer
    from sitegen.services.selection import select_neurons
    from sitegen.store import Store

    tmp = None
    if args.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="n2g-bench-"))
        args.store = tmp / "store"
        t = time.perf_counter()
        run_compute(
            ComputeConfig(out=args.store, tokens=args.tokens, weights=False, progress=False), log=lambda m: None
        )
        print(f"store: {args.tokens} tokens computed in {time.perf_counter() - t:.0f} s")
    try:
        device = resolve_device(args.device)
        store = Store.open(args.store)
        model = load_model(store.manifest["model"]["source"], device=device)
        mt = ModelTokens.prepare(model, store)
        cfg = N2GConfig()
        m = store.manifest["model"]
        selection = select_neurons(f"{args.per_layer}@{args.layers}", m["num_layers"], m["layer_size"], store)

        def run(layer, neurons):
            t = time.perf_counter()
            table, tokens = build_layer(model, store, layer, neurons, cfg, mt)
            return time.perf_counter() - t, tokens, table

        print(f"model {m['name']} on {device}; {args.per_layer} neurons in each of layers {args.layers}")
        print(f"{'layer':>5} {'graphs':>6} {'seconds':>8} {'graphs/min':>10} {'tokens/graph':>12} {'mean F1':>8}")
        total_s = total_tokens = total_graphs = 0
        for layer, neurons in selection.items():
            s, tokens, table = run(layer, neurons)
            f1 = [x for x in table.column("f1").to_pylist() if x is not None]
            print(
                f"{layer:>5} {table.num_rows:>6} {s:>8.1f} {60 * table.num_rows / s:>10.1f} {tokens / max(table.num_rows, 1):>12.0f} "
                f"{sum(f1) / max(len(f1), 1):>8.3f}"
            )
            total_s, total_tokens, total_graphs = total_s + s, total_tokens + tokens, total_graphs + table.num_rows
        print(
            f"batched: {60 * total_graphs / total_s:.1f} graphs/min, {total_tokens / total_graphs:.0f} model-input tokens per graph (padding included)"
        )

        layers = list(selection)
        base_layer = args.baseline_layer if args.baseline_layer is not None else layers[len(layers) // 2]
        neurons = selection[base_layer]
        one_s = one_tokens = 0.0
        for n in neurons:
            s, tokens, _ = run(base_layer, [n])
            one_s, one_tokens = one_s + s, one_tokens + tokens
        batched_s, batched_tokens, _ = run(base_layer, neurons)
        print(
            f"layer {base_layer}, {len(neurons)} neurons: one at a time {60 * len(neurons) / one_s:.1f} graphs/min "
            f"({one_tokens / len(neurons):.0f} tokens/graph); batched {60 * len(neurons) / batched_s:.1f} graphs/min "
            f"({batched_tokens / len(neurons):.0f} tokens/graph); speed-up {one_s / batched_s:.2f}x"
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
