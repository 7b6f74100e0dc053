"""Compute throughput: `sitegen compute`'s streaming pass (every layer, all neuroscope data)
against a bare forward pass of the same model over the same tokens, measured in the same run.

    python benchmarks/compute.py [--model smollm2] [--tokens 8192] [--batch-size 32] [--device cuda]
    python benchmarks/compute.py --accumulators-only [--d-mlp 1536]   # no model: the accumulators alone
    python benchmarks/compute.py --ray [ADDRESS] [--ray-shards N] [--ray-cpus-per-shard C]
    python benchmarks/compute.py --sae-latents 4608 [--sae-hook blocks.15.hook_resid_post] [--sae PATH]
    python benchmarks/compute.py --correlations [--model PATH] [--tokens 4096]

Prints tokens/s for: the bare full forward (to logits); the bare forward cut after the last
block (what compute needs); compute's pass (hooks + accumulators); and the ratios. The
weight-based logit tables are a one-off cost per model, printed separately.

--ray: whole `sitegen compute` runs (model load, pass, weight tables, store) timed end to end: a
single process against `compute --ray` on the same machine (a local cluster, started before the
clock starts; its start-up is printed separately), tokens/s each and the overhead (target <= 10%).
The load average is printed with it: on a shared machine the figures move with it.

--sae-latents N (or --sae PATH, a dictionary folder): also the pass with one dictionary's latents
computed in it (a random TopK dictionary of N latents at --sae-hook: the cost does not depend on
the weights), its quality sums and loss sample included, against the pass without (target: at
most 15% slower on CPU).

--correlations: also the pass with `compute --correlations` (every layer's exact Gram matrix)
against the pass without, same run, and the correlation table's bytes per neuron as the store
writes it (zstd), from the last layer of that pass.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, mps or auto (the single-process comparison; timed with a device sync)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-weights", action="store_true")
    ap.add_argument(
        "--accumulators-only",
        action="store_true",
        help="time LayerAccumulator.update on random activations (CPU time, one thread)",
    )
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="compare whole runs: single process vs --ray",
    )
    ap.add_argument("--ray-shards", type=int, default=None)
    ap.add_argument("--ray-cpus-per-shard", type=int, default=None)
    ap.add_argument("--sae", default=None, help="a dictionary folder to time in the pass")
    ap.add_argument("--sae-latents", type=int, default=None, help="a random TopK dictionary of this many latents")
    ap.add_argument("--sae-hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--correlations", action="store_true", help="also time the pass with compute --correlations")
    args = ap.parse_args()
    if args.accumulators_only:
        return accumulators_only(args)
    if args.ray is not None:
        ray_benchmark(args)
        return

    import dataclasses

    from sitegen.compute.models import load_model, resolve_device
    from sitegen.compute.packing import pack_sequences
    from sitegen.compute.runner import (
        _batch_tensors,
        _corpus_services,
        _FiniteGuard,
        _forward_units,
        _LayerAccumulators,
        _LossSample,
        _Units,
        auto_batch_size,
    )
    from sitegen.corpus import load_corpus
    from sitegen.corpus_keys import random_key
    from sitegen.services.base import CorpusRun

    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    seqs = list(pack_sequences(load_corpus(args.corpus), model.tokenizer, args.seq_len, args.tokens, 0))
    bs = args.batch_size or auto_batch_size(device, args.seq_len)
    pad = int(model.tokenizer.pad_token_id or 0)
    batches = [
        _batch_tensors(seqs[i : i + bs], bs, args.seq_len, pad, 1, 0, random_key, device)
        for i in range(0, len(seqs), bs)
    ]
    n_tokens = sum(len(s.token_ids) for s in seqs)
    full_flags = [
        len(seqs[i : i + bs]) == bs and all(len(s.token_ids) == args.seq_len for s in seqs[i : i + bs])
        for i in range(0, len(seqs), bs)
    ]

    def bare_full():
        with torch.inference_mode():
            for tokens, *_ in batches:
                model.bridge(tokens, return_type="logits")

    def bare_cut():  # the same pass as compute's, cut after the last MLP's activations, with nothing done to them
        for tokens, *_ in batches:
            model.run_mlp_activations(tokens, [model.n_layers - 1], lambda layer, acts: None)

    run = CorpusRun(
        layer_size=model.d_mlp,
        seq_len=args.seq_len,
        first_valid=1,
        top_k=20,
        n_random=5,
        seed=0,
        seq_lengths={s.seq_id: len(s.token_ids) for s in seqs},
        device=device,
    )

    dictionary = None
    if args.sae or args.sae_latents:
        from sitegen.dictionaries.format import check_fits, load_dictionary, random_dictionary
        from sitegen.dictionaries.units import DictionaryUnits, QualitySums

        if args.sae:
            dictionary = load_dictionary(args.sae)
        else:
            width = model.hook_width(args.sae_hook)
            dictionary = random_dictionary("topk", width, args.sae_latents, args.sae_hook, k=32, name="bench")
        check_fits(dictionary, model)

    last_accs: list = []

    def compute(
        corpus_run, with_dictionary: bool = False, correlations: bool = False
    ):  # every corpus-pass service's accumulators, as compute feeds them
        services = _corpus_services(SimpleNamespace(correlations=correlations))
        accs = [
            _LayerAccumulators({s.name: s.accumulator(layer, corpus_run) for s in services})
            for layer in range(model.n_layers)
        ]
        last_accs[:] = accs
        units = [_Units(model, None, accs, _FiniteGuard(model.n_layers, model.d_mlp, 1, device))]
        if with_dictionary:  # the dictionary's latents, quality sums and loss sample, as compute --sae adds them
            latent_run = dataclasses.replace(
                corpus_run, layer_size=dictionary.d_sae, gated_mlp=False, base_size=model.d_mlp
            )
            q = QualitySums(dictionary.d_out, dictionary.d_sae)
            latent_accs = _LayerAccumulators({s.name: s.accumulator(0, latent_run) for s in services}, {".q": q})
            latents = DictionaryUnits(model, dictionary, device)
            units.append(_Units(latents, None, [latent_accs], _FiniteGuard(1, dictionary.d_sae, 1, device), q))
        loss = _LossSample(SimpleNamespace(units=units, first_valid=1), pad)
        for (tokens, seq_ids, valid, rand, interval), full in zip(batches, full_flags):
            _forward_units(units, tokens, seq_ids, valid, rand, interval, full)
            loss.add(tokens, valid, rand)
        loss.flush()

    passes = [
        ("bare forward, full (logits)", bare_full),
        ("bare forward, cut after last block", bare_cut),
        ("sitegen compute pass", lambda: compute(dataclasses.replace(run, gated_mlp=model.gated_mlp))),
    ]
    if dictionary is not None:
        with_dictionary = f"compute pass + {dictionary.d_sae}-latent dictionary"
        passes.append((with_dictionary, lambda: compute(dataclasses.replace(run, gated_mlp=model.gated_mlp), True)))

    def without_intervals():  # the same pass with IntervalExamples.update doing nothing: its cost
        from sitegen.services.neuroscope import compute as ns_compute

        real = ns_compute.IntervalExamples.update
        ns_compute.IntervalExamples.update = lambda self, *a, **k: None
        try:
            compute(dataclasses.replace(run, gated_mlp=model.gated_mlp))
        finally:
            ns_compute.IntervalExamples.update = real

    passes.append(("compute pass without interval examples", without_intervals))
    with_corr = "compute pass + correlations"
    if args.correlations:
        passes.append(
            (with_corr, lambda: compute(dataclasses.replace(run, gated_mlp=model.gated_mlp), correlations=True))
        )
    if model.gated_mlp:  # the same pass without the gate/up quadrants (their hooks still run: timed apart below)
        passes.append(("compute pass without GLU quadrants", lambda: compute(run)))

        def cut_with_glu_hooks():  # bare_cut plus the gate and up hooks the quadrants read
            noop = lambda acts: None
            hooks = [(name, noop) for layer in range(model.n_layers) for name in model.glu_hook_names(layer)]
            for tokens, *_ in batches:
                model.run_hooks(tokens, hooks + [(model.hook_name(model.n_layers - 1), noop)])

        passes.append(("bare forward, cut, with gate/up hooks", cut_with_glu_hooks))
    bare_cut()  # warm-up
    # Repeats interleave the passes (A B C A B C), so a slow spell of a shared machine does not
    # fall on one pass alone; each pass keeps its best time.
    best = {name: float("inf") for name, _ in passes}
    for _ in range(args.repeats):
        for name, fn in passes:
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):  # kernels run asynchronously: the clock stops when they are done
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t0)
    timings = {name: n_tokens / t for name, t in best.items()}
    print(
        f"model {model.name}: {model.n_layers} layers x {model.d_mlp} neurons; {n_tokens} tokens in {len(seqs)} sequences of {args.seq_len}; "
        f"batch {bs}; device {device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if device.startswith("cuda")
            else f"; torch threads {torch.get_num_threads()}"
        )
    )
    for name, rate in timings.items():
        print(f"  {name:40s} {rate:8.1f} tokens/s")
    c = timings["sitegen compute pass"]
    print(
        f"  ratio compute / bare full forward:       {c / timings['bare forward, full (logits)']:.3f}  (target >= 0.9)"
    )
    print(
        f"  ratio compute / bare forward, same cut:  {c / timings['bare forward, cut after last block']:.3f}  (cost of the accumulators alone)"
    )
    print(
        f"  ratio compute without / with interval examples: {timings['compute pass without interval examples'] / c:.3f}  "
        "(the examples across the activation range: their cost)"
    )
    if dictionary is not None:
        with_d = timings[with_dictionary]
        print(
            f"  dictionary at {dictionary.hook_name}: pass with it / without: {with_d / c:.3f}  "
            f"({100 * (c / with_d - 1):.1f}% slower; target <= 15%)"
        )
    if args.correlations:
        import tempfile
        from pathlib import Path

        from sitegen.store import write_table

        compute(dataclasses.replace(run, gated_mlp=model.gated_mlp), correlations=True)  # the last pass: its tables
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "corr.parquet"
            write_table(path, last_accs[-1].parts["correlation"].table())
            per_unit = path.stat().st_size / model.d_mlp
        with_c = timings[with_corr]
        print(
            f"  --correlations: pass with it / without: {with_c / c:.3f}  ({100 * (c / with_c - 1):.1f}% slower); "
            f"store {per_unit:,.0f} bytes per neuron (zstd; {8 * model.d_mlp:,} raw)"
        )
    if model.gated_mlp:
        without = timings["compute pass without GLU quadrants"]
        hooks = timings["bare forward, cut, with gate/up hooks"]
        print(f"  ratio compute without / with GLU quadrants: {without / c:.3f}  (the quadrants' cost)")
        print(
            f"  ratio bare cut without / with gate/up hooks: "
            f"{timings['bare forward, cut after last block'] / hooks:.3f}  (the hooks' share of it)"
        )
    if not args.skip_weights:
        from sitegen.services.logits.compute import weight_tables

        t0 = time.perf_counter()
        for _ in weight_tables(model):
            pass
        print(f"  weight-based logit tables (one-off per model): {time.perf_counter() - t0:.1f} s")


def accumulators_only(args) -> None:
    """One layer's accumulator update per batch, in CPU time on one thread: steadier than wall time
    on a shared machine, and what the streaming statistics add to each layer of the forward pass.
    Each on both paths, same batches, same run: the CPU's fused kernels (kernels.py, the default
    on a CPU) and the torch operations (the GPU's path, here on the CPU)."""
    import numba

    from sitegen.services.neuroscope.compute import GluQuadrants, LayerAccumulator

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    torch.manual_seed(0)
    bs, T, n = args.batch_size or 32, args.seq_len, args.d_mlp
    acts = [torch.randn(bs, T, n) * 0.3 for _ in range(4)]
    gates, ups = [torch.randn(bs, T, n) for _ in acts], [torch.randn(bs, T, n) for _ in acts]
    valid = torch.ones(bs, T, dtype=torch.bool)
    valid[:, 0] = False

    def median_ms(update) -> float:
        times = []
        for rep in range(5):
            t0 = time.process_time()
            for i, a in enumerate(acts):
                update(a, i, torch.arange(bs) + bs * (4 * rep + i))
            times.append((time.process_time() - t0) / len(acts))
        return sorted(times)[2] * 1e3

    medians = {}
    for fused in (False, True):
        acc = LayerAccumulator(n, T, 20, 5, 1, "cpu", fused=fused)
        glu = GluQuadrants(n, T, 1, "cpu", fused=fused)
        acc.update(acts[0], torch.arange(bs) - bs, valid, torch.rand(bs), all_full=True)  # compiles the kernels
        medians[fused] = (
            median_ms(lambda a, i, ids: acc.update(a, ids, valid, torch.rand(bs), all_full=True)),
            # a gated MLP's quadrants, on the same batches (gate and up: random, so every quadrant is hit)
            median_ms(lambda a, i, ids: glu.update(a, gates[i], ups[i], ids, valid, all_full=True)),
        )
    for k, name in enumerate(("LayerAccumulator.update", "GluQuadrants.update")):
        plain, fused = medians[False][k], medians[True][k]
        print(
            f"{name}, batch {bs} x {T} tokens x {n} neurons, one thread, median of 5: torch operations "
            f"{plain:.1f} ms, fused kernels {fused:.1f} ms CPU per layer per batch (x{plain / fused:.2f})"
        )
    logit_histograms_only()
    intervals_only(args, medians[True][0] / 1e3)  # seconds, the fused path's
    correlations_only(args, medians[True][0] / 1e3)


def logit_histograms_only() -> None:
    """The logits service's histograms of one SmolLM2-sized layer (1,536 neurons x 49,152 vocabulary
    logits), CPU time on one thread: the numba kernel (a CPU's path) against torch.searchsorted (a
    GPU's), the same matrix."""
    from sitegen.services.logits.compute import logit_histograms

    logits = torch.randn(1536, 49152, generator=torch.Generator().manual_seed(2)) * 0.05
    logit_histograms(logits[:2], fused=True)  # compiles the kernel
    seconds = {}
    for fused in (False, True):
        t0 = time.process_time()
        logit_histograms(logits, fused=fused)
        seconds[fused] = time.process_time() - t0
    print(
        f"logit histograms, 1,536 x 49,152 logits, one thread: torch.searchsorted {seconds[False]:.2f} s, "
        f"numba kernel {seconds[True]:.2f} s CPU per layer (x{seconds[False] / seconds[True]:.1f})"
    )


def correlations_only(args, base_median: float) -> None:
    """GramAccumulator.update (compute --correlations) on the same kind of batches, in CPU time on
    one thread, against LayerAccumulator's median: what the flag adds to each layer of the pass."""
    from types import SimpleNamespace

    from sitegen.services.base import Batch
    from sitegen.services.correlation.compute import GramAccumulator

    bs, T, n = args.batch_size or 32, args.seq_len, args.d_mlp
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(bs, T, n, generator=gen) * 0.3 for _ in range(4)]
    valid = torch.ones(bs, T, dtype=torch.bool)
    valid[:, 0] = False
    batch = Batch(valid, torch.arange(bs), torch.zeros(bs), torch.zeros(bs), all_full=True)
    gram = GramAccumulator(SimpleNamespace(layer_size=n, first_valid=1, device="cpu", base_size=0))
    times = []
    for _ in range(5):
        t0 = time.process_time()
        for a in batches:
            gram.update(a, batch)
        times.append((time.process_time() - t0) / len(batches))
    times.sort()
    print(
        f"GramAccumulator.update (--correlations), the same batches: best {times[0] * 1e3:.1f} ms, median "
        f"{times[2] * 1e3:.1f} ms CPU (ratio to LayerAccumulator, medians: {times[2] / base_median:.2f})"
    )


def intervals_only(args, base_median: float) -> None:
    """IntervalExamples.update (examples across the activation range) after a warm-up of 60 batches
    (the first batches fill every group; later ones mostly pass the pre-filter), in CPU time on one
    thread, against LayerAccumulator's median; and the store's bytes per neuron with and without."""
    import io

    import pyarrow.parquet as pq

    from sitegen.services.neuroscope import data
    from sitegen.services.neuroscope.compute import IntervalExamples, LayerAccumulator

    bs, T, n = args.batch_size or 32, args.seq_len, args.d_mlp
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(bs, T, n, generator=gen) * 0.3 for _ in range(4)]
    valid = torch.ones(bs, T, dtype=torch.bool)
    valid[:, 0] = False
    acc, iv = LayerAccumulator(n, T, 20, 5, 1, "cpu"), IntervalExamples(n, T, "cpu")
    step = 0

    def feed(a):
        nonlocal step
        ids = torch.arange(bs) + bs * step
        step += 1
        seq_max = acc.update(a, ids, valid, torch.rand(bs), all_full=True)
        return seq_max, ids

    for k in range(60):
        a = batches[k % 4] * (1 + 0.01 * k)  # slowly rising maxima: the groups keep moving, as early in a real pass
        seq_max, ids = feed(a)
        iv.update(seq_max, ids, -torch.rand(bs), a)
    times = []
    for _ in range(5):
        elapsed = 0.0
        for a in batches:
            seq_max, ids = feed(a)
            t0 = time.process_time()
            iv.update(seq_max, ids, -torch.rand(bs), a)
            elapsed += time.process_time() - t0
        times.append(elapsed / len(batches))
    times.sort()
    print(
        f"IntervalExamples.update, after 60 batches: best {times[0] * 1e3:.1f} ms, median {times[2] * 1e3:.1f} ms CPU "
        f"(ratio to LayerAccumulator, medians: {times[2] / base_median:.2f})"
    )
    state = acc.state()
    lengths = {s: T for s in range(bs * step)}
    sizes = []
    for with_intervals in (False, True):
        table = data.state_to_table({**state, **({"interval": iv.state()} if with_intervals else {})}, 20, 5, lengths)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        sizes.append(buf.tell() / n)
    print(
        f"neuroscope store bytes per neuron (parquet, {T}-token sequences): {sizes[0]:.0f} without, {sizes[1]:.0f} "
        f"with the interval examples (x{sizes[1] / sizes[0]:.2f})"
    )


def ray_benchmark(args) -> None:
    import logging
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    from sitegen.compute.distributed import RayOptions, run_compute_ray
    from sitegen.compute.runner import ComputeConfig, run_compute

    tmp = Path(tempfile.mkdtemp(prefix="sitegen-bench-ray-"))
    cfg = lambda out: ComputeConfig(
        model=args.model,
        corpus=args.corpus,
        out=tmp / out,
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device="cpu",
        progress=False,
        weights=not args.skip_weights,
    )
    load = lambda: "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    cores = os.cpu_count()
    print(
        f"{args.tokens} tokens of {args.corpus} through {args.model}; {cores} cores; torch threads {torch.get_num_threads()}; {load()}"
    )
    try:
        single, ray_runs = [], []
        t0 = time.perf_counter()
        if args.ray == "local":
            ray.init(
                address="local",
                num_cpus=cores,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        else:
            ray.init(address=args.ray, logging_level=logging.WARNING, log_to_driver=False)
        print(f"  ray cluster start (not in the figures below): {time.perf_counter() - t0:.1f} s")
        opts = RayOptions(
            address=None if args.ray == "local" else args.ray,
            shards=args.ray_shards,
            cpus_per_shard=args.ray_cpus_per_shard or (cores if args.ray == "local" else None),
            report_seconds=3600,
        )
        for r in range(args.repeats):  # alternate, so a change in the machine's load hits both alike
            for name, runs, fn in (
                ("single", single, lambda out: run_compute(cfg(out), log=lambda m: None)),
                ("ray", ray_runs, lambda out: run_compute_ray(cfg(out), opts, log=lambda m: None)),
            ):
                t0 = time.perf_counter()
                fn(f"{name}{r}")
                runs.append(time.perf_counter() - t0)
                print(f"  run {r} {name:6s} {runs[-1]:7.1f} s  ({load()})")
        import orjson

        tokens = orjson.loads((tmp / "single0" / "manifest.json").read_bytes())["processed"]["tokens"]
        a, b = tokens / min(single), tokens / min(ray_runs)
        print(f"  single process          {a:8.1f} tokens/s (best of {args.repeats}, whole run)")
        print(f"  --ray ({opts.shards or 'auto'} shards x {opts.cpus_per_shard} CPUs) {b:8.1f} tokens/s")
        print(f"  ray overhead: {100 * (1 - b / a):.1f}%  (target <= 10%); {load()}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
