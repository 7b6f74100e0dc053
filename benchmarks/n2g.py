"""Neuron2Graph throughput on SmolLM2: graphs per minute and model-input tokens per graph, the
fast path (`build_layer`) against the reference path (`N2GConfig(reference=True)`: no reuse, no
skips, greedy batches) in the same run, repeats interleaved (the machine's load moves), with every
graph compared byte for byte (the layer tables' Arrow IPC bytes).

    python benchmarks/n2g.py [--store STORE] [--layers 5,15,25] [--per-layer 8] [--repeats 2]
                             [--one-at-a-time] [--threads N] [--device auto]

Without --store, a store is computed first (--tokens, default 8192) in a temporary folder. The
neurons are the --per-layer most active of each layer (what `--n2g N` picks). --one-at-a-time also
times the middle layer's neurons one by one against all of them batched (the fast path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def _ipc_bytes(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each path per layer, interleaved")
    ap.add_argument("--one-at-a-time", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads [default: torch's]; 1 on a shared machine, where waiting for a descheduled "
        "second thread at every operation swamps the work being compared",
    )
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

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
        paths = {"reference": N2GConfig(reference=True), "fast": N2GConfig()}
        m = store.manifest["model"]
        selection = select_neurons(f"{args.per_layer}@{args.layers}", m["num_layers"], m["layer_size"], store)

        def run(layer, neurons, cfg):
            logs: list[str] = []
            t, cpu = time.perf_counter(), time.process_time()
            table, tokens = build_layer(model, store, layer, neurons, cfg, mt, logs.append)
            cpu_seconds[cfg.reference].append(time.process_time() - cpu)
            return time.perf_counter() - t, tokens, table, logs[-1]

        cpu_seconds: dict[bool, list[float]] = {True: [], False: []}  # this process's CPU time, all threads

        load = os.getloadavg()
        print(
            f"model {m['name']} on {device}; {args.per_layer} neurons in each of layers {args.layers}; "
            f"{args.repeats} interleaved repeats; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        print(
            f"{'layer':>5} {'graphs':>6} {'ref s':>7} {'fast s':>7} {'ref/min':>8} {'fast/min':>8} {'ratio':>6} "
            f"{'ref tok/g':>9} {'fast tok/g':>10} {'identical':>9}"
        )
        seconds = {name: 0.0 for name in paths}
        tokens = {name: 0 for name in paths}
        graphs = 0
        all_identical = True
        for layer, neurons in selection.items():
            times = {name: [] for name in paths}
            out = {}
            for rep in range(args.repeats):
                order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
                for name in order:
                    s, tok, table, note = run(layer, neurons, paths[name])
                    times[name].append(s)
                    out[name] = (tok, table, note)
            best = {name: min(ts) for name, ts in times.items()}  # the least disturbed run of each
            n = out["fast"][1].num_rows
            identical = _ipc_bytes(out["fast"][1]) == _ipc_bytes(out["reference"][1])
            all_identical &= identical
            print(
                f"{layer:>5} {n:>6} {best['reference']:>7.1f} {best['fast']:>7.1f} {60 * n / best['reference']:>8.1f} "
                f"{60 * n / best['fast']:>8.1f} {best['reference'] / best['fast']:>5.2f}x "
                f"{out['reference'][0] / max(n, 1):>9.0f} {out['fast'][0] / max(n, 1):>10.0f} {'yes' if identical else 'NO':>9}"
            )
            print(f"      fast: {out['fast'][2]}")
            for name in paths:
                seconds[name] += best[name]
                tokens[name] += out[name][0]
            graphs += n
        load = os.getloadavg()
        print(
            f"all layers: reference {60 * graphs / seconds['reference']:.1f} graphs/min "
            f"({tokens['reference'] / graphs:.0f} model-input tokens per graph, padding included), "
            f"fast {60 * graphs / seconds['fast']:.1f} graphs/min ({tokens['fast'] / graphs:.0f} tokens per graph): "
            f"{seconds['reference'] / seconds['fast']:.2f}x; graphs byte-identical: {'yes' if all_identical else 'NO'}; "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        # CPU time moves less than wall time on a shared machine (it leaves out waiting for a core)
        ref_cpu, fast_cpu = sum(cpu_seconds[True]), sum(cpu_seconds[False])
        print(f"CPU seconds over all runs: reference {ref_cpu:.0f}, fast {fast_cpu:.0f}: {ref_cpu / fast_cpu:.2f}x")

        if args.one_at_a_time:
            layers = list(selection)
            base_layer = layers[len(layers) // 2]
            neurons = selection[base_layer]
            one_s = one_tokens = 0.0
            for n in neurons:
                s, tok, _, _ = run(base_layer, [n], paths["fast"])
                one_s, one_tokens = one_s + s, one_tokens + tok
            batched_s, batched_tokens, _, _ = run(base_layer, neurons, paths["fast"])
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
