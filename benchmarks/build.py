"""Build throughput at GPT-2-small scale: a synthetic store (benchmarks/synthetic.py) of 12 x 3072
= 36,864 neurons with all four services: 20 top, 20 bottom and 5 random 32-token sequences each,
logit effects, Neuron2Graph graphs for 2% and explanations for 10% of each layer's neurons (a tenth
of them with `sitegen explain`'s scored sequences); built by `sitegen build` on one core.

    python benchmarks/build.py [--layers 12] [--neurons 3072] [--graphs 0.02] [--explained 0.1] [--keep DIR] [--out DIR]

Prints neuron pages per second (HTML + JSON files, wall clock, and per CPU second of the build,
which a machine shared with other jobs disturbs less), peak memory of the build, bytes per neuron on
disk, raw and gzipped, for the page, the service JSON files and the `all` aggregate, and what an
fsync per file would cost (the reason the build does not do it; README, 'A killed build').
`--out` builds there instead (e.g. /dev/shm, to leave the disk out of the figure).
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import synthetic_store  # noqa: E402


def fsync_cost(where: Path, n: int = 300, size: int = 30_000) -> tuple[float, float]:
    """Seconds per file to write a neuron-sized file to a temporary name and rename it, without and
    with an fsync of the file before the rename (on the file system of `where`)."""
    folder = Path(tempfile.mkdtemp(dir=where, prefix="fsync-probe-"))
    data = os.urandom(size)
    per_file = []
    for sync in (False, True):
        t0 = time.perf_counter()
        for i in range(n):
            tmp = folder / f".{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            os.close(fd)
            os.replace(tmp, folder / f"{sync}-{i}.json")
        per_file.append((time.perf_counter() - t0) / n)
    shutil.rmtree(folder)
    return per_file[0], per_file[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--neurons", type=int, default=3072)
    ap.add_argument("--graphs", type=float, default=0.02, help="Neuron2Graph graphs per layer: a fraction (< 1) or a count")
    ap.add_argument("--explained", type=float, default=0.1, help="explanations per layer: a fraction (< 1) or a count")
    ap.add_argument("--keep", type=Path, default=None, help="keep the store and site in this folder (a kept store is reused)")
    ap.add_argument("--out", type=Path, default=None, help="build the site in a new folder under this one instead of next to the store")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sitegen-bench-"))
    store_dir = work / "store"
    out = Path(tempfile.mkdtemp(dir=args.out, prefix="sitegen-bench-site-")) if args.out else work / "build"
    if not (store_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        synthetic_store(store_dir, args.layers, args.neurons, graphs=args.graphs, explained=args.explained)
        print(f"synthetic store: {args.layers} x {args.neurons} neurons in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(out, ignore_errors=True)
    # One core, as the target says; a child process so its peak memory is its own.
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "sitegen", "build", str(store_dir), "--out", str(out)]
    if not shutil.which("taskset"):
        cmd = cmd[3:]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mb, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    total = args.layers * args.neurons
    print(f"built {total} neurons with all four services in {seconds:.1f} s: {total / seconds:.0f} neurons/s (HTML + JSON, one core), "
          f"{total / cpu:.0f} neurons per CPU second ({cpu:.1f} s); peak memory {peak_mb:.0f} MB")
    model = "gpt2-small-synthetic"
    rng = np.random.default_rng(1)
    sample = [(int(rng.integers(args.layers)), int(rng.integers(args.neurons))) for _ in range(200)]
    files = {"page (HTML)": "{m}/{l}/{n}.html", "neuroscope JSON": "api/{m}/neuroscope/{l}/{n}.json", "logits JSON": "api/{m}/logits/{l}/{n}.json",
             "neuron2graph JSON": "api/{m}/neuron2graph/{l}/{n}.json", "neuron_explainer JSON": "api/{m}/neuron_explainer/{l}/{n}.json",
             "all JSON (aggregate copy)": "api/{m}/all/{l}/{n}.json"}
    raw_main = gz_main = 0.0
    for label, pattern in files.items():
        raw = np.mean([os.path.getsize(out / pattern.format(m=model, l=l, n=n)) for l, n in sample])
        gz = np.mean([len(gzip.compress((out / pattern.format(m=model, l=l, n=n)).read_bytes(), 6)) for l, n in sample])
        print(f"  {label:28s} {raw / 1024:6.1f} KB raw  {gz / 1024:5.1f} KB gzip")
        if "aggregate" not in label:
            raw_main, gz_main = raw_main + raw, gz_main + gz
    print(f"  per neuron, page + service JSON: {raw_main / 1024:.1f} KB raw, {gz_main / 1024:.1f} KB gzip (target <= 40 KB raw)")
    du = subprocess.run(["du", "-sk", str(out)], capture_output=True, text=True).stdout.split()[0]
    print(f"  whole site on disk: {int(du) / 1024:.0f} MB ({int(du) / total:.1f} KB per neuron, 4 KiB blocks included)")
    files = sum(len(f) for _, _, f in os.walk(out))
    plain, synced = fsync_cost(work)
    print(f"  fsync per file (not done by the build, see README): {synced * 1e3:.2f} ms a file against {plain * 1e3:.2f} ms for "
          f"write + rename ({synced / plain:.0f}x); for this site's {files:,} files: +{files * (synced - plain):.0f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
        if args.out is not None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
