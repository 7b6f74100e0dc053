"""Seconds and LLM calls per neuron for each step of `sitegen explain`: the explanation, the
simulation, detection and fuzzing, in-process (`--local`) and, with --endpoint, through an
OpenAI-compatible server (e.g. llama.cpp's, serving the same model).

    python benchmarks/explain.py STORE --neurons 2@0,15,29                  # in-process, the store's model
    python benchmarks/explain.py STORE --neurons 2@0,15 --endpoint http://127.0.0.1:8080/v1 --model smollm2

Nothing is written to the store: each neuron goes through explain_neuron directly and every
request is timed and filed under the step that made it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict


def step_of(path: str, body: dict) -> str:
    if path == "/completions":
        return "simulation"
    text = body["messages"][-1]["content"]
    if "Neuron B" in text:
        return "explanation"
    if "\nExcerpts:\n" in text:
        return "fuzzing" if "<<" in text else "detection"
    return "simulation"  # the logprob-free rewrite


class Timed:
    def __init__(self, ep):
        self.ep, self.base, self.times, self.calls = ep, ep.base, defaultdict(float), defaultdict(int)

    def __getattr__(self, name):
        return getattr(self.ep, name)

    def post(self, path, body):
        t = time.perf_counter()
        try:
            return self.ep.post(path, body)
        finally:
            step = step_of(path, body)
            self.times[step] += time.perf_counter() - t
            self.calls[step] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--neurons", default="1@0,15,29")
    ap.add_argument("--endpoint")
    ap.add_argument("--model")
    ap.add_argument("--scorer-excerpts", type=int, default=10)
    args = ap.parse_args()

    from sitegen.services.neuron_explainer import explain as ex
    from sitegen.services.selection import select_neurons
    from sitegen.store import Store

    store = Store.open(args.store)
    m = store.manifest["model"]
    selection = select_neurons(args.neurons, int(m["num_layers"]), int(m["layer_size"]), store, option="--neurons")
    t = time.perf_counter()
    if args.endpoint:
        ep = ex.Endpoint(args.endpoint, args.model, None, 600.0, 1, None)
        where = f"through {args.endpoint} ({args.model})"
    else:
        from sitegen.services.neuron_explainer.local import LocalModel

        ep = LocalModel(str(m["source"]), option="--local")
        where = f"in-process ({ep.name}, {os.cpu_count()} cores)"
    load = time.perf_counter() - t
    timed = Timed(ep)
    vocab, seq_tokens = store.vocab(), store.sequence_tokens()
    count, wall = 0, time.perf_counter()
    for layer, ns in sorted(selection.items()):
        for n, texts in ex._texts(store, layer, ns, vocab, seq_tokens).items():
            r = ex.explain_neuron(timed, texts, 5, 1, ex.SCORERS, args.scorer_excerpts)
            count += 1
            s = r.get("scores") or {}
            show = " ".join(f"{k} {v['value']}" for k, v in s.items())
            print(f"{layer}:{n} {r.get('explanation')!r} {show} {r.get('error') or ''}")
    wall = time.perf_counter() - wall
    print(f"\n{count} neurons {where}; model load {load:.1f} s; load average {os.getloadavg()[0]:.2f}")
    for step in ("explanation", "simulation", "detection", "fuzzing"):
        print(f"  {step:<12} {timed.calls[step] / count:5.1f} calls/neuron  {timed.times[step] / count:6.1f} s/neuron")
    print(f"  {'all':<12} {sum(timed.calls.values()) / count:5.1f} calls/neuron  {wall / count:6.1f} s/neuron")


if __name__ == "__main__":
    main()
