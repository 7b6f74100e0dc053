"""Build throughput at GPT-2-small scale: a synthetic store of 12 x 3072 = 36,864 neurons with
20 top, 20 bottom and 5 random 32-token sequences each, built by `sitegen build` on one core.

    python benchmarks/build.py [--layers 12] [--neurons 3072] [--keep DIR]

Prints neuron pages per second (HTML + JSON files), peak memory of the build, bytes per neuron on
disk, raw and gzipped, for the page, the service JSON files and the `all` aggregate, and what an
fsync per file would cost (the reason the build does not do it; README, 'A killed build').
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
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sitegen.services.neuroscope import data as ns_data  # noqa: E402
from sitegen.services.neuroscope import stats  # noqa: E402
from sitegen.store.manifest import new_manifest  # noqa: E402
from sitegen.store import SEQUENCES_SCHEMA, Store  # noqa: E402


def synthetic_store(root: Path, n_layers: int, n: int, seq_len: int = 32, n_seqs: int = 20000, vocab_size: int = 50257, seed: int = 0) -> Store:
    """Realistic shapes, random content: heavy-tailed activations, a GPT-2-sized vocabulary of word-like tokens."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["<|endoftext|>"] + [(" " if i % 3 else "") + "".join(rng.choice(letters, rng.integers(1, 8))) for i in range(1, vocab_size)]
    token_ids = rng.integers(1, vocab_size, size=(n_seqs, seq_len)).astype(np.int32)
    token_ids[:, 0] = 0
    store = Store(root)
    k, r = 20, 5
    for layer in range(n_layers):
        def extremes(kk, sign):
            ids = np.stack([rng.choice(n_seqs, kk, replace=False) for _ in range(n)], 1)
            trace = (rng.standard_t(4, size=(kk, n, seq_len)) * 0.3).astype(np.float32)
            score = sign * np.sort(np.abs(trace).max(2), axis=0)[::-1].astype(np.float32)
            return {"score": np.ascontiguousarray(score), "seq_id": ids.astype(np.int64), "trace": trace}
        hist = rng.integers(0, 50, size=(n, stats.N_FINE_BINS)).astype(np.int64)
        rid = np.sort(rng.choice(n_seqs, r, replace=False))
        state = {
            "top": extremes(k, 1.0), "bottom": extremes(k, 1.0),
            "random": {"score": -np.arange(r, dtype=np.float32)[:, None], "seq_id": rid[:, None].astype(np.int64),
                       "trace": (rng.normal(size=(r, 1, n * seq_len)) * 0.1).astype(np.float32)},
            "count": int(hist[0].sum()), "sum_fx": rng.integers(-2**40, 2**40, n), "sumsq_fx": rng.integers(0, 2**44, n), "sumsq_lo": rng.integers(0, 2**30, n),
            "n_pos": rng.integers(0, 1000, n), "vmin": -rng.random(n).astype(np.float32) - 0.5, "vmax": rng.random(n).astype(np.float32) * 5 + 1,
            "hist": hist,
        }
        store.write_layer("neuroscope", layer, ns_data.state_to_table(state, k, r, {i: seq_len for i in range(n_seqs)}))
        lst = lambda a, t: pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)), pa.array(a.reshape(-1), t))  # noqa: E731
        ids = rng.integers(0, vocab_size, size=(n, 10))
        vals = rng.normal(size=(n, 10)).astype(np.float32)
        store.write_layer("logits", layer, pa.table({"neuron": pa.array(np.arange(n), pa.int32()),
                                                     "promoted_ids": lst(ids, pa.int32()), "promoted_vals": lst(vals, pa.float32()),
                                                     "suppressed_ids": lst(ids, pa.int32()), "suppressed_vals": lst(vals, pa.float32()),
                                                     "input_ids": lst(ids, pa.int32()), "input_vals": lst(vals, pa.float32())}))
    store.write_sequences(pa.table({"seq_id": pa.array(np.arange(n_seqs, dtype=np.int64)), "doc_id": pa.array([f"doc-{i // 50}" for i in range(n_seqs)]),
                                    "char_start": pa.array(np.arange(n_seqs) * 150), "char_end": pa.array(np.arange(n_seqs) * 150 + 140),
                                    "token_ids": pa.array(list(token_ids), pa.list_(pa.int32()))}, schema=SEQUENCES_SCHEMA))
    store.write_vocab(vocab)
    store.write_manifest(new_manifest(
        model={"name": "gpt2-small-synthetic", "num_layers": n_layers, "layer_size": n, "activation_function": "gelu",
               "num_total_neurons": n_layers * n, "num_total_parameters": 124_000_000},
        corpus={"name": "synthetic", "content_hash": "none", "sequences_total": n_seqs, "tokens_total": n_seqs * seq_len},
        processed={"sequences": n_seqs, "tokens": n_seqs * seq_len},
        config={"seq_len": seq_len, "seed": seed, "tokens": n_seqs * seq_len, "top_k": k, "n_random": r, "bos_token_id": 0, "first_valid_position": 1},
        stats={"quantile_levels": list(stats.QUANTILE_LEVELS), "display_bins": stats.DISPLAY_BINS},
        run_hash="benchmark", shard=None, services=["neuroscope", "logits"],
    ))
    return Store.open(root)


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
    ap.add_argument("--keep", type=Path, default=None, help="keep the store and site in this folder")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sitegen-bench-"))
    store_dir, out = work / "store", work / "build"
    if not (store_dir / "manifest.json").exists():
        t0 = time.perf_counter()
        synthetic_store(store_dir, args.layers, args.neurons)
        print(f"synthetic store: {args.layers} x {args.neurons} neurons in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(out, ignore_errors=True)
    # One core, as the target says; a child process so its peak memory is its own.
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "sitegen", "build", str(store_dir), "--out", str(out)]
    if not shutil.which("taskset"):
        cmd = cmd[3:]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    total = args.layers * args.neurons
    print(f"built {total} neurons in {seconds:.1f} s: {total / seconds:.0f} neurons/s (HTML + JSON, one core); peak memory {peak_mb:.0f} MB")
    model = "gpt2-small-synthetic"
    rng = np.random.default_rng(1)
    sample = [(int(rng.integers(args.layers)), int(rng.integers(args.neurons))) for _ in range(200)]
    files = {"page (HTML)": "{m}/{l}/{n}.html", "neuroscope JSON": "api/{m}/neuroscope/{l}/{n}.json", "logits JSON": "api/{m}/logits/{l}/{n}.json",
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


if __name__ == "__main__":
    main()
