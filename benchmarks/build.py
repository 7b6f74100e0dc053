"""Build throughput at GPT-2-small scale: a synthetic store (benchmarks/synthetic.py) of 12 x 3072
= 36,864 neurons with all four services: 20 top, 20 bottom and 5 random 32-token sequences each,
logit effects, Neuron2Graph graphs for 2% and explanations for 10% of each layer's neurons (a tenth
of them with `sitegen explain`'s scored sequences); built by `sitegen build` on one core.

    python benchmarks/build.py [--shape gpt2-small|gpt2-xl|llama3-8b | --layers 12 --neurons 3072 --vocab 50257]
                               [--jobs 1,all] [--graphs 0.02] [--explained 0.1] [--keep DIR] [--out DIR] [--no-sizes]

For each --jobs value (default: 1, pinned to one core, then every core), a build into an empty
folder: neuron pages per second (HTML + JSON files, wall clock, and per CPU second of the build,
which a machine shared with other jobs disturbs less), the speed-up over the first, the peak memory
of the biggest build process (target <= 4 GB), files and bytes in all and per neuron, the largest
folder against Netlify's 54,000 files; then bytes per neuron on disk, raw and gzipped, for the page, the service JSON files and the `all` aggregate, and what an
fsync per file would cost (the reason the build does not do it; docs/guide.md, 'A killed build').
`--out` builds there instead (e.g. /dev/shm, to leave the disk out of the figure).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
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


SHAPES = {  # (layers, neurons per layer, vocabulary)
    "gpt2-small": (12, 3072, 50257),
    "gpt2-xl": (48, 6400, 50257),
    "llama3-8b": (32, 14336, 128256),
}
_SUMMARY = re.compile(
    r"([\d,]+) files, ([\d,.]+) MiB;.*largest folder (\S*)/ \(([\d,]+) files\); peak memory ([\d,]+) MB"
)


def timed_build(store_dir: Path, out: Path, jobs: int) -> dict:
    """One `sitegen build --jobs N` into an empty folder, as a child process; its figures."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sitegen", "build", str(store_dir), "--out", str(out), "--jobs", str(jobs), "--quiet"]
    if jobs == 1 and shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]  # one core, as the single-core target says
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = _SUMMARY.search(done.stderr)
    if not m:
        raise SystemExit(f"no summary in the build's output:\n{done.stderr}")
    files, mib, folder, in_folder, peak = m.groups()
    return {
        "jobs": jobs,
        "seconds": seconds,
        "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "files": int(files.replace(",", "")),
        "bytes": float(mib.replace(",", "")) * 2**20,
        "folder": folder or ".",
        "in_folder": int(in_folder.replace(",", "")),
        "peak_mb": int(peak.replace(",", "")),
        "warning": "warning:" in done.stderr,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="a model's shape (sets --layers, --neurons, --vocab)"
    )
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--neurons", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument(
        "--graphs", type=float, default=0.02, help="Neuron2Graph graphs per layer: a fraction (< 1) or a count"
    )
    ap.add_argument("--explained", type=float, default=0.1, help="explanations per layer: a fraction (< 1) or a count")
    ap.add_argument(
        "--jobs", default="1,all", help="comma-separated --jobs values to time; 'all' = every core (default: 1,all)"
    )
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep the store (reused next time) and the site (unless --out) in this folder",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="build the site in a new folder under this one instead of next to the store",
    )
    ap.add_argument("--no-sizes", action="store_true", help="skip the per-file sizes and the fsync probe")
    ap.add_argument(
        "--no-interval-examples",
        action="store_true",
        help="a store without the examples across the activation range (to time their cost)",
    )
    args = ap.parse_args()
    if args.shape:
        args.layers, args.neurons, args.vocab = SHAPES[args.shape]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs_list = [cores if j == "all" else int(j) for j in args.jobs.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="sitegen-bench-"))
    store_dir = work / "store"
    out = Path(tempfile.mkdtemp(dir=args.out, prefix="sitegen-bench-site-")) if args.out else work / "build"
    if not (store_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        synthetic_store(
            store_dir,
            args.layers,
            args.neurons,
            vocab_size=args.vocab,
            graphs=args.graphs,
            explained=args.explained,
            interval_examples=not args.no_interval_examples,
        )
        print(
            f"synthetic store: {args.layers} x {args.neurons} neurons, {args.vocab:,}-token vocabulary, in {time.perf_counter() - t0:.0f} s"
        )
    total = args.layers * args.neurons
    runs = []
    for jobs in jobs_list:
        r = timed_build(store_dir, out, jobs)
        runs.append(r)
        speedup = runs[0]["seconds"] / r["seconds"]
        print(
            f"--jobs {jobs}: {total:,} neurons in {r['seconds']:.1f} s: {total / r['seconds']:,.0f} neurons/s "
            f"({total / r['cpu']:,.0f} per CPU second; {speedup:.2f}x --jobs {runs[0]['jobs']}); peak memory {r['peak_mb']:,} MB "
            f"(target <= 4,096); {r['files']:,} files ({r['files'] / total:.2f} per neuron), {r['bytes'] / 2**30:.2f} GiB "
            f"({r['bytes'] / total / 1024:.1f} KiB per neuron); largest folder {r['folder']}/ with {r['in_folder']:,} files "
            f"({'OVER' if r['in_folder'] > 54_000 else 'under'} Netlify's 54,000)"
        )
    if not args.no_sizes:
        sizes(out, args.layers, args.neurons, total, work)
    if args.out is not None:  # a new folder of this run's (on /dev/shm it holds memory): never kept
        shutil.rmtree(out, ignore_errors=True)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


def sizes(out: Path, layers: int, neurons: int, total: int, work: Path) -> None:
    """Bytes per neuron by file kind (a sample of 200 neurons), the site on disk, the fsync probe."""
    model = "gpt2-small-synthetic"
    rng = np.random.default_rng(1)
    sample = [(int(rng.integers(layers)), int(rng.integers(neurons))) for _ in range(200)]
    files = {
        "page (HTML)": "{m}/{l}/{n}.html",
        "neuroscope JSON": "api/{m}/neuroscope/{l}/{n}.json",
        "logits JSON": "api/{m}/logits/{l}/{n}.json",
        "neuron2graph JSON": "api/{m}/neuron2graph/{l}/{n}.json",
        "neuron_explainer JSON": "api/{m}/neuron_explainer/{l}/{n}.json",
        "all JSON (aggregate copy)": "api/{m}/all/{l}/{n}.json",
    }
    raw_main = gz_main = 0.0
    for label, pattern in files.items():
        raw = np.mean([os.path.getsize(out / pattern.format(m=model, l=layer, n=n)) for layer, n in sample])
        gz = np.mean(
            [len(gzip.compress((out / pattern.format(m=model, l=layer, n=n)).read_bytes(), 6)) for layer, n in sample]
        )
        print(f"  {label:28s} {raw / 1024:6.1f} KB raw  {gz / 1024:5.1f} KB gzip")
        if "aggregate" not in label:
            raw_main, gz_main = raw_main + raw, gz_main + gz
    print(
        f"  per neuron, page + service JSON: {raw_main / 1024:.1f} KB raw, {gz_main / 1024:.1f} KB gzip (target <= 40 KB raw)"
    )
    du = subprocess.run(["du", "-sk", str(out)], capture_output=True, text=True).stdout.split()[0]
    print(f"  whole site on disk: {int(du) / 1024:.0f} MB ({int(du) / total:.1f} KB per neuron, 4 KiB blocks included)")
    count = sum(len(f) for _, _, f in os.walk(out))
    plain, synced = fsync_cost(work)
    print(
        f"  fsync per file (not done by the build, see docs/guide.md): {synced * 1e3:.2f} ms a file against {plain * 1e3:.2f} ms for "
        f"write + rename ({synced / plain:.0f}x); for this site's {count:,} files: +{count * (synced - plain):.0f} s"
    )


if __name__ == "__main__":
    main()
